"""SIGTERM (preemption) in every phase: finish or abandon the unit of work, then exit 0 with
`preempted: ...; rerun the same command to resume`.

main.py installs the handler for the whole run (`handling()`). Outside a `deferred()` block, SIGTERM raises
`Preempted` in the main thread at once: the unit of work in progress (a pairs shard, a checkpoint's predictions,
tokenizer training, data encoding) is abandoned. Every output a rerun relies on is written to a temporary file and
renamed into place, so an abandoned unit leaves nothing half-written under its final name; the temporary file it
leaves (`*.tmp-PID`) is removed by the next run (`remove_orphans`). Inside `deferred()` (the training loop) SIGTERM
only sets a flag, which the loop reads at the next step boundary: it saves a checkpoint and returns.

The message names the phase (`phase()`), e.g. `preempted: SIGTERM during make_pairs (shard 2/3 not written)`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal


class Preempted(Exception):
    """SIGTERM arrived: the work in progress was abandoned (nothing half-written) or finished; exit 0, rerun."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


_requested = False
_depth = 0  # > 0 inside deferred(): SIGTERM only sets the flag
_phase = ["starting"]


def _handle(signum, frame):
    global _requested
    _requested = True
    if _depth:
        logging.warning("SIGTERM received during %s: finishing the current unit of work, then exiting", _phase[-1])
        return
    raise Preempted(f"SIGTERM during {_phase[-1]}")


def requested() -> bool:
    return _requested


def clear() -> None:
    """The request has been handled (the training loop saved a checkpoint and returns preempted)."""
    global _requested
    _requested = False


def check(what: str | None = None) -> None:
    """Raise Preempted if SIGTERM arrived (inside a deferred block earlier): a boundary between units of work."""
    if _requested:
        raise Preempted(what or f"SIGTERM during {_phase[-1]}")


@contextlib.contextmanager
def handling():
    """SIGTERM handled by this module for the block (main thread only; elsewhere the block runs unchanged)."""
    try:
        old = signal.signal(signal.SIGTERM, _handle)
    except ValueError:  # not the main thread
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
            if old is not _handle:  # the outermost block: a request not acted on ends with it
                clear()


@contextlib.contextmanager
def phase(what: str):
    """Name the work in progress in the preemption message."""
    _phase.append(what)
    try:
        yield
    finally:
        _phase.pop()


@contextlib.contextmanager
def deferred(what: str):
    """SIGTERM inside the block only sets the flag (requested()); the block finishes its unit of work itself.
    Installs the handler if main did not (a run called from Python)."""
    global _depth
    with handling(), phase(what):
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1


_ORPHAN = re.compile(r"\.tmp(-(\d+))?$")


def remove_orphans(directory, recursive: bool = True, skip=("checkpoints", "tensorboard", "profile")) -> list[str]:
    """Remove temporary files (`*.tmp-PID`, `*.tmp`) that an interrupted run left in `directory` (a local path;
    URLs are left alone). Run under the workdir lock, so no other run is writing them. Folders named in `skip`
    (Orbax cleans its own temporary checkpoint folders) are not entered. Returns the removed paths."""
    directory = os.fspath(directory)
    if "://" in directory or not os.path.isdir(directory):
        return []
    removed = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d not in skip] if recursive else []
        for name in files:
            m = _ORPHAN.search(name)
            if m and m.group(2) != str(os.getpid()):
                path = os.path.join(root, name)
                try:
                    os.remove(path)
                except OSError:
                    continue
                removed.append(path)
    if removed:
        logging.warning("removed %d temporary file(s) left by an interrupted run: %s", len(removed),
                        ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed
