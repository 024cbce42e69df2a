"""Run the memlens command as a user would, and check that an error is one line without a traceback."""

import os
import subprocess
import sys


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "memlens", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def one_line_error(p, *words):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr
