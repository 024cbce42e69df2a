"""memlens: measure what a language model memorizes when it is fine-tuned on sensitive text."""

from memlens.errors import MemlensError

__version__ = "0.1.0"
__all__ = ["MemlensError", "__version__"]
