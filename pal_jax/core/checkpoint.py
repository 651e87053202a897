"""Orbax checkpoints: params, optimizer state, and a JSON record (step, data position, resolved config), each
step verified on restore.

Layout: WORKDIR/checkpoints/<step>/{params,opt_state,meta,pal_checksums.json}, and `extra` for a task whose
`extra` changes during training (training.loop.ReferenceSync: Stage 2's TR-DPO reference). Orbax writes each step into a
temporary directory and renames it when complete, so a crash or SIGKILL mid-save leaves the previous step as the
latest readable one. Once a save has completed, process 0 records the size and SHA-256 of every file of the step in
`pal_checksums.json` (written to a temporary file and renamed). Restoring checks them first, then reads the meta
record and the arrays: a step that fails any of these (a damaged or truncated file, a missing one such as
params/_METADATA, a cut meta JSON) is skipped with a warning naming the step and what was wrong, and the next
older step is tried (a step whose files match their checksums but do not fit the run's model is an error, not a
reason to fall back). A training run moves the bad step to WORKDIR/checkpoints_bad/<step> (never deleted); readers
(load_params, load_meta: predict, evaluate, Stage 2) leave it in place. When no step is readable, CheckpointError
names the folder and what to do. A step without a checksum file (saved by an older version, or a run killed
between the save and the checksum) is restored unverified, with a warning.

Restoring takes abstract targets with shardings, so a checkpoint written on one mesh restores onto another.
Multi-host: every process calls save and restore (each writes and reads its own shards; Orbax coordinates them);
the workdir must be a location all processes share (gs://..., NFS). Paths go through etils.epath: a local path is
made absolute as before, a URL (gs://bucket/run) is kept as it is.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from pal_jax.core import atomic, preemption
from pal_jax.core import mesh as mesh_lib
from pal_jax.core.errors import CheckpointError, ConfigError


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


CHECKSUMS = "pal_checksums.json"
BAD_DIR = "checkpoints_bad"  # beside checkpoints/: damaged steps moved aside by a training run


def _step_dir(directory: str, step: int) -> epath.Path:
    return epath.Path(directory) / str(step)


def _files(step_dir: epath.Path) -> dict[str, epath.Path]:
    """Every file of a step folder by its relative path (the checksum file left out)."""
    out, todo = {}, [step_dir]
    while todo:
        for p in sorted(todo.pop().iterdir()):
            if p.is_dir():
                todo.append(p)
            elif p.name != CHECKSUMS or p.parent != step_dir:
                out[os.fspath(p.relative_to(step_dir))] = p
    return dict(sorted(out.items()))


def file_digest(path: epath.Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a file, read in 4 MiB chunks (a local path or an epath URL)."""
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


_VERIFIED: dict[tuple[str, int], str | None] = {}  # (folder, step) -> problem; hashed once per process


def write_checksums(directory: str, step: int) -> None:
    """Record the size and SHA-256 of every file of a completed step (process 0; written whole, then renamed)."""
    step_dir = _step_dir(directory, step)
    if not step_dir.is_dir():  # already removed by max_to_keep
        return
    files = {rel: dict(zip(("size", "sha256"), file_digest(p))) for rel, p in _files(step_dir).items()}
    atomic.write_json(step_dir / CHECKSUMS, {"step": step, "files": files}, indent=1)
    _VERIFIED.pop((os.fspath(directory), int(step)), None)


def verify(directory: str, step: int) -> str | None:
    """What is wrong with a step's files ('' when it has no checksum file: unverified), None when they match."""
    key = (os.fspath(directory), int(step))
    if key in _VERIFIED:
        return _VERIFIED[key]
    step_dir = _step_dir(directory, step)
    path = step_dir / CHECKSUMS
    if not path.exists():
        return ""
    try:
        recorded = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        problem = f"its checksum file {path} is unreadable ({type(e).__name__}: {e})"
    else:
        problem = None
        for rel, want in recorded.items():
            p = step_dir / rel
            if not p.exists():
                problem = f"{rel} is missing"
                break
            size, digest = file_digest(p)
            if size != want["size"]:
                problem = f"{rel} is {size} bytes, expected {want['size']} (truncated or overwritten)"
                break
            if digest != want["sha256"]:
                problem = f"{rel} does not match its SHA-256 checksum (damaged on disk)"
                break
    _VERIFIED[key] = problem
    return problem


def _brief(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _none_readable(directory: str, bad: list[tuple[int, str]]) -> CheckpointError:
    listing = "; ".join(f"step {s}: {why}" for s, why in bad)
    return CheckpointError(
        f"no readable checkpoint in {directory}: {listing}. Expected at least one intact step: copy an intact "
        f"checkpoint into {directory}, or move {directory} away (the damaged steps are kept there) and rerun the "
        f"same command to train from step 0")


def _read_newest(directory: str, steps, read: Callable[[int], Any], move_aside: Callable | None = None):
    """(step, read(step)) for the newest step that verifies and reads, None when there are no steps. The damaged
    steps above it are warned about (and moved aside when move_aside is given); when none reads, CheckpointError
    and nothing is moved."""
    bad = []
    for step in sorted(steps, reverse=True):
        problem = verify(directory, step)
        if problem == "":
            logging.warning("checkpoint %s step %d has no %s (saved by an older version, or the run stopped before "
                            "writing it): restoring it unverified", directory, step, CHECKSUMS)
        if not problem:
            try:
                out = read(step)
            except (preemption.Preempted, ConfigError):
                raise  # SIGTERM; the saved config differs (the user's settings, not damage)
            except Exception as e:  # noqa: BLE001 (TensorStore, pytree structure, JSON errors: a damaged step)
                if problem is None:  # intact files (checksums match): the request does not fit, no fallback
                    raise CheckpointError(
                        f"checkpoint {directory} step {step}: its files match their checksums, but it cannot be "
                        f"restored for this run ({_brief(e)}); expected this run's model, LoRA and tokenizer "
                        f"settings to be the checkpoint's (its meta record holds them)") from e
                problem = f"it cannot be read ({_brief(e)})"
            else:
                for s, why in bad:
                    where = move_aside(s) if move_aside else None
                    logging.warning("checkpoint %s step %d is damaged: %s; %s; using step %d", directory, s, why,
                                    f"moved to {where}" if where else "left in place", step)
                return step, out
        bad.append((step, problem))
    if bad:
        raise _none_readable(directory, bad)
    return None


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
        self.directory = os.fspath(epath.Path(resolve(workdir)) / "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._unsummed: list[int] = []  # saved steps whose checksums are not written yet
        self._saving: int | None = None

    @staticmethod
    def exists(workdir: str) -> bool:
        """True when WORKDIR/checkpoints holds at least one complete step (a run to resume)."""
        d = epath.Path(resolve(workdir)) / "checkpoints"
        return d.is_dir() and any(n.name.isdigit() for n in d.iterdir())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _failed(self, e: BaseException) -> CheckpointError:
        step = self._saving
        return CheckpointError(
            f"checkpoint save{f' of step {step}' if step is not None else ''} to {self.directory} failed: "
            f"{_brief(e)}; stopping. Expected a writable folder with free space: free space there (or lower "
            f"config.train.keep_checkpoints), then rerun the same command to resume from the last complete step")

    def _sum_finished(self) -> None:
        """Write the checksums of the saves that have completed (process 0)."""
        if self._unsummed and not self.manager.is_saving_in_progress():
            steps, self._unsummed = self._unsummed, []
            if jax.process_index() == 0:
                for step in steps:
                    write_checksums(self.directory, step)

    def check(self) -> None:
        """Raise CheckpointError if a background save failed; record the checksums of completed saves."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 (disk full: RESOURCE_EXHAUSTED, OSError, ...)
            raise self._failed(e) from e
        self._sum_finished()

    def save(self, step: int, params, opt_state, meta: dict[str, Any], force: bool = False, extra=None) -> bool:
        """Save a step (extra: a tree saved as the item `extra` when given, e.g. the TR-DPO reference)."""
        try:
            self.manager.wait_until_finished()  # Orbax waits for the previous save anyway; its checksums next
            self._sum_finished()
            self._saving = step
            items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                         meta=ocp.args.JsonSave(meta))
            if extra is not None:
                items["extra"] = ocp.args.StandardSave(extra)
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._failed(e) from e
        if saved:
            self._unsummed.append(step)
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore_meta(self, step: int) -> dict:
        """The JSON record alone (read before the arrays, so a resumed run can check its config first)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_params, abstract_opt_state, abstract_extra=None):
        """(params, opt_state, meta), and the `extra` item last when abstract_extra is given."""
        items = dict(params=ocp.args.StandardRestore(abstract_params),
                     opt_state=ocp.args.StandardRestore(abstract_opt_state), meta=ocp.args.JsonRestore())
        if abstract_extra is not None:
            items["extra"] = ocp.args.StandardRestore(abstract_extra)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        got = (out["params"], out["opt_state"], out["meta"])
        return got if abstract_extra is None else (*got, out["extra"])

    def move_aside(self, step: int) -> str:
        """Move a damaged step to WORKDIR/checkpoints_bad/<step> (a numbered suffix if taken); never deleted."""
        dest_dir = epath.Path(self.directory).parent / BAD_DIR
        where = ""
        if jax.process_index() == 0:
            dest_dir.mkdir(parents=True, exist_ok=True)
            dest, n = dest_dir / str(step), 1
            while dest.exists():
                dest, n = dest_dir / f"{step}.{n}", n + 1
            _step_dir(self.directory, step).rename(dest)
            where = os.fspath(dest)
        _VERIFIED.pop((os.fspath(self.directory), int(step)), None)
        mesh_lib.sync("damaged checkpoint moved aside")  # multi-host: the others see it gone before reloading
        self.manager.reload()
        return where or os.fspath(dest_dir / str(step))

    def restore_latest(self, abstract_params, abstract_opt_state, check_meta: Callable[[dict], None] | None = None,
                       abstract_extra=None):
        """(step, params, opt_state, meta) of the newest intact step (and its `extra` item last when abstract_extra
        is given), or None when there is none at all.

        Each step is verified (checksums), then its meta record read and passed to check_meta (which raises
        ConfigError on a config mismatch: not damage, never a fallback), then its arrays restored. A step that
        fails is moved aside with a warning and the previous one is tried; CheckpointError if none is readable."""
        def read(step):
            meta = self.restore_meta(step)
            if check_meta is not None:
                check_meta(meta)
            return self.restore(step, abstract_params, abstract_opt_state, abstract_extra)

        found = _read_newest(self.directory, self.manager.all_steps(), read, move_aside=self.move_aside)
        if found is None:
            return None
        step, out = found
        return (step, *out)

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failed(e) from e
        self._sum_finished()

    def close(self):
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 (after a failed save: the error is already being raised)
                pass


def _reader(path: str) -> tuple[ocp.CheckpointManager, str]:
    directory = checkpoint_dir(path)
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"no checkpoints at {path}: expected a workdir with a checkpoints/ folder "
                                f"(written by a stage1 run) or a checkpoints folder")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    if manager.latest_step() is None:
        manager.close()
        raise FileNotFoundError(f"no complete checkpoint in {directory}: expected at least one saved step")
    return manager, directory


def _read_latest(path: str, args_of: Callable[[], Any]) -> tuple[int, dict]:
    """The newest step of the checkpoints at `path` that verifies and reads (damaged ones warned about and left in
    place: this process may not own that workdir)."""
    manager, directory = _reader(path)
    try:
        step, out = _read_newest(directory, manager.all_steps(),
                                 lambda s: manager.restore(s, args=ocp.args.Composite(**args_of())))
    finally:
        manager.close()
    return step, out


def load_params(path: str, abstract_params):
    """Params only (init_from, reference model, evaluation), restored onto the shardings in `abstract_params`,
    from the newest intact step."""
    step, out = _read_latest(path, lambda: {"params": ocp.args.StandardRestore(abstract_params)})
    return out["params"], step


def load_meta(path: str) -> dict:
    """The meta record of the newest intact step (the step load_params reads)."""
    return _read_latest(path, lambda: {"meta": ocp.args.JsonRestore()})[1]["meta"]


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
