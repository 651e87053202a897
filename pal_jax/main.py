"""pal_jax entry point: one absl app that dispatches on config.mode.

    python -m pal_jax.main --config=configs/stage1.py:tiny --workdir=/tmp/pal_s1 [--config.train.steps=100]
"""
from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "A configs/*.py file, optionally with ':preset'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, the tokenizer and reports go (a local path).")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs outside TPU pods/SLURM: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _distributed_init():
    import jax
    if FLAGS.coordinator_address:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "JAX_COORDINATOR_ADDRESS")) and \
            int(os.environ.get("TPU_WORKER_COUNT", os.environ.get("SLURM_NTASKS", "2"))) > 1:
        jax.distributed.initialize()


# mode -> (module, function(config, workdir) -> summary dict)
MODES = {
    "stage1": ("pal_jax.stage1", "run"),
    "make_pairs": ("pal_jax.stage2", "run_make_pairs"),
    "stage2": ("pal_jax.stage2", "run"),
    "pipeline": ("pal_jax.pipeline_mode", "run"),
    "predict": ("pal_jax.predict", "run_predict"),
    "evaluate": ("pal_jax.evaluate", "run_evaluate"),
    "chat": ("pal_jax.predict", "run_chat"),
    "export": ("pal_jax.convert", "run_export"),
    "compile": ("pal_jax.aot", "run_compile"),
}


def dispatch(config, workdir: str) -> dict:
    import importlib

    from pal_jax.config import validate
    validate(config)  # names the allowed modes
    module, fn = MODES[config.mode]
    return getattr(importlib.import_module(module), fn)(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    # orbax logs every save phase through absl at INFO: keep its warnings and errors only
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname.replace("\\", "/"))
    from pal_jax.config import ConfigError, validate
    try:
        validate(FLAGS.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _distributed_init()
    summary = dispatch(FLAGS.config, FLAGS.workdir)
    for k, v in summary.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    app.run(main)
