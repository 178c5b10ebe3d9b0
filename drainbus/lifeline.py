"""Child processes that die with the process that started them, however it dies.

``drainbus serve`` starts processes of its own (the embedded Redis-compatible server, the
workers of ``--workers N``); none of them may outlive it, or it leaves a server holding the
port or the data directory. On Linux the child asks the kernel for SIGTERM when its parent
dies (``PR_SET_PDEATHSIG``); if the parent died before that request, no signal would ever
come, so the child checks its parent is still the one that forked it and exits otherwise.
Elsewhere there is no such request: children are stopped by drainbus on a clean exit only.

Usage: ``subprocess.Popen(..., preexec_fn=die_with_parent())``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1
# Resolved at import: between fork and exec the child should call C, not look symbols up.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` tying the child to this process (see the module docstring).

    The child also gets a process group of its own: a Ctrl-C aimed at drainbus reaches only
    drainbus, which then stops its children in order. Call it in the parent, just before
    ``Popen``, from the main thread (where ``preexec_fn`` is safe).
    """
    return functools.partial(_in_child, os.getpid())


def _in_child(parent: int) -> None:  # pragma: no cover - runs between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before prctl: no signal would come
            os._exit(1)
    os.setpgrp()
