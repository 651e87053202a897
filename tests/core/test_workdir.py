"""One process per workdir (pal_jax/core/workdir.py): a second run refused, a stale lock taken over, bad workdirs named."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest

from helpers import REPO, run_main
from pal_jax.core import workdir as workdir_lib

HOLD = ("import sys, time\n"
        "from pal_jax.core import workdir\n"
        "with workdir.lock(sys.argv[1]):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path):
    """A subprocess holding tmp_path/w's lock: (workdir, process)."""
    w = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(w)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield w, proc
    finally:
        proc.kill()
        proc.wait()


def test_second_run_refused_naming_the_holder(holder):
    w, proc = holder
    with pytest.raises(workdir_lib.WorkdirError) as e:
        with workdir_lib.lock(str(w)):
            pass
    assert f"is in use by another run (pid {proc.pid} on host {socket.gethostname()})" in str(e.value)
    # the CLI stops at once with one line and exit 2, before any work
    r = run_main(w, {"train.steps": 2})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: --workdir={w} is in use by another run "
                                                        f"(pid {proc.pid} on host {socket.gethostname()})")
    assert "Traceback" not in r.stderr
    assert not (w / "checkpoints").exists() and not (w / "tokenizer").exists()
    # the holder ends (kill -9: the kernel drops its lock): the next run takes the lock over
    proc.kill()
    proc.wait()
    with workdir_lib.lock(str(w)) as path:
        assert open(path).read() == f"pid={os.getpid()} host={socket.gethostname()}\n"


def test_stale_lock_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    w = tmp_path / "w"
    w.mkdir()
    (w / ".lock").write_text(f"pid={dead.pid} host={socket.gethostname()}\n")
    with caplog.at_level(logging.WARNING):
        with workdir_lib.lock(str(w)) as path:
            assert open(path).read() == f"pid={os.getpid()} host={socket.gethostname()}\n"
    assert f"taking over a stale lock left by pid {dead.pid} on host {socket.gethostname()}" in caplog.text
    assert (w / ".lock").read_text() == ""  # released on exit: the next run finds nothing stale
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        with workdir_lib.lock(str(w)):
            pass
    assert "stale" not in caplog.text


def test_workdir_that_is_a_file_or_read_only(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(workdir_lib.WorkdirError, match=f"--workdir={f}: {f} is a file; expected a directory"):
        with workdir_lib.lock(str(f)):
            pass
    r = run_main(f, {"train.steps": 2})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: --workdir={f}: {f} is a file; expected a directory (or a " \
                                                "path to create)"
    if os.geteuid() == 0:  # root writes any mode-0555 directory: use one the kernel keeps read-only
        ro = "/sys"
        if not os.path.isdir(ro) or os.access(os.path.join(ro, ".lock"), os.F_OK):
            pytest.skip("no read-only directory to test with as root")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    with pytest.raises(workdir_lib.WorkdirError, match=f"--workdir={ro}: cannot write {ro}/.lock"):
        with workdir_lib.lock(str(ro)):
            pass
