"""Golden loss curves: a fixed tiny Stage 1 (30 steps) then Stage 2 (20 steps) on the synthetic corpus, with every
per-step training loss stored in tests/golden/stage1_stage2_tiny.json; tests/e2e/test_golden.py reruns it and compares.

    python scripts/regen_golden.py              # rerun, write tests/golden/stage1_stage2_tiny.json
    python scripts/regen_golden.py --check      # rerun, print the largest relative difference from the stored file
    python scripts/regen_golden.py --out=PATH   # rerun, write the curves to PATH (what the test does)

A change that moves the curves (the model, the losses, the optimizer, the data order, the tokenizer, a jax upgrade)
commits the regenerated file with it, saying why the curve moved.

Every value that shapes the run is written out here (CONFIG), not taken from the presets, so a preset change does
not move the golden curve. Stage 2's pairs are built from the first PAIR_TURNS training turns without decoding
(chosen = the gold reply, rejected = the next turn's gold reply; select pairs: the labelled target against another
candidate), so the curve depends on the training code alone, not on what the tiny Stage 1 happens to decode.
Runs on DEVICES fake CPU devices of a host split into 8 (as tests/conftest.py does), with XLA_FLAGS below set before
jax is imported, whatever the environment says: the curves are those of these flags. Run it as its own process (the
test does): in a process where jax has started already the flags would not apply.
"""
from __future__ import annotations

import os

# XLA's CPU backend at LLVM -O0: these tiny programs are compile-bound, and it compiles them several times faster
# (tests/e2e/test_multihost.py does the same); the curves are those of these flags, set whatever the environment says
XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = XLA_FLAGS
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "stage1_stage2_tiny.json"
DEVICES = 2  # a 2-device data-parallel mesh (the tiny preset's mesh.cpu_devices)
PAIR_TURNS = 40  # training turns the Stage 2 pairs come from
CONFIG = {
    "seed": 0,
    "init_from": "",
    # the model: a 2-layer llama-style transformer, d_model 32
    "model.family": "llama", "model.vocab_size": 0, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
    "model.n_kv_heads": 1, "model.head_dim": 0, "model.d_ff": 64, "model.max_len": 128, "model.rope_theta": 10000.0,
    "model.norm_eps": 1e-5, "model.tie_embeddings": True, "model.vocab_multiple": 1, "model.dtype": "float32",
    "model.param_dtype": "float32", "model.remat": False, "model.init_std": 0.02,
    "lora.rank": 0,
    "tokenizer.path": "", "tokenizer.train_vocab_size": 400,
    # 40 synthetic dialogues split 32 / 4 / 4; one bucket of 128 tokens (one compiled shape per step function)
    "data.source": "synthetic", "data.synthetic_dialogues": 40, "data.synthetic_seed": 1234, "data.split_seed": 0,
    "data.dev_fraction": 0.1, "data.test_fraction": 0.1, "data.labeler": "overlap", "data.max_len": 128,
    "data.buckets": (128,), "data.select_ratio": 0.5, "data.persona_weight": 1.0,
    "train.batch_size": 8, "train.grad_accum": 1, "train.steps": 30, "train.lr": 3e-3, "train.end_lr_ratio": 0.1,
    "train.warmup_steps": 5, "train.schedule": "cosine", "train.weight_decay": 0.01, "train.b1": 0.9,
    "train.b2": 0.98, "train.clip_norm": 1.0, "train.log_every": 1, "train.eval_every": 1000,
    "train.eval_batches": 2, "train.checkpoint_every": 1000, "train.keep_checkpoints": 1,
    "train.async_checkpoint": False, "train.max_bad_steps": 5, "train.sample_turns": 0,
    "train.peak_tflops": 1.0,  # MFU only; a fixed peak skips the CPU matmul measurement (no effect on the losses)
    "stage2.steps": 20, "stage2.lr": 3e-4, "stage2.batch_size": 4, "stage2.warmup_steps": 2,
    "stage2.loss_type": "sigmoid", "stage2.beta": 0.1, "stage2.label_smoothing": 0.0,
    "stage2.norm_use_reference": True, "stage2.simpo_gamma": 0.0, "stage2.use_dpo": True, "stage2.sft_weight": 1.0,
    "stage2.align_weight": 0.1, "stage2.align_temperature": 0.1, "stage2.precompute_ref": False,
    "stage2.reference": "stage1", "stage2.dev_fraction": 0.2,
    "mesh.data": DEVICES, "mesh.fsdp": 1, "mesh.tensor": 1,
}
# per-step training metrics kept (metrics.jsonl "train/<name>", logged every step)
KEYS = {"stage1": ("loss", "select_loss", "generate_loss"), "stage2": ("loss", "dpo_loss", "chosen_nll")}


def make_config(mode: str, **extra):
    """configs/common.py's key set for `mode` with every CONFIG value (and `extra`: 'a.b' keys) set."""
    from configs import common
    c = common.base_config(mode, "tiny")
    for key, value in {**CONFIG, **extra}.items():
        section, _, name = key.rpartition(".")
        (c[section] if section else c)[name] = value
    from pal_jax.config import validate
    validate(c)
    return c


def write_pairs(config, path: str) -> int:
    """Stage 2 pairs from the first PAIR_TURNS training turns, without decoding (module doc)."""
    from pal_jax.data import convai2, corpus, templates
    records = convai2.records_from_dialogues(corpus.load_corpus(config.data)["train"])[:PAIR_TURNS + 1]
    rows = []
    for i, r in enumerate(records[:PAIR_TURNS]):
        base = {"id": r.id, "persona": list(r.persona), "history": list(r.history), "persona_label": r.persona_label}
        rows.append({**base, "kind": "generate", "chosen": r.response, "rejected": records[i + 1].response})
        label = r.persona_label
        rows.append({**base, "kind": "select", "chosen": templates.select_target(list(r.persona), label),
                     "rejected": templates.select_target(list(r.persona), -1 if label >= 0 else 0)})
    with open(path, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in rows)
    return len(rows)


def _curves(workdir: str, keys) -> dict:
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    out = {k: [r[f"train/{k}"] for r in rows if f"train/{k}" in r] for k in keys}
    out["dev/loss"] = [r["dev/loss"] for r in rows if "dev/loss" in r][-1]
    return out


def run_curves(root: str) -> dict:
    """Train the golden Stage 1 and Stage 2 under `root`; their per-step losses (and the final held-out loss)."""
    import jax
    from pal_jax.training import stage1
    from pal_jax.training import stage2
    devices = jax.devices()[:DEVICES]
    s1, s2, pairs = (os.path.join(root, x) for x in ("s1", "s2", "pairs.jsonl"))
    c1 = make_config("stage1")
    stage1.run(c1, s1, devices=devices)
    write_pairs(c1, pairs)
    c2 = make_config("stage2", **{"init_from": s1, "stage2.pairs": pairs})
    stage2.train_stage2(c2, s2, devices=devices)
    return {"stage1": _curves(s1, KEYS["stage1"]), "stage2": _curves(s2, KEYS["stage2"])}


def versions() -> dict:
    return {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy", "tokenizers")}


def max_rel_diff(a: dict, b: dict) -> float:
    """The largest |x - y| / max(|y|, 1e-12) over every stored value (b: the reference)."""
    worst = 0.0
    for stage in ("stage1", "stage2"):
        for k, ys in b[stage].items():
            xs = a[stage][k]
            xs, ys = (xs, ys) if isinstance(ys, list) else ([xs], [ys])
            worst = max([worst] + [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(xs, ys)])
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the stored file instead of writing it")
    ap.add_argument("--out", default=str(GOLDEN), help="where to write the curves (default: the golden file)")
    args = ap.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as root:
        curves = run_curves(root)
    took = time.time() - t0
    if args.check:
        stored = json.loads(GOLDEN.read_text())
        print(f"largest relative difference from {GOLDEN}: {max_rel_diff(curves, stored):.3g} ({took:.0f} s); "
              f"stored versions {stored['versions']}, here {versions()}")
        return 0
    out = {"about": "scripts/regen_golden.py: per-step training losses of a fixed tiny Stage 1 (30 steps) and "
                    "Stage 2 (20 steps); tests/e2e/test_golden.py compares a fresh run",
           "versions": versions(), "xla_flags": XLA_FLAGS, "devices": DEVICES, "pair_turns": PAIR_TURNS,
           "config": {k: list(v) if isinstance(v, tuple) else v for k, v in CONFIG.items()}, **curves}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
