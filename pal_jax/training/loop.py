"""Stage-agnostic training loop: restore-or-init, a jitted sharded step, eval/log/checkpoint cadence, NaN guard,
progress with ETA, performance accounting (step time, tokens/s, TFLOP/s and MFU per device: pal_jax/core/perf.py), an
optional profiler window, and a clean exit after a checkpoint on SIGTERM (preemption).

A stage supplies a `Task`: a loss written as sums (numerator, denominator, metric sums) so that micro-batches and
devices add up exactly, a training batch source whose `batch(step)` is a pure function of the step, and held-out
batches, and optionally a `sample` hook run at every evaluation (Stage 1 and Stage 2: Select then Generate on a few
fixed dev turns, pal_jax/training/samples.py). The loop owns everything else.

Multi-host: every process runs this loop. Each builds only its rows of every global batch (mesh.process_rows, passed
to the task's batch functions as `rows_of`) and the global array is assembled from them; the checkpoints are written
and restored by all processes together (Orbax); config.json, metrics and progress lines come from process 0 only.
The workdir may be any etils.epath location (gs://...) that all processes share.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.core import mesh as mesh_lib
from pal_jax.core import optim, perf, preemption
from pal_jax.core.errors import ConfigError
from pal_jax.core.metrics_writer import MetricsWriter
from pal_jax.model import lora as lora_lib
from pal_jax.model.spec import ModelSpec
from pal_jax.model.transformer import RUN_TIME_FIELDS, ModelConfig, Transformer, shard_activations
from pal_jax.training import samples as samples_lib

# loss_fn(model, batch, reference) -> (numerator, denominator, {name: sum}); the loss is numerator / denominator and
# each logged metric is its sum / denominator over the whole step (all micro-batches).
LossFn = Callable[[Transformer, dict, Any], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class ReferenceSync:
    """A task `reference` that moves during training and is checkpointed with the params (Stage 2's TR-DPO reference).

    state: a tree shaped and sharded like the trainable params (ms.abstract; with LoRA the adapters, and the loss sees
    lora.combine(frozen, state)). After every `every`-th step (steps count from 1, as logged) the loop replaces it by
    update(state, params), jitted with the state donated: on device, no host round-trip, and nothing run on the
    other steps. Each checkpoint saves it (the item `extra`) and a resumed run restores it, so resuming is exact.
    signature: the settings that define the update (recorded in the checkpoint's meta; a run resumed with other ones
    is refused, as is a run that turns the sync on or off)."""
    state: Any
    every: int
    update: Callable[[Any, Any], Any]
    signature: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Task:
    name: str
    loss_fn: LossFn
    # train_batch(step, rows_of): a pure function of the step; rows_of(n_rows) -> the indices of the rows of the
    # global batch to build (this process's, mesh.process_rows); eval_batches(rows_of) likewise
    train_batch: Callable[[int, Callable], dict[str, np.ndarray]]
    eval_batches: Callable[[Callable], Iterable[dict[str, np.ndarray]]]
    eval_name: str = "dev"
    # the loss's frozen reference (Stage 2: the reference model's params, or None with precomputed log-probs): passed
    # to every step as loss_fn's third argument, never donated or differentiated
    reference: Any = None
    data_info: dict = dataclasses.field(default_factory=dict)  # recorded in checkpoints (data position, sizes)
    # forward-only passes of the model over each batch besides the trained one (Stage 2's reference forward: 1),
    # for the FLOP count (pal_jax/core/perf.py)
    ref_forwards: int = 0
    # at every evaluation: sample(step, params, frozen) -> rows (dicts with "id", "persona", "reply", "gold_reply"),
    # printed, written to TensorBoard as text and appended to WORKDIR/samples.jsonl; every process calls it
    # (multi-host: the decoding is collective), process 0 writes. pal_jax/training/samples.py's Sampler; None = no samples
    sample: Callable[[int, Any, Any], list[dict]] | None = None
    # a reference updated from the params every few steps and checkpointed (ReferenceSync); run() sets `reference`
    reference_sync: ReferenceSync | None = None


class BadStepsError(RuntimeError):
    pass


def optimizer_shardings(tx: optax.GradientTransformation, ms: ModelSpec):
    """Shardings of tx's state: each param-shaped leaf (Adam's mu and nu, under any optax wrapper) as its param;
    the rest (step counts) replicated.

    Not the shardings XLA gives jax.jit(tx.init)'s outputs: the zeros do not depend on the params' values, so
    nothing propagates and every leaf comes out replicated, a full copy of the optimizer state on each device
    (the ahead-of-time compile for a TPU pod showed it: pal_jax/training/aot.py)."""
    by_path = {tuple(p): (x.shape, s) for (p, x), s in zip(jax.tree_util.tree_flatten_with_path(ms.abstract)[0],
                                                           jax.tree.leaves(ms.shardings))}
    rep = mesh_lib.replicated(ms.mesh)

    def pick(path, leaf):
        for i in range(len(path)):  # the param's path is a suffix of the state leaf's (e.g. [0].mu + param path)
            hit = by_path.get(tuple(path[i:]))
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, ms.abstract))


def _microbatches(batch: dict, n: int, mesh) -> dict:
    """[B, ...] -> [n, B/n, ...] with micro-batch i = rows i, i+n, ...: every micro-batch spans all devices."""
    def split(x):
        y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, mesh_lib.BATCH, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(y, jax.sharding.NamedSharding(mesh, spec))
    return jax.tree.map(split, batch)


def all_finite(tree) -> jax.Array:
    """A scalar bool: every element of every leaf is finite (one fused reduction per leaf)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(ms: ModelSpec, task: Task, tx: optax.GradientTransformation, grad_accum: int,
                    opt_shardings):
    """step(params, opt_state, batch, reference, frozen=None) -> (params, opt_state, metrics), jitted; params and
    opt_state are donated. frozen: with LoRA, the base params (never donated, never differentiated).

    A step whose loss, gradient norm or new params are not all finite is skipped: it returns the params and
    optimizer state it was given, and metrics["finite"] = 0 (1 otherwise)."""
    def sums(params, mb, reference, frozen):
        num, den, mets = task.loss_fn(ms.merge(params, frozen), mb, reference)
        return num, (den, mets)

    grad_fn = jax.value_and_grad(sums, has_aux=True)

    def step(params, opt_state, batch, reference, frozen=None):
        with shard_activations(ms.mesh, mesh_lib.BATCH):
            return _step(params, opt_state, batch, reference, frozen)

    def _step(params, opt_state, batch, reference, frozen):
        reference, frozen = jax.lax.stop_gradient((reference, frozen))
        if grad_accum == 1:
            (num, (den, mets)), grads = grad_fn(params, batch, reference, frozen)
        else:
            mbs = _microbatches(batch, grad_accum, ms.mesh)

            def body(carry, mb):
                (n, (d, m)), g = grad_fn(params, mb, reference, frozen)
                return jax.tree.map(jnp.add, carry, (n, d, m, g)), None

            zero = jax.eval_shape(lambda: (lambda o: (o[0][0], o[0][1][0], o[0][1][1], o[1]))(
                grad_fn(params, jax.tree.map(lambda x: x[0], mbs), reference, frozen)))
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            (num, den, mets, grads), _ = jax.lax.scan(body, zero, mbs)
        den = jnp.maximum(den, 1e-9)
        grads = jax.tree.map(lambda g: g / den, grads)
        loss = num / den
        gnorm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # every step: a non-finite loss, gradient or updated param (e.g. an infinite learning rate) skips the step
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm) & all_finite(new_params)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        metrics = {"loss": loss, "grad_norm": gnorm, "finite": ok.astype(jnp.float32),
                   **{k: v / den for k, v in mets.items()}}
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    return jax.jit(step, donate_argnums=(0, 1),
                   out_shardings=(ms.shardings, opt_shardings, mesh_lib.replicated(ms.mesh)))


def make_eval_step(ms: ModelSpec, task: Task):
    def step(params, batch, reference, frozen=None):
        with shard_activations(ms.mesh, mesh_lib.BATCH):
            num, den, mets = task.loss_fn(ms.merge(params, frozen), batch, reference)
        return {"num": num, "den": den, **mets}
    return jax.jit(step, out_shardings=mesh_lib.replicated(ms.mesh))


def evaluate_loss(eval_step, params, task: Task, mesh, max_batches: int = 0, frozen=None) -> dict[str, float]:
    totals: dict[str, float] = {}
    for i, batch in enumerate(task.eval_batches(_rows_of(mesh))):
        if max_batches and i >= max_batches:
            break
        out = jax.device_get(eval_step(params, mesh_lib.global_batch(batch, mesh), task.reference, frozen))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    den = max(totals.pop("den", 0.0), 1e-9)
    res = {"loss": totals.pop("num", 0.0) / den}
    res.update({k: v / den for k, v in totals.items()})
    res["perplexity"] = float(np.exp(min(res["loss"], 50.0)))
    return res


def _rows_of(mesh) -> Callable[[int], np.ndarray]:
    """rows_of(n_rows): the rows of a global batch this process builds (each host reads only its slice)."""
    return lambda n_rows: mesh_lib.process_rows(mesh, n_rows)


# shown in the progress line's own fields, not in its list of task metrics
_LOGGED_APART = ("loss", "grad_norm", "lr", "skipped_steps", "step_time_s", "tokens_per_s",
                 "tokens_per_s_per_device", "real_tokens_per_s_per_device", "real_token_frac", "tflops_per_device",
                 "mfu", "peak_tflops_per_device")


def _fmt_perf(pm: dict[str, float]) -> str:
    if not pm:
        return "no timed step (compiling)"
    out = (f"{pm['step_time_s']:.3f} s/step {pm['tokens_per_s']:,.0f} tok/s ({pm['tokens_per_s_per_device']:,.0f}"
           f"/device, {pm['real_token_frac']:.0%} real) {pm['tflops_per_device']:.3g} TFLOP/s/device")
    return out + (f" MFU {pm['mfu']:.2%}" if "mfu" in pm else "")


class _Profiler:
    """A jax.profiler trace of training steps first .. first + count - 1 (the loop's step numbers, from 1) into
    WORKDIR/profile (TensorBoard's profile plugin or Perfetto read it); count 0 = off. Starting and stopping the
    trace wait for the queued steps; before()/after() return the seconds they took, which the timing leaves out."""

    def __init__(self, workdir: str, first: int, count: int):
        self.dir = str(epath.Path(workdir) / "profile")  # a gs:// workdir stays a URL
        self.first, self.last = int(first), int(first) + int(count) - 1
        self.enabled = int(count) > 0 and int(first) > 0
        self.on = self.done = False

    def __enter__(self):
        return self

    def before(self, step_num: int, params) -> float:
        if not self.enabled or self.on or self.done or not self.first <= step_num <= self.last:
            return 0.0
        jax.block_until_ready(params)
        t0 = time.time()
        jax.profiler.start_trace(self.dir)
        self.on = True
        logging.info("profiler: tracing steps %d..%d into %s", step_num, self.last, self.dir)
        return time.time() - t0

    def after(self, step_num: int, metrics) -> float:
        if not self.on or step_num < self.last:
            return 0.0
        jax.block_until_ready(metrics)
        t0 = time.time()
        self._stop()
        return time.time() - t0

    def _stop(self):
        jax.profiler.stop_trace()
        self.on, self.done = False, True
        logging.info("profiler: trace written under %s", self.dir)

    def __exit__(self, *exc):
        if self.on:  # the run ended inside the window (last step, preemption, an error)
            self._stop()


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run(config, workdir: str, task: Task, ms: ModelSpec, init_params=None, frozen=None,
        settings=None) -> dict[str, Any]:
    """Train `task` for config.train.steps; resume from WORKDIR/checkpoints if present.

    settings: the train.* section to train with when a stage has its own (Stage 2: stage2.train_settings, train.*
    extended by stage2.{steps, lr, batch_size, warmup_steps}); None: config.train.
    init_params: params for a fresh run (e.g. loaded from config.init_from); None -> random init from config.seed.
    frozen: with LoRA (ms.lora), the base params, required: passed to every step, never updated, donated or
    checkpointed (only the adapters and their optimizer state are).
    Returns a summary with the final held-out metrics, the step reached and whether the run was preempted.
    """
    if (ms.lora is not None) != (frozen is not None):
        raise ValueError("train.run: expected the frozen base params exactly when the model has LoRA adapters "
                         f"(ms.lora = {ms.lora}, frozen given: {frozen is not None})")
    t_cfg = config.train if settings is None else settings  # a stage's own schedule (Stage 2: stage2.train_settings)
    primary = mesh_lib.is_primary()
    if primary:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = ms.mesh
    div = mesh_lib.batch_divisor(mesh) * t_cfg.grad_accum
    if t_cfg.batch_size % div:
        raise ValueError(f"config.train.batch_size = {t_cfg.batch_size}: expected a multiple of "
                         f"data*fsdp*grad_accum = {div} on mesh {dict(mesh.shape)}")
    tx = optim.make_optimizer(t_cfg)
    opt_shardings = optimizer_shardings(tx, ms)
    abstract_opt = jax.eval_shape(tx.init, ms.abstract)
    abstract_opt = ckpt_lib.abstract_like(abstract_opt, opt_shardings)

    ckpt = ckpt_lib.Checkpointer(workdir, keep=t_cfg.keep_checkpoints, async_save=t_cfg.async_checkpoint)
    config_json = json.loads(config.to_json_best_effort())
    sync = task.reference_sync
    # the newest intact step (checksums verified; a damaged one moved aside with a warning: pal_jax/core/checkpoint.py);
    # its saved config is checked first: a different model shape is named by its key, not by Orbax's shape error
    found = ckpt.restore_latest(ms.abstract, abstract_opt,
                                lambda meta: _check_resume(meta, config_json, task, ckpt.directory),
                                abstract_extra=None if sync is None else ms.abstract)
    latest = None if found is None else found[0]
    if found is not None:
        _, params, opt_state, meta = found[:4]
        if sync is not None:
            sync.state = found[4]  # the moved reference of that step (the initial one is dropped)
        start = int(meta["step"])
        logging.info("resumed from %s step %d", ckpt.directory, start)
        if start >= t_cfg.steps:
            logging.info("the run is complete (step %d of %d): nothing to do (raise the configured steps to train further)",
                         start, t_cfg.steps)
    else:
        params = init_params if init_params is not None else ms.init(config.seed)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        start = 0
    if not bool(jax.jit(all_finite)(params)):  # the step keeps params finite from here on: never save others
        where = (f"{ckpt.directory} step {start}" if latest is not None else f"config.init_from "
                 f"{config.init_from!r}" if init_params is not None else f"random init (seed {config.seed})")
        raise BadStepsError(f"the initial params ({where}) are not all finite; expected finite params to train")
    if primary:
        (epath.Path(workdir) / "config.json").write_text(json.dumps(config_json, indent=2))

    if sync is not None:
        task.reference = _reference_of(sync.state, frozen)
        sync_fn = jax.jit(sync.update, donate_argnums=0, out_shardings=ms.shardings)
    train_step = make_train_step(ms, task, tx, t_cfg.grad_accum, opt_shardings)
    eval_step = make_eval_step(ms, task)
    writer = MetricsWriter(workdir, enabled=primary, start_step=start)  # rows after `start` are superseded
    logging.info("%s: %s params%s, mesh %s, %d steps from step %d, global batch %d", task.name,
                 f"{ms.n_params():,}", f" (LoRA adapters; {ms.n_frozen():,} frozen)" if ms.lora else "",
                 dict(mesh.shape), t_cfg.steps, start, t_cfg.batch_size)

    forward_passes = perf.TRAIN_PASSES + task.ref_forwards
    peak, peak_src = perf.peak_flops_per_device(ms.cfg.dtype, list(mesh.devices.flat), t_cfg.peak_tflops)
    logging.info("%s", perf.describe(ms.cfg, int(config.data.max_len), forward_passes, peak, peak_src))
    # the meter sees this process's rows of each batch: per-device figures over this process's devices
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    meter = perf.Meter(ms.cfg, local_devices, peak, forward_passes)

    def meta_for(step):
        meta = {"step": step, "task": task.name, "data": {**task.data_info, "next_step": step}, "config": config_json}
        if sync is not None:
            meta["extra_sync"] = {"every": sync.every, **sync.signature}  # the key older checkpoints have
        return meta

    def save(step, force=False):
        return ckpt.save(step, params, opt_state, meta_for(step), force=force,
                         extra=None if sync is None else sync.state)

    def excluded(fn, *args):
        """Run fn (evaluation, a checkpoint save) once the queued steps are done; its time is not a step's."""
        jax.block_until_ready(params)
        t0 = time.time()
        out = fn(*args)
        meter.exclude(time.time() - t0)
        return out

    step, bad, preempted = start, 0, False
    last_finite = start  # the last step applied (or the start): the params every later checkpoint holds
    pending = None  # (step, metrics["finite"]) of the step before the one just queued: read one step late, so
    #                 the check never waits for the device

    def check(pending):
        """Count a finished step as good or bad; stop after max_bad_steps bad steps in a row."""
        nonlocal bad, last_finite
        n, finite = pending
        if bool(finite):
            bad, last_finite = 0, n
            return
        bad += 1
        logging.warning("step %d: non-finite loss, gradient or updated params: skipped (params and optimizer state "
                        "kept from step %d); %d bad step(s) in a row", n, last_finite, bad)
        if bad >= t_cfg.max_bad_steps:
            ckpt.close()
            raise BadStepsError(
                f"{bad} consecutive steps (to step {n}) had a non-finite loss, gradient or updated params "
                f"(skipped); stopping. The params are those of step {last_finite} (bad steps are never applied or "
                f"saved); latest checkpoint: {ckpt.directory} step {ckpt.latest_step()}. Expected finite steps: "
                f"lower config.train.lr or set config.train.clip_norm")
    last_eval: dict[str, float] = {}
    last_perf: dict[str, float] = {}
    seen_shapes: set = set()  # batch shapes the step has been compiled for
    t_start, window = None, []
    saved_step = latest  # the newest step saved (or being saved): never saved twice (StepAlreadyExistsError)
    # SIGTERM in the loop only sets a flag: the step in progress finishes, a checkpoint is saved, the run returns
    with preemption.deferred(f"{task.name} training"), \
            _Profiler(workdir, t_cfg.profile_start, t_cfg.profile_steps) as prof:
        rows_of = _rows_of(mesh)
        lr_at = jax.jit(optim.schedule(t_cfg))  # one compile (op by op, each schedule op compiles on its own)
        while step < t_cfg.steps:
            host_batch = task.train_batch(step, rows_of)  # this process's rows of the global batch
            key = perf.shape_key(host_batch)
            compiling = key not in seen_shapes  # a new bucket shape: this step compiles
            batch = mesh_lib.global_batch(host_batch, mesh)
            meter.exclude(prof.before(step + 1, params))
            if compiling:  # compilation and this step's run are left out of the timing
                jax.block_until_ready(params)
                t0 = time.time()
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                params, opt_state, metrics = train_step(params, opt_state, batch, task.reference, frozen)
            step += 1
            if sync is not None and step % sync.every == 0:  # e.g. TR-DPO: ref <- mix(params, ref), on device
                sync.state = sync_fn(sync.state, params)
                task.reference = _reference_of(sync.state, frozen)
            if pending is not None:
                check(pending)
            pending = (step, metrics["finite"])
            if compiling:
                jax.block_until_ready(metrics)
                meter.exclude(time.time() - t0)
                seen_shapes.add(key)
            else:
                meter.add_step(host_batch)
            if t_start is None:
                t_start = time.time()  # the ETA counts from the end of the first (compiling) step
            meter.exclude(prof.after(step, metrics))
            window.append(metrics)
            if step % t_cfg.log_every == 0 or step == t_cfg.steps:
                m = {k: float(np.mean([float(x[k]) for x in window])) for k in window[0]}
                m["skipped_steps"] = float(round(len(window) * (1 - m.pop("finite"))))
                now = time.time()
                m["lr"] = float(lr_at(step))
                pm = meter.summary(now)
                if pm:
                    if peak:
                        pm["peak_tflops_per_device"] = peak / 1e12
                    last_perf = pm
                m.update(pm)
                writer.write(step, {f"train/{k}": v for k, v in m.items()})
                eta = (now - t_start) / max(step - start - 1, 1) * (t_cfg.steps - step)
                extra = " ".join(f"{k} {v:.3f}" for k, v in m.items() if k not in _LOGGED_APART)
                logging.info("step %d/%d loss %.4f %s| %s | lr %.2e | ETA %s", step, t_cfg.steps, m["loss"],
                             extra + " " if extra else "", _fmt_perf(pm), m["lr"], _fmt_time(eta))
                window = []
                meter.reset(time.time())  # writing the metrics (TensorBoard's first write: ~1 s) is no step's time
            if step % t_cfg.eval_every == 0 or step == t_cfg.steps:
                last_eval = excluded(evaluate_loss, eval_step, params, task, mesh, t_cfg.eval_batches, frozen)
                writer.write(step, {f"{task.eval_name}/{k}": v for k, v in last_eval.items()})
                logging.info("eval %s step %d: %s", task.eval_name, step,
                             " ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
                if task.sample is not None:
                    rows = excluded(task.sample, step, params, frozen)
                    for line in samples_lib.log_lines(rows):
                        logging.info("%s step %d %s", task.eval_name, step, line)
                    writer.write_samples(step, rows, f"{task.eval_name}/samples", samples_lib.markdown(rows))
            ckpt.check()  # a failed async save (disk full) stops the run here, not steps later
            if step % t_cfg.checkpoint_every == 0 or step == t_cfg.steps:
                excluded(save, step)
                saved_step = step
            if preemption.requested() and step < t_cfg.steps:  # on the last step the run is complete
                if saved_step != step:  # SIGTERM on a checkpoint step or the last one: that save is the one
                    save(step, force=True)
                    saved_step = step
                preempted = True
                break
        if pending is not None:
            check(pending)
        ckpt.close()  # waits for the last save; a SIGTERM meanwhile does not cut it
        if preempted:
            preemption.clear()  # handled here: the caller sees summary["preempted"]
    writer.close()
    summary = {"task": task.name, "step": step, "preempted": preempted, task.eval_name: last_eval,
               "perf": {**last_perf, "peak_source": peak_src},
               "checkpoints": ckpt.directory, "metrics": writer.jsonl_path, "tensorboard": writer.tb_dir}
    if task.sample is not None:
        summary["samples"] = writer.samples_path
    if preempted:
        logging.warning("preempted: checkpoint saved at step %d in %s; rerun the same command to resume", step,
                        ckpt.directory)
    return summary


def _reference_of(state, frozen):
    """The task's reference from a ReferenceSync state: with LoRA, the frozen base + the state's adapters (no copy)."""
    return state if frozen is None else lora_lib.combine(frozen, state)


# Keys added to the data and tokenizer sections after checkpoints were first written, with the value that reproduces
# the behaviour of the code before them: a checkpoint without the key resumes when the run keeps that value (a
# model key missing from a checkpoint reads as ModelConfig's default).
ADDED_KEYS = {"data.packing": False}


def _check_resume(meta: dict, config_json: dict, task: Task, directory: str) -> None:
    """A resumed run must train the same model on the same data order; say which keys differ if not."""
    old = meta.get("config", {})
    diffs = []
    want = None if task.reference_sync is None else {"every": task.reference_sync.every, **task.reference_sync.signature}
    if meta.get("extra_sync") != want:
        diffs.append(f"the moving reference (the TR-DPO reference: stage2.ref_sync_*): checkpoint has "
                     f"{meta.get('extra_sync')!r}, now {want!r} (None = off)")
    sections = ["model", "data", "tokenizer"]
    if (config_json.get("lora") or {}).get("rank", 0) or (old.get("lora") or {}).get("rank", 0):
        sections.append("lora")  # the adapters' shape and scale (a checkpoint from before LoRA has no section)
    # a model key added after the checkpoint was written (e.g. qkv_bias) reads as ModelConfig's default there
    model_defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for section in sections:
        saved = old.get(section, {})
        for k, v in config_json.get(section, {}).items():
            if section == "model" and k in RUN_TIME_FIELDS:  # how the model is computed (model.attention) may change
                continue
            was = saved[k] if k in saved else (model_defaults.get(k) if section == "model"
                                               else ADDED_KEYS.get(f"{section}.{k}"))
            if was != v:
                diffs.append(f"config.{section}.{k}: checkpoint has {was!r}, now {v!r}")
    for k in ("seed", "mode"):
        if old.get(k) != config_json.get(k):
            diffs.append(f"config.{k}: checkpoint has {old.get(k)!r}, now {config_json.get(k)!r}")
    if diffs:
        raise ConfigError(f"cannot resume from {directory}: the run differs from the checkpoint's:\n  "
                          + "\n  ".join(diffs) + "\nexpected the same settings, or a new --workdir")
