"""One process per workdir: the workdir checked up front and locked for the run (WORKDIR/.lock).

`lock(workdir)` creates the workdir, checks that it is a writable directory, and takes an exclusive
fcntl.flock on WORKDIR/.lock, writing the holder's pid and host into it. A second run on the same workdir stops at
once with WorkdirError naming that pid and host. The kernel releases a flock when its process ends, however it
ends (kill -9 included), so a lock file left by a dead process never blocks a rerun: the next run takes it over and
logs a warning naming the old holder. On a clean exit the file is emptied and unlocked, not removed (removing it
would let a run that had opened the old file and a later run lock two different files).

Multi-host runs: only process 0 takes the lock (main.py). A URL workdir (gs://...) is not locked (object stores
have no locks); a local or NFS path is.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket

from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.core.errors import ConfigError

LOCK_FILE = ".lock"


class WorkdirError(ConfigError):
    """The workdir (--workdir) cannot be used: not a directory, not writable, or locked by another run."""


def _holder(text: str) -> str:
    """'pid 123 on host h' from a lock file's 'pid=123 host=h' line (or the raw text)."""
    fields = dict(f.split("=", 1) for f in text.split() if "=" in f)
    if "pid" in fields:
        return f"pid {fields['pid']} on host {fields.get('host', '?')}"
    return repr(text.strip()[:80])


def prepare(workdir: str) -> str:
    """The workdir made (with its parents) if missing; WorkdirError if it is a file or cannot be written."""
    path = ckpt_lib.resolve(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir={workdir}: {path} is a file; expected a directory (or a path to create)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir}: cannot create {path} ({e.strerror}); expected a directory this "
                           f"user can create and write") from None
    return path


@contextlib.contextmanager
def lock(workdir: str):
    """Hold WORKDIR/.lock for the block (see the module doc). Yields the lock file's path (None for a URL)."""
    if ckpt_lib.is_url(workdir):
        logging.info("workdir %s is a URL: not locked (one run at a time is up to you)", workdir)
        yield None
        return
    path = os.path.join(prepare(workdir), LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir}: cannot write {path} ({e.strerror}); expected a directory this user "
                           f"can write") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"--workdir={workdir}: cannot lock {path} ({e.strerror}); expected a file system "
                                   f"with file locks (flock)") from None
            with open(path, encoding="utf-8", errors="replace") as f:
                holder = _holder(f.read())
            raise WorkdirError(f"--workdir={workdir} is in use by another run ({holder}); expected one run per "
                               f"workdir: wait for it to finish, stop it, or choose another --workdir") from None
        old = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if old.strip():
            logging.warning("workdir %s: taking over a stale lock left by %s (no longer held: that run has ended)",
                            workdir, _holder(old))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # unlocked and empty: nothing stale for the next run to report
    finally:
        os.close(fd)  # releases the flock
