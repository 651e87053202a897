"""pal_jax entry point: one absl app that dispatches on config.mode.

    python -m pal_jax.main --config=configs/stage1.py:tiny --workdir=/tmp/pal_s1 [--config.train.steps=100]

Errors in the user's input (config values, data files, the workdir) print one line, `error: <message>`, and exit 2;
a failed checkpoint save or no readable checkpoint prints one line and exits 1; --traceback adds the Python
traceback above it. SIGTERM in any phase exits 0 with `preempted: ...; rerun the same command to resume`
(pal_jax/core/preemption.py). A second run on a workdir in use stops at once (pal_jax/core/workdir.py).

Multi-host: the same command on every host, plus --distributed=on (TPU pod slices) or --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (GPU nodes, tests); SLURM / Open MPI jobs are detected (--distributed=auto). Only
process 0 prints progress and the summary.
"""
from __future__ import annotations

import contextlib
import importlib
import logging as std_logging
import os
import sys
import threading
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from pal_jax.config import MODES, validate
from pal_jax.core import compile_cache, host_malloc, preemption
from pal_jax.core import mesh as mesh_lib
from pal_jax.core import workdir as workdir_lib
from pal_jax.core.errors import CheckpointError, ConfigError
from pal_jax.core.preemption import Preempted
from pal_jax.data.convai2 import DataError

config_flags.DEFINE_config_file("config", None, "A configs/*.py file, optionally with ':preset'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, the tokenizer and reports go: a local path or "
                    "any etils.epath URL, e.g. gs://bucket/run (shared by every process of a multi-host run).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize(): 'on' always (TPU pod slices: JAX finds the coordinator, the process "
                  "count and this process's index itself), 'off' never, 'auto' when the coordinator flags below are "
                  "given or the environment shows a multi-process job (SLURM, Open MPI, TPU_WORKER_HOSTNAMES, "
                  "JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs outside TPU pods/SLURM: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
flags.DEFINE_bool("traceback", False, "On a config, data or workdir error, print the Python traceback above the "
                  "one-line 'error: ...' message (off: the message alone).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _env_is_multiprocess(env) -> bool:
    """Whether the environment shows a job of more than one process that jax.distributed can configure itself."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "2")) > 1:
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def distributed_args(mode: str, coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None, env=None) -> dict | None:
    """The keyword arguments for jax.distributed.initialize(), or None for a single-process run.

    Explicit flags are passed as given (what they leave out JAX detects); `on` initialises even when nothing in
    the environment says so (a gcloud ssh session on a TPU pod slice carries no TPU_* variables; JAX reads the TPU
    VM's metadata instead); `off` never initialises."""
    env = os.environ if env is None else env
    explicit = {k: v for k, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is not None}
    if mode == "off":
        if explicit:
            raise app.UsageError(f"--distributed=off contradicts --{', --'.join(explicit)}: expected no coordinator "
                                 f"flags with --distributed=off, or --distributed=auto/on")
        return None
    if mode not in ("auto", "on"):
        raise app.UsageError(f"--distributed={mode!r}: expected auto, on or off")
    if explicit and "coordinator_address" not in explicit and not env.get("JAX_COORDINATOR_ADDRESS") \
            and mode == "auto":
        raise app.UsageError(f"--{', --'.join(explicit)} given without --coordinator_address: expected all three "
                             f"(--coordinator_address=HOST:PORT --num_processes=N --process_id=I), or "
                             f"--distributed=on where JAX finds the coordinator itself (TPU pods, SLURM)")
    if mode == "on" or explicit or _env_is_multiprocess(env):
        return explicit
    return None


def _distributed_init():
    kwargs = distributed_args(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if kwargs is None:
        return
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    if jax.process_index() != 0:  # progress, metrics and reports come from process 0 only
        logging.set_verbosity(logging.WARNING)


# mode -> the batch sizes it splits over the mesh's data*fsdp devices: (key, times grad_accum)
BATCH_KEYS = {
    "stage1": (("train.batch_size", True),),
    "stage2": (("stage2.batch_size", True),),
    "make_pairs": (("predict.batch_size", False),),
    "pipeline": (("train.batch_size", True), ("stage2.batch_size", True), ("predict.batch_size", False)),
    "predict": (("predict.batch_size", False),),
    "evaluate": (("predict.batch_size", False),),
    "chat": (("predict.batch_size", False),),
}


def check_devices(config, n_devices: int) -> None:
    """The mesh fits the devices and each batch the mode uses divides over its data*fsdp axes: checked before the
    tokenizer and the data are prepared. ConfigError naming the keys otherwise. (export and compile: no check;
    compile targets a topology, not these devices.)"""
    if config.mode not in BATCH_KEYS:
        return
    try:
        shape = dict(zip(mesh_lib.AXES, mesh_lib.mesh_shape({a: config.mesh[a] for a in mesh_lib.AXES}, n_devices)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    errors = []
    for key, accum in BATCH_KEYS[config.mode]:
        section, name = key.split(".")
        div = shape["data"] * shape["fsdp"] * (config.train.grad_accum if accum else 1)
        value = config[section][name]
        if value % div:
            errors.append(f"config.{key} = {value}: expected a multiple of data*fsdp{'*grad_accum' if accum else ''}"
                          f" = {div} on mesh {shape} ({n_devices} devices)")
    if errors:
        raise ConfigError("invalid config for these devices:\n  " + "\n  ".join(errors))


def dispatch(config, workdir: str) -> dict:
    validate(config)  # names the allowed modes
    module, fn = MODES[config.mode]
    return getattr(importlib.import_module(module), fn)(config, workdir)


def _orbax_filter(record) -> bool:
    if "/orbax/" not in record.pathname.replace("\\", "/"):
        return True
    if record.levelno < std_logging.WARNING:
        return False
    record.exc_info, record.exc_text = None, None  # its tracebacks: one line each
    return True


def _quiet_closed_loop(hook):
    """After a failed async save, each of Orbax's pending TensorStore writes reports 'Event loop is closed' through
    sys.excepthook (hundreds of tracebacks): those are dropped; every other exception is printed as before."""
    def quiet(kind, value, tb):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        hook(kind, value, tb)
    return quiet


def _last_line_and_exit(line: str, code: int) -> None:
    """Write `line` as the last line of stderr and exit at once (os._exit) with `code`. Orbax's background threads
    of a failed save are still writing tracebacks to stderr (Python's and TensorStore's, from C): silence the Python
    ones first, and write the line in one system call, starting on a fresh line, so that a traceback line being
    written at that moment cannot split it (a clean-clone CI run once saw '    error: ... stepself._check_closed()')."""
    threading.excepthook = lambda args: None
    sys.excepthook = lambda *args: None
    sys.stdout.flush()
    sys.stderr.flush()
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (closed by the exit below)
    os.write(2, f"\n{line}\n".encode())
    os._exit(code)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    # orbax logs every save phase through absl at INFO: keep its warnings and errors only, each as one line (a
    # failed save is reported once, by pal_jax.core.checkpoint, as one 'error:' line)
    logging.get_absl_handler().addFilter(_orbax_filter)
    sys.excepthook = _quiet_closed_loop(sys.excepthook)
    try:
        _run()
    except (ConfigError, DataError) as e:  # the user's input: one line, exit 2
        if FLAGS.traceback:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as e:  # a failed save (disk full), no readable checkpoint: one line, exit 1
        if FLAGS.traceback:
            traceback.print_exc()
        _last_line_and_exit(f"error: {e}", 1)
    except Preempted as e:  # SIGTERM outside a training loop: the unit of work in progress was abandoned
        print(f"preempted: {e.what}; rerun the same command to resume", file=sys.stderr)
        sys.exit(0)


def _run():
    with preemption.handling(), preemption.phase(f"{FLAGS.config.mode} (setup)"):
        _run_handled()


def _run_handled():
    validate(FLAGS.config)
    host_malloc.setup(FLAGS.config.get("host_malloc", "auto"))  # before any backend starts its threads
    mesh_lib.cpu_devices(FLAGS.config.mesh.get("cpu_devices", 0))
    compile_cache.setup(FLAGS.config.get("compile_cache", "off"), FLAGS.config.mode)
    _distributed_init()
    check_devices(FLAGS.config, jax.device_count())
    primary = jax.process_index() == 0
    # one run per workdir: process 0 holds WORKDIR/.lock for the whole run (pal_jax/core/workdir.py)
    with workdir_lib.lock(FLAGS.workdir) if primary else contextlib.nullcontext():
        if primary:  # temporary files of an interrupted run (SIGTERM, kill -9): no other run writes here
            preemption.remove_orphans(FLAGS.workdir)
        with preemption.phase(FLAGS.config.mode):
            summary = dispatch(FLAGS.config, FLAGS.workdir)
    if primary:
        for k, v in summary.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    app.run(main)
