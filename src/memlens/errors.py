"""The one exception type for problems the user can fix (bad input, bad config, missing model)."""


class MemlensError(Exception):
    """A user-facing error: the CLI prints its message on one line (or a short block) and exits non-zero."""
