"""Small configs and subprocess helpers shared by the tests."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
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


def decode_in_pieces(m, tokens, positions, key_mask, p: int, slots: int):
    """Inside a jit, the ways a KV cache is filled: a p-token prefill into a fresh cache of `slots`, a 3-token chunk
    at cache index p (as candidate scoring does), then one token at a time in a fori_loop (traced cache_index).
    -> (logits [B,T,V] of every position, the final cache, the prefill's logits, the cache after the prefill)."""
    b, t = tokens.shape
    first, _, cache = m.decode(tokens[:, :p], m.init_cache(b, slots), positions=positions[:, :p],
                               cache_index=jnp.int32(0), key_mask=key_mask)
    prefill_cache = cache
    out = jnp.zeros((b, t, first.shape[-1]), jnp.float32).at[:, :p].set(first)
    chunk, _, cache = m.decode(tokens[:, p:p + 3], cache, positions=positions[:, p:p + 3], cache_index=jnp.int32(p),
                               key_mask=key_mask)
    out = out.at[:, p:p + 3].set(chunk)

    def body(i, carry):
        out, cache = carry
        tok = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
        pos = jax.lax.dynamic_slice_in_dim(positions, i, 1, axis=1)
        lg, _, cache = m.decode(tok, cache, positions=pos, cache_index=i, key_mask=key_mask)
        return jax.lax.dynamic_update_slice_in_dim(out, lg, i, axis=1), cache

    out, cache = jax.lax.fori_loop(p + 3, t, body, (out, cache))
    return out, cache, first, prefill_cache
