"""Performance accounting: analytic model FLOPs per token, per-device peak FLOP/s, and the per-window meter that
train.py logs (step time, tokens/s/device, TFLOP/s/device, MFU).

FLOPs (`forward_flops_per_token`) count the matrix multiplies of one forward pass, 2 FLOPs per multiply-add:

    per layer:  q, k, v, o projections   2 * d * hd * (2 * n_heads + 2 * n_kv_heads)
                attention scores + values  2 * 2 * T * n_heads * hd   (T = the row length: keys per query)
                MLP                        2 * d * d_ff * 3 (llama: gate, up, down) or * 2 (gpt2: fc, proj)
    LM head:    2 * d * padded_vocab on each position that goes through the head

No causal halving: model.attend() (model.attention='xla') computes the full T x T score matrix and masks it, so the
hardware does the whole product (PaLM's 6N + 12LHQT, Chowdhery et al. 2022, appendix B, counts attention the same
way; the splash kernel and model.attention='xla_chunked' skip the blocks above the diagonal, and the count stays
PaLM's). The LM head runs only on the target window (losses.window_logits: W positions per row, W = the batch's
win_idx width) when the batch has one, so its cost per token is 2 * d * V * W / T. The padded vocab is counted
because the head's matmul runs on it before the logits are sliced (stage2.flat_window's window: the same count,
W = its width). Not counted: the embedding gather (no multiplies), norms, RoPE, softmax, activations, biases, the
loss, the embedding-alignment term (B x B cosines), the optimizer update (all O(d) or less per token against
O(d^2)), and remat's recomputation (model FLOPs, not hardware FLOPs: MFU as PaLM defines it).

Training = forward + backward = 3 x forward (the backward of a matmul is two matmuls of its size: the input and
the weight gradients). Stage 1 runs 3 forward-equivalents per token. Stage 2 runs chosen and rejected as one
[2B, L] batch: the policy's 3 per token of both rows, plus 1 for the reference forward on the same rows unless
stage2.precompute_ref (its log-probs then come with the batch): 4 (or 3) per token, 8 (or 6) per pair-token
position (a pair is two rows).

Tokens: MFU uses padded tokens (rows x bucket length: what the hardware ran), the standard convention; the real
(non-pad) tokens are logged beside them. A row's real tokens are its input positions up to its last target token
(in both stages the target ends the row; everything after it is padding).

Peak FLOP/s per device: the published dense (no sparsity) figure for the chip from PEAKS, by
jax.devices()[0].device_kind and the model's compute dtype; on CPU, a short jitted matmul measured at start, in the
compute dtype, on all the run's local devices at once (fake CPU devices share the cores), divided by their number.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Mapping

import numpy as np

TRAIN_PASSES = 3.0  # forward + backward, in forward-equivalents


def forward_flops_per_token(cfg, seq_len: int, head_positions: int | None = None) -> float:
    """Matmul FLOPs of one forward pass per input position of a row of `seq_len` tokens, when `head_positions`
    positions of the row go through the LM head (default: all of them). See the module doc for what is counted."""
    T = int(seq_len)
    if T < 1:
        raise ValueError(f"seq_len = {seq_len}: expected >= 1")
    W = T if head_positions is None else int(head_positions)
    if not 0 <= W <= T:
        raise ValueError(f"head_positions = {head_positions}: expected in [0, seq_len={T}]")
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.d_ff
    proj = 2 * d * hd * (2 * h + 2 * kv)
    attn = 2 * 2 * T * h * hd
    mlp = 2 * d * f * (3 if cfg.family == "llama" else 2)
    head = 2 * d * cfg.padded_vocab * W / T
    return float(cfg.n_layers * (proj + attn + mlp) + head)


def passes(stage: str, precompute_ref: bool = False) -> float:
    """Forward-equivalents per token of a training step: stage1 3; stage2 3 (policy) + 1 (reference forward, 0
    with precompute_ref)."""
    if stage == "stage1":
        return TRAIN_PASSES
    if stage == "stage2":
        return TRAIN_PASSES + (0.0 if precompute_ref else 1.0)
    raise ValueError(f"stage = {stage!r}: expected 'stage1' or 'stage2'")


def flops_per_token(cfg, seq_len: int, *, stage: str = "stage1", head_positions: int | None = None,
                    precompute_ref: bool = False, training: bool = True) -> float:
    """Model FLOPs per token (input position) of a row of `seq_len` tokens. training=False: one forward.
    Stage 2 tokens are those of the [2B, L] batch, chosen and rejected rows both; per pair, multiply by 2 * L."""
    fwd = forward_flops_per_token(cfg, seq_len, head_positions)
    return fwd * (passes(stage, precompute_ref) if training else 1.0)


def batch_tokens(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(padded tokens, real tokens) of a host batch with inputs [R, L] and weights [R, L] (see the module doc)."""
    inputs, weights = batch["inputs"], np.asarray(batch["weights"])
    padded = int(inputs.size)
    has = weights != 0
    last = np.where(has.any(axis=1), weights.shape[1] - np.argmax(has[:, ::-1], axis=1), 0)
    return padded, int(last.sum())


def batch_flops(cfg, batch: Mapping[str, np.ndarray], forward_passes: float) -> float:
    """Model FLOPs of one step on this batch: rows x L x forward FLOPs per token x forward_passes, the LM head on
    the batch's target window (win_idx) when it has one."""
    rows, L = batch["inputs"].shape
    W = batch["win_idx"].shape[1] if "win_idx" in batch else L
    return rows * L * forward_flops_per_token(cfg, L, W) * forward_passes


def shape_key(batch: Mapping[str, np.ndarray]) -> tuple:
    """The batch's shapes and dtypes: a new key means the jitted step compiles again."""
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


# ----------------------------------------------------------------------------------------------- peak FLOP/s
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16: float  # dense TFLOP/s per chip (bf16 / fp16 inputs)
    f32: float  # dense TFLOP/s per chip for float32 inputs at JAX's default matmul precision (see below)


# Published dense peaks per chip (TFLOP/s), no structured sparsity. JAX's default precision for float32 matmuls is
# reduced (docs.jax.dev "Matmul precision": bfloat16 passes on TPU, TF32 on recent NVIDIA GPUs), so float32 runs
# count against the TPU bf16 peak and the GPU TF32 tensor-core peak. A run with
# jax_default_matmul_precision=highest does more work per FLOP than this accounts for.
PEAKS = {
    # Cloud TPU system architecture pages, "Peak compute per chip (bf16)": cloud.google.com/tpu/docs/v4 (275),
    # /v5e (197), /v5p (459), /v6e (918 TFLOP/s).
    "tpu_v4": Chip("TPU v4", 275.0, 275.0),
    "tpu_v5e": Chip("TPU v5e", 197.0, 197.0),
    "tpu_v5p": Chip("TPU v5p", 459.0, 459.0),
    "tpu_v6e": Chip("TPU v6e", 918.0, 918.0),
    # NVIDIA H100 datasheet: SXM BF16 tensor 1,979 and TF32 989 TFLOP/s "with sparsity", i.e. 989.4 and 494.7
    # dense; PCIe BF16 1,513 and TF32 756 with sparsity, i.e. 756.5 and 378 dense.
    "h100_sxm": Chip("H100 SXM", 989.4, 494.7),
    "h100_pcie": Chip("H100 PCIe", 756.5, 378.0),
    # NVIDIA H200 datasheet: H200 SXM BF16 1,979 and TF32 989 with sparsity (the H100 SXM's compute: 989.4 and
    # 494.7 dense); H200 NVL BF16 1,671 and TF32 835 with sparsity (835.5 and 417.5 dense).
    "h200": Chip("H200 SXM", 989.4, 494.7),
    "h200_nvl": Chip("H200 NVL", 835.5, 417.5),
}

# jax device_kind strings (lower case) -> PEAKS key. TPU v5e reports "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite";
# the H100 SXM reports "NVIDIA H100 80GB HBM3".
_KINDS = (
    ("tpu v4", "tpu_v4"),  # exact (not "tpu v4 lite", the inference chip, which has no entry)
    ("tpu v5 lite", "tpu_v5e"), ("tpu v5e", "tpu_v5e"),
    ("tpu v5", "tpu_v5p"), ("tpu v5p", "tpu_v5p"),
    ("tpu v6 lite", "tpu_v6e"), ("tpu v6e", "tpu_v6e"),
)


def chip_for(device_kind: str) -> str | None:
    """PEAKS key of a jax device_kind, or None when the table has no entry (CPU, other accelerators)."""
    k = " ".join(str(device_kind).lower().split())
    for kind, key in _KINDS:
        if k == kind:
            return key
    if "h200" in k:
        return "h200_nvl" if "nvl" in k else "h200"
    if "h100" in k:
        if "pcie" in k:
            return "h100_pcie"
        return None if "nvl" in k else "h100_sxm"  # H100 NVL: another figure, not in the table
    return None


def _compute_is_16bit(dtype: str) -> bool:
    return str(dtype) in ("bfloat16", "float16")


def table_peak(device_kind: str, dtype: str) -> float | None:
    """Published dense peak FLOP/s per device for this device kind and compute dtype; None if not in PEAKS."""
    key = chip_for(device_kind)
    if key is None:
        return None
    chip = PEAKS[key]
    return (chip.bf16 if _compute_is_16bit(dtype) else chip.f32) * 1e12


@functools.lru_cache(maxsize=None)
def _measured_cpu_peak(dtype: str, device_ids: tuple[int, ...], n: int, budget_s: float) -> float:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = [d for d in jax.local_devices() if d.id in device_ids]
    mesh = Mesh(np.asarray(devices), ("d",))
    sh = NamedSharding(mesh, P("d"))
    k = len(devices)
    dt = jnp.dtype(dtype)
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((k, n, n)), dt), sh)
    b = jax.device_put(jnp.asarray(np.random.default_rng(1).standard_normal((k, n, n)), dt), sh)
    mm = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), out_shardings=sh)
    mm(a, b).block_until_ready()  # compile
    best, spent, reps = float("inf"), 0.0, 0
    while reps < 2 or (spent < budget_s and reps < 20):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        dt_s = time.perf_counter() - t0
        best, spent, reps = min(best, dt_s), spent + dt_s, reps + 1
    return 2.0 * n ** 3 / best  # per device: each device ran one n x n x n matmul concurrently


def measure_cpu_peak(dtype: str = "float32", devices=None, n: int = 512, budget_s: float = 0.5) -> float:
    """Measured matmul FLOP/s per device: one [n, n] x [n, n] matmul per local device, all at once (the fake CPU
    devices of one process share its cores), best of a few runs within ~budget_s; cached per (dtype, devices)."""
    import jax
    devices = list(devices) if devices is not None else jax.local_devices()
    ids = tuple(sorted(d.id for d in devices if d.process_index == jax.process_index()))
    return _measured_cpu_peak(str(dtype), ids, int(n), float(budget_s))


def peak_flops_per_device(dtype: str, devices=None, override_tflops: float = 0.0) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it comes from). override_tflops > 0 (config.train.peak_tflops) wins; then the
    PEAKS table by device_kind; on CPU a measured matmul peak; otherwise (None, why) and MFU is not logged."""
    import jax
    devices = list(devices) if devices is not None else jax.devices()
    dev = devices[0]
    if override_tflops and override_tflops > 0:
        return float(override_tflops) * 1e12, f"config.train.peak_tflops = {override_tflops}"
    peak = table_peak(dev.device_kind, dtype)
    if peak is not None:
        return peak, f"{PEAKS[chip_for(dev.device_kind)].name} published dense {dtype} peak"
    if dev.platform == "cpu":
        t0 = time.perf_counter()
        peak = measure_cpu_peak(dtype, devices)
        local = sum(d.process_index == jax.process_index() for d in devices)
        return peak, (f"measured {dtype} matmul on {local} CPU device(s) sharing this host's cores "
                      f"({time.perf_counter() - t0:.1f} s)")
    return None, (f"device kind {dev.device_kind!r} has no entry in pal_jax.core.perf.PEAKS; set config.train.peak_tflops "
                  f"for MFU")


# ------------------------------------------------------------------------------------------------ the meter
class Meter:
    """Accounts one log window of training: the timed steps' wall time, their padded and real tokens and model
    FLOPs. Steps that compile (a new batch shape), evaluation, checkpoints and profiler start/stop are excluded
    by the loop (exclude()); the window's time is the wall time since it began minus those."""

    def __init__(self, model_cfg, n_devices: int, peak_flops: float | None, forward_passes: float):
        self.cfg, self.n_devices, self.peak = model_cfg, max(int(n_devices), 1), peak_flops
        self.forward_passes = float(forward_passes)
        self.reset(time.time())

    def reset(self, now: float) -> None:
        self.t0, self.excluded, self.steps, self.padded, self.real, self.flops = now, 0.0, 0, 0, 0, 0.0

    def exclude(self, seconds: float) -> None:
        self.excluded += max(float(seconds), 0.0)

    def add_step(self, batch: Mapping[str, Any]) -> None:
        padded, real = batch_tokens(batch)
        self.steps += 1
        self.padded += padded
        self.real += real
        self.flops += batch_flops(self.cfg, batch, self.forward_passes)

    def summary(self, now: float) -> dict[str, float]:
        """The window's figures (empty when it had no timed step): step_time_s, tokens_per_s (global, padded),
        tokens_per_s_per_device (padded), real_tokens_per_s_per_device, real_token_frac, tflops_per_device, and
        mfu (of the padded-token FLOPs, when the peak is known)."""
        secs = now - self.t0 - self.excluded
        if self.steps == 0 or secs <= 0:
            return {}
        n = self.n_devices
        out = {"step_time_s": secs / self.steps, "tokens_per_s": self.padded / secs,
               "tokens_per_s_per_device": self.padded / secs / n, "real_tokens_per_s_per_device": self.real / secs / n,
               "real_token_frac": self.real / max(self.padded, 1), "tflops_per_device": self.flops / secs / n / 1e12}
        if self.peak:
            out["mfu"] = self.flops / secs / n / self.peak
        return out


def describe(model_cfg, seq_len: int, forward_passes: float, peak: float | None, peak_src: str) -> str:
    """One log line: FLOPs per token at the longest length (LM head on every position) and the peak used."""
    fwd = forward_flops_per_token(model_cfg, seq_len)
    amount = f"{fwd / 1e9:,.3f} GFLOP" if fwd >= 1e9 else f"{fwd / 1e6:,.3f} MFLOP"
    return (f"perf: {amount} forward per token at length {seq_len} (LM head on every position; the "
            f"loop counts each batch's window), x{forward_passes:g} per training step; peak "
            + (f"{peak / 1e12:,.3f} TFLOP/s per device ({peak_src})" if peak else f"unknown ({peak_src})"))

