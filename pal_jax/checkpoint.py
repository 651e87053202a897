"""Orbax checkpoints: params, optimizer state, and a JSON record (step, data position, resolved config).

Layout: WORKDIR/checkpoints/<step>/{params,opt_state,meta}. Orbax writes each step into a temporary directory and
renames it when complete, so a crash or SIGKILL mid-save leaves the previous step as the latest readable one.
Restoring takes abstract targets with shardings, so a checkpoint written on one mesh restores onto another.
Multi-host: every process calls save and restore (each writes and reads its own shards; Orbax coordinates them);
the workdir must be a location all processes share (gs://..., NFS). Paths go through etils.epath: a local path is
made absolute as before, a URL (gs://bucket/run) is kept as it is.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


def is_url(path) -> bool:
    """gs://..., s3://... and other epath URLs (never made absolute or joined with os.path)."""
    return "://" in os.fspath(path)


def resolve(path) -> str:
    """A workdir as a string: a local path made absolute, a URL unchanged."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def checkpoint_dir(path: str) -> str:
    """A workdir or its checkpoints/ folder -> the checkpoints folder."""
    path = epath.Path(resolve(path))
    sub = path / "checkpoints"
    return os.fspath(sub if sub.is_dir() else path)


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
        self.directory = os.fspath(epath.Path(resolve(workdir)) / "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @staticmethod
    def exists(workdir: str) -> bool:
        """True when WORKDIR/checkpoints holds at least one complete step (a run to resume)."""
        d = epath.Path(resolve(workdir)) / "checkpoints"
        return d.is_dir() and any(n.name.isdigit() for n in d.iterdir())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict[str, Any], force: bool = False) -> bool:
        saved = self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore_meta(self, step: int) -> dict:
        """The JSON record alone (read before the arrays, so a resumed run can check its config first)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_params, abstract_opt_state):
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore()))
        return out["params"], out["opt_state"], out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _manager(path: str) -> tuple[ocp.CheckpointManager, int]:
    directory = checkpoint_dir(path)
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"no checkpoints at {path}: expected a workdir with a checkpoints/ folder "
                                f"(written by a stage1 run) or a checkpoints folder")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}: expected at least one saved step")
    return manager, step


def load_params(path: str, abstract_params):
    """Params only (init_from, reference model, evaluation), restored onto the shardings in `abstract_params`."""
    manager, step = _manager(path)
    out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    manager.close()
    return out["params"], step


def load_meta(path: str) -> dict:
    manager, step = _manager(path)
    out = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    manager.close()
    return out["meta"]


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
