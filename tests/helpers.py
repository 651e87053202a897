"""Small configs and subprocess helpers shared by the tests."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from flax import nnx

from conftest import REPO

# A model and corpus small enough for a few CPU steps in a test.
TINY_OVERRIDES = {
    "data.synthetic_dialogues": 60,
    "data.max_len": 128,
    "data.buckets": (64, 128),
    "model.d_model": 32,
    "model.n_layers": 1,
    "model.n_heads": 2,
    "model.n_kv_heads": 1,
    "model.d_ff": 64,
    "model.max_len": 128,
    "tokenizer.train_vocab_size": 400,
    "train.batch_size": 8,
    "train.steps": 6,
    "train.warmup_steps": 2,
    "train.log_every": 2,
    "train.eval_every": 3,
    "train.eval_batches": 2,
    "train.checkpoint_every": 3,
    # no persistent compilation cache (its default, "auto", writes to ~/.cache): tests/core/test_compile_cache.py covers it
    "compile_cache": "off",
    # no samples while training (pal_jax/training/samples.py): their first evaluation compiles a scorer and a decoder, seconds
    # per run; tests/training/test_samples.py, test_stage2.py and test_multihost.py turn them on where they check them
    "train.sample_turns": 0,
}


def tiny_config(**overrides):
    """configs/stage1.py:tiny shrunk by TINY_OVERRIDES, then `overrides` ('a__b' means config.a.b)."""
    from configs import stage1
    c = stage1.get_config("tiny")
    items = dict(TINY_OVERRIDES)
    items.update({k.replace("__", "."): v for k, v in overrides.items()})
    for key, value in items.items():
        section, _, name = key.rpartition(".")
        target = c[section] if section else c
        target[name] = value
    return c


def cli_args(overrides: dict) -> list[str]:
    out = []
    for k, v in {**TINY_OVERRIDES, **overrides}.items():
        if isinstance(v, tuple):
            v = "(" + ",".join(map(str, v)) + ",)"
        out.append(f"--config.{k}={v}")
    return out


def main_cmd(workdir, overrides=None, config="configs/stage1.py:tiny", devices: int = 1) -> tuple[list[str], dict]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "pal_jax.main", f"--config={config}", f"--workdir={workdir}",
           *cli_args(overrides or {})]
    return cmd, env


def run_main(workdir, overrides=None, devices: int = 1, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    cmd, env = main_cmd(workdir, overrides, devices=devices, **kw)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@nnx.jit
def jitted_logits(model, tokens):
    """A pal_jax model's logits (jitted): the parity tests' side of the comparison."""
    return model(tokens)[0]


def hf_logits(torch, model, tokens):
    """A transformers model's logits for int tokens [B, T], as numpy."""
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
