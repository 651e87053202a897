"""Ahead-of-time compile: the Stage 1 and Stage 2 train steps for a TPU topology, compiled on this (CPU) machine.

    .venv-tpu/bin/python -m pal_jax.main --config=configs/compile.py:llama3_8b --workdir=W \
        --config.compile.topology=v5p-64 ...

libtpu (requirements-tpu.txt, kept out of the default requirements) describes a TPU slice without owning one:
`jax.experimental.topologies.get_topology_desc` returns its devices, a Mesh over them takes the run's mesh config,
and `jax.jit(step).lower(abstract args).compile()` runs the TPU compiler. Every argument is abstract
(jax.ShapeDtypeStruct with its NamedSharding): params, the optimizer state (jax.eval_shape of the optax init), the
batch, and for Stage 2 the frozen reference params (a separate, non-donated argument). Nothing of the model's size
is allocated here. The steps are the ones training runs: train.make_train_step over stage1.sft_loss_fn and
stage2.make_loss_fn, with the same optimizer, donation and output shardings; the batch keys and dtypes come from
the real batch sources (pipeline.BatchSource, stage2.PairSource) at one bucket of length compile.seq_len.

The compiled executable's memory_analysis() gives bytes per device: arguments, outputs, aliased (donated
arguments reused as outputs), temporaries and generated code. Total = arguments + outputs - alias + temporaries +
generated code, compared with the chip's HBM. Its cost_analysis() gives XLA's estimate of the FLOPs and the bytes
accessed of one step on one device (the partitioned program); a Pallas kernel (model.attention='splash') is a custom
call XLA does not look into, so its FLOPs and bytes are not in these figures. The table is printed and written to
WORKDIR/compile_<topology>.json and .md.

compile.topology "cpu" compiles for this machine's devices instead (no libtpu; what the tests use).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import time

import jax
import numpy as np
from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.core import mesh as mesh_lib
from pal_jax.core import optim
from pal_jax.data import pipeline
from pal_jax.model.spec import ModelSpec, model_config
from pal_jax.training import loop as train
from pal_jax.training import stage1, stage2

GIB = 1024 ** 3
LIBTPU_MISSING = "libtpu not installed: pip install -r requirements-tpu.txt"

# HBM per device (one chip: v4 and v5p count as one megacore device per chip), GiB.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as libtpu's topology description takes it."""
    name: str  # the user-facing name, e.g. "v5p-64"
    generation: str  # key of HBM_GIB
    topology_name: str  # libtpu's, e.g. "v5p:2x4x4"
    chip_config_name: str  # "megacore" (v4, v5p: both TensorCores of a chip as one device) or "default"
    chips_per_host_bounds: tuple[int, int, int]
    chips: int


# Accelerator names -> chip layouts. For v4 and v5p the number in the name counts TensorCores (two per chip), so
# v5p-64 is 32 chips, laid out 2x4x4; for v5e and v6e it counts chips (one TensorCore each), so v5e-256 is 16x16.
# The shapes are the standard slice shapes of the Cloud TPU docs (the same table as MaxText's
# accelerator_to_spec_map). Hosts hold 2x2x1 chips. Other shapes: pass "GEN:AxBxC" (e.g. "v5p:4x4x8").
_SHAPES = {
    "v4": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8",
           1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"},
    "v5p": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8",
            1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16", 8192: "16x16x16"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}
_MEGACORE = ("v4", "v5p")  # two TensorCores per chip, counted in the name, one device per chip
_ALIASES = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
# libtpu's spelling of each generation in a topology name
_LIBTPU_GEN = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}


def _table_shape(gen: str, size: int) -> str:
    try:
        return _SHAPES[gen][size]
    except KeyError:
        raise ValueError(f"config.compile.topology = '{gen}-{size}': no standard shape known; expected one of "
                         f"{', '.join(f'{gen}-{n}' for n in _SHAPES[gen])}, or an explicit 'GEN:AxB[xC]' "
                         f"(e.g. '{gen}:{next(iter(_SHAPES[gen].values()))}')") from None


def parse_topology(name: str) -> Topology:
    """"v5p-64" (accelerator name) or "v5p:2x4x4" (generation:chip shape) -> Topology."""
    s = name.strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", s)
    m2 = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", s)
    if not (m or m2):
        raise ValueError(f"config.compile.topology = {name!r}: expected an accelerator name like 'v5p-64' or "
                         f"'v5e-256', a chip shape like 'v5p:2x4x4', or 'cpu'")
    gen = _ALIASES.get((m or m2).group(1), (m or m2).group(1))
    if gen not in _SHAPES:
        raise ValueError(f"config.compile.topology = {name!r}: unknown TPU generation {gen!r}; expected one of "
                         f"{tuple(_SHAPES)}")
    if m:
        shape = _table_shape(gen, int(m.group(2)))
    else:
        shape = m2.group(2)
    dims = [int(d) for d in shape.split("x")]
    if (gen in ("v5e", "v6e")) != (len(dims) == 2):
        raise ValueError(f"config.compile.topology = {name!r}: {gen} slices are "
                         f"{'2D (AxB)' if gen in ('v5e', 'v6e') else '3D (AxBxC)'}")
    chips = math.prod(dims)
    host = (min(dims[0], 2), min(dims[1], 2), 1)
    return Topology(name=s, generation=gen, topology_name=f"{_LIBTPU_GEN[gen]}:{shape}",
                    chip_config_name="megacore" if gen in _MEGACORE else "default",
                    chips_per_host_bounds=host, chips=chips)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topo: Topology) -> list:
    """The devices of a TPU slice from libtpu's topology description (no TPU needed)."""
    if not libtpu_available():
        raise RuntimeError(f"{LIBTPU_MISSING} (compile.topology = {topo.name!r} needs it; "
                           f"compile.topology='cpu' compiles for this machine's devices)")
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.topology_name,
                                        chip_config_name=topo.chip_config_name,
                                        chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=1)
    devices = list(desc.devices)
    if len(devices) != topo.chips:
        raise RuntimeError(f"libtpu's {topo.topology_name} ({topo.chip_config_name}) has {len(devices)} devices; "
                           f"expected {topo.chips} (one per chip)")
    return devices


# ----------------------------------------------------------------------------------------------- abstract inputs
def _abstract_batch(np_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=mesh_lib.batch_sharding(mesh, v.ndim))
            for k, v in np_batch.items()}


def stage1_batch(rows: int, seq_len: int, window: int, packing: bool = False) -> dict[str, np.ndarray]:
    """A Stage 1 training batch's arrays (keys, dtypes, shapes) from the real batch source, all padding rows;
    `window` = the source's loss window (its longest target in training; pipeline.target_window). packing
    (data.packing): the packed source's batch (segment_ids, a per-token task; window = its target cap)."""
    enc = pipeline.Encoded(ids=[], prompt_len=[], task=np.zeros(0, np.int32), n_truncated=0, n_dropped=0)
    src = pipeline.batch_source(enc, rows, (seq_len,), 0, packing=packing)
    src.window = window
    if packing:
        return src.make_batch([np.zeros(0, np.int64)] * rows)
    return src.make_batch(np.full(rows, -1))


def stage2_batch(pairs: int, seq_len: int, window: int, precompute_ref: bool,
                 share_prompt: bool = False, flat_groups: int = 0) -> dict[str, np.ndarray]:
    """A Stage 2 batch from the real PairSource: [2 * pairs, seq_len] (chosen rows then rejected), or with
    share_prompt [pairs, seq_len] (one row per pair). flat_groups > 0 (stage2.flat_window): the flat loss window
    at its widest, `window` positions a row (a batch whose rows all fill the window)."""
    src = stage2.PairSource(stage2.PairEncoded([], [], [], [], [], 0, 0), pairs, (seq_len,), 0, share_prompt,
                            flat_groups=flat_groups)
    src.window = window
    src.flat_width_fixed = window if flat_groups else None
    if precompute_ref:
        src.ref_logps = np.zeros((0, 2), np.float32)
    return src.make_batch(np.full(pairs, -1))


def _opt_state(tx, ms):
    """Abstract optimizer state with the shardings training gives it (train.optimizer_shardings)."""
    shardings = train.optimizer_shardings(tx, ms)
    return ckpt_lib.abstract_like(jax.eval_shape(tx.init, ms.abstract), shardings), shardings


# --------------------------------------------------------------------------------------------------- compile
def _memory(compiled) -> dict[str, int]:
    ma = compiled.memory_analysis()
    if isinstance(ma, (list, tuple)):
        ma = ma[0]
    if ma is None:
        raise RuntimeError("the compiled executable has no memory_analysis() on this backend")
    fields = {"arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
              "alias": "alias_size_in_bytes", "temp": "temp_size_in_bytes",
              "generated_code": "generated_code_size_in_bytes"}
    out = {k: int(getattr(ma, a, 0) or 0) for k, a in fields.items()}
    out["total"] = out["arguments"] + out["outputs"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def _cost(compiled) -> dict[str, float | None]:
    """XLA's cost analysis of the compiled step (one device's program): FLOPs and bytes accessed, None where the
    backend gives none."""
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    except Exception:  # noqa: BLE001 - cost analysis is optional information
        ca = None
    ca = ca or {}
    return {k: (float(ca[a]) if a in ca else None) for k, a in (("flops", "flops"),
                                                                 ("bytes_accessed", "bytes accessed"))}


def compile_stage(stage: str, config, mesh, seq_len: int, vocab_size: int, compiler_options=None,
                  window: int = 0) -> dict:
    """Lower and compile one stage's train step on `mesh` with abstract inputs; -> a row of the report.

    window: the loss window (positions per row through the LM head, as the data sources set it from their longest
    target); 0 = seq_len, every position (the upper bound).

    compiler_options: XLA options for compile() (the tests lower the CPU backend's optimisation level)."""

    t = stage2.train_settings(config) if stage == "stage2" else config.train
    div = mesh_lib.batch_divisor(mesh) * t.grad_accum
    if t.batch_size % div:
        key = "stage2.batch_size" if stage == "stage2" else "train.batch_size"
        raise ValueError(f"config.{key} = {t.batch_size}: expected a multiple of data*fsdp*grad_accum = {div} on "
                         f"mesh {dict(mesh.shape)}")
    ms = ModelSpec(model_config(config.model, vocab_size), mesh, mesh_lib.axis_rules(config))
    tx = optim.make_optimizer(t)
    abstract_opt, opt_shardings = _opt_state(tx, ms)
    window = min(window or seq_len, seq_len)
    if stage == "stage1":
        np_batch = stage1_batch(t.batch_size, seq_len, window, bool(config.data.get("packing", False)))
        task = train.Task(name="stage1", loss_fn=stage1.sft_loss_fn, train_batch=None, eval_batches=None)
        reference = None
    else:
        np_batch = stage2_batch(t.batch_size, seq_len, window, config.stage2.precompute_ref,
                                config.stage2.get("share_prompt", False),
                                mesh_lib.batch_divisor(mesh) if config.stage2.get("flat_window", False) else 0)
        task = train.Task(name="stage2", loss_fn=stage2.make_loss_fn(ms.graphdef, config.stage2),
                          train_batch=None, eval_batches=None)
        reference = None if config.stage2.precompute_ref else ms.abstract  # same shapes and shardings as the policy
    step = train.make_train_step(ms, task, tx, t.grad_accum, opt_shardings)
    t0 = time.time()
    lowered = step.lower(ms.abstract, abstract_opt, _abstract_batch(np_batch, mesh), reference)
    t1 = time.time()
    row = {"stage": stage, "params": ms.n_params(), "global_batch": t.batch_size, "rows": np_batch["inputs"].shape[0],
           "seq_len": seq_len, "target_window": int(np_batch["win_idx"].shape[1]) if "win_idx" in np_batch else seq_len,
           "grad_accum": t.grad_accum, "reference": stage == "stage2" and reference is not None}
    try:
        compiled = lowered.compile(compiler_options=compiler_options)
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses a program that cannot fit its HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**row, "bytes": None, "gib": None, "error": str(e).strip().splitlines()[0][:500],
                "lower_s": round(t1 - t0, 2), "compile_s": round(time.time() - t1, 2)}
    t2 = time.time()
    mem, cost = _memory(compiled), _cost(compiled)
    return {**row, "bytes": mem, "gib": {k: v / GIB for k, v in mem.items()}, "flops_per_device": cost["flops"],
            "bytes_accessed_per_device": cost["bytes_accessed"], "lower_s": round(t1 - t0, 2),
            "compile_s": round(t2 - t1, 2)}


def _md_table(report: dict) -> str:
    hbm = report["hbm_gib"]
    cols = ("stage", "global batch", "rows x seq", "loss window", "args", "outputs", "alias", "temp", "code", "total",
            "HBM", "fits", "TFLOP", "accessed")
    lines = [f"Ahead-of-time compile for {report['topology']} ({report['devices']} devices of "
             f"{report['device_kind']}, mesh {report['mesh']}), preset {report['preset']}, dtype {report['dtype']}, "
             f"param_dtype {report['param_dtype']}, remat {report['remat']}, attention {report['attention']}. GiB "
             f"per device; TFLOP and accessed (GiB): XLA's cost analysis of one step on one device (a Pallas "
             f"kernel's own work is not in it).",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    notes = []
    for r in report["stages"]:
        head = [r["stage"], f"{r['global_batch']}{' pairs' if r['stage'] == 'stage2' else ''}",
                f"{r['rows']} x {r['seq_len']}", str(r["target_window"])]
        g = r["gib"]
        if g is None:
            notes.append(f"({len(notes) + 1}) {r['stage']}: the TPU compiler refused it: {r['error']}")
            cells = ["-"] * 5 + [f"over HBM ({len(notes)})", str(hbm), "no", "-", "-"]
        else:
            cells = [f"{g[k]:.2f}" for k in ("arguments", "outputs", "alias", "temp")]
            cells += [f"{g['generated_code']:.3f}", f"{g['total']:.2f}", str(hbm if hbm is not None else "n/a"),
                      r["fits"]]
            flops, accessed = r.get("flops_per_device"), r.get("bytes_accessed_per_device")
            cells += [f"{flops / 1e12:.1f}" if flops is not None else "n/a",
                      f"{accessed / GIB:.1f}" if accessed is not None else "n/a"]
        lines.append("| " + " | ".join(head + cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def run_compile(config, workdir: str, compiler_options=None) -> dict:
    """compile mode: compile each of config.compile.stages for config.compile.topology; report memory per device."""

    cc = config.compile
    stages = [s.strip() for s in str(cc.stages).split(",") if s.strip()]
    bad = [s for s in stages if s not in ("stage1", "stage2")]
    if not stages or bad:
        raise ValueError(f"config.compile.stages = {cc.stages!r}: expected a comma-separated subset of "
                         f"'stage1,stage2'")
    seq_len = int(cc.seq_len) or int(config.data.max_len)
    if not 0 < seq_len <= config.model.max_len:
        raise ValueError(f"config.compile.seq_len = {cc.seq_len}: expected in [1, model.max_len="
                         f"{config.model.max_len}] (0 = data.max_len)")
    vocab_size = int(config.model.vocab_size) or int(config.tokenizer.train_vocab_size)

    topo_name = str(cc.topology).strip().lower()
    if topo_name == "cpu":
        devices, generation, topo_desc = jax.devices(), None, "cpu"
    else:
        topo = parse_topology(topo_name)
        devices, generation, topo_desc = topology_devices(topo), topo.generation, topo.topology_name
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    hbm = HBM_GIB.get(generation) if generation else None
    logging.info("compile: %s (%s), %d devices of %s, mesh %s", topo_name, topo_desc, len(devices),
                 devices[0].device_kind, dict(mesh.shape))
    rows = []
    for stage in stages:
        logging.info("compile: lowering and compiling %s ...", stage)
        r = compile_stage(stage, config, mesh, seq_len, vocab_size, compiler_options, int(cc.target_window))
        if r["gib"] is None:
            r["fits"] = "no"
            logging.warning("compile: %s does not fit: %s", stage, r["error"])
        else:
            r["fits"] = "n/a" if hbm is None else ("yes" if r["gib"]["total"] <= hbm else "no")
            logging.info("compile: %s lowered in %.1f s, compiled in %.1f s; %.2f GiB per device", stage,
                         r["lower_s"], r["compile_s"], r["gib"]["total"])
        rows.append(r)

    report = {"topology": topo_name, "libtpu_topology": topo_desc, "devices": len(devices),
              "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "hbm_gib": hbm,
              "preset": config.preset, "dtype": config.model.dtype, "param_dtype": config.model.param_dtype,
              "remat": bool(config.model.remat), "attention": config.model.get("attention", "xla"),
              "vocab_size": vocab_size, "stages": rows}
    md = _md_table(report)
    print(md, flush=True)
    os.makedirs(workdir, exist_ok=True)
    stem = os.path.join(workdir, "compile_" + re.sub(r"[^A-Za-z0-9_.-]", "_", topo_name))
    if jax.process_index() == 0:
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=2)
        with open(stem + ".md", "w") as f:
            f.write(md)
    summary = {"report": stem + ".md", "json": stem + ".json"}
    for r in rows:
        if r["gib"] is None:
            summary[r["stage"]] = f"does not fit {hbm} GiB HBM: {r['error']}"
            continue
        summary[r["stage"]] = (f"{r['gib']['total']:.2f} GiB per device"
                               + (f" of {hbm} GiB HBM, fits: {r['fits']}" if hbm is not None else ""))
    return summary
