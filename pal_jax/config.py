"""Config validation: every problem found before any work starts, each naming its key and what is allowed."""
from __future__ import annotations

import math
import os

import ml_collections

from pal_jax.core import host_malloc
from pal_jax.core.errors import ConfigError
# the choices of config keys, each defined once by the module that implements them
from pal_jax.data.convai2 import TFDS_VARIANTS as TFDS_CONFIGS
from pal_jax.data.corpus import SOURCES
from pal_jax.inference.decode import METHODS
from pal_jax.inference.predictor import PROMPT_FORMATS
from pal_jax.inference.selection import RULES as SELECT_RULES
from pal_jax.model.transformer import ATTENTION, FAMILIES, LORA_TARGETS, SPLASH_BLOCK
from pal_jax.training.loss_spec import DPO_LOSS_TYPES, parse_loss_type  # noqa: F401  jax-free; losses.py uses the same
from pal_jax.training.make_pairs import GENERATE_ON, HIGHLIGHT, IDENTICAL, REJECTED_FROM, SELECT_REJECTED

# mode -> (module, function(config, workdir) -> summary dict): what main.dispatch runs for config.mode
MODES = {
    "stage1": ("pal_jax.training.stage1", "run"),
    "make_pairs": ("pal_jax.training.stage2", "run_make_pairs"),
    "stage2": ("pal_jax.training.stage2", "run"),
    "pipeline": ("pal_jax.pipeline", "run"),
    "predict": ("pal_jax.inference.predictor", "run_predict"),
    "evaluate": ("pal_jax.evaluation.evaluate", "run_evaluate"),
    "chat": ("pal_jax.inference.predictor", "run_chat"),
    "export": ("pal_jax.weights.export", "run_export"),
    "compile": ("pal_jax.training.aot", "run_compile"),
}
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
CORPUS_MODES = ("stage1", "make_pairs", "stage2", "pipeline")  # modes that always read config.data


PRECOMPUTE_VS_SYNC = ("config.stage2.ref_sync_every > 0 (the TR-DPO reference update) with config.stage2.precompute_ref"
                      " = True: log-probs computed once cannot follow a reference that moves; expected "
                      "--config.stage2.precompute_ref=False or --config.stage2.ref_sync_every=0")


def _check(errors, ok, key, value, expected):
    if not ok:
        errors.append(f"config.{key} = {value!r}: expected {expected}")


def _positive_finite(v) -> bool:
    """A real number > 0 and not inf (nan fails both)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _validate_lora(c, e: list[str]) -> None:
    lo = c.get("lora")
    if lo is None:
        return
    rank = lo.rank
    _check(e, isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0, "lora.rank", rank,
           "an integer >= 0 (0 = LoRA off)")
    if not (isinstance(rank, int) and rank > 0):
        return
    _check(e, isinstance(lo.alpha, (int, float)) and not isinstance(lo.alpha, bool) and lo.alpha > 0, "lora.alpha",
           lo.alpha, "a number > 0 (the adapters' scale is alpha / rank)")
    allowed = LORA_TARGETS.get(c.model.family, ())
    names = [t.strip() for t in str(lo.targets).split(",") if t.strip()]
    _check(e, bool(names) and len(set(names)) == len(names) and all(t in allowed for t in names), "lora.targets",
           lo.targets, f"distinct comma-separated projections of a {c.model.family} model, from "
           f"'{','.join(allowed)}'")


TRAINING_MODES = ("stage1", "stage2", "pipeline")  # modes whose steps run the training forward (hidden_states)


def _validate_attention(c, e: list[str]) -> None:
    """model.attention; with splash, the sequence lengths the training forward will see (the kernel's block)."""
    att = c.model.get("attention", "xla")
    _check(e, att in ATTENTION, "model.attention", att, f"one of {ATTENTION}")
    if att != "splash":
        return
    why = f"multiples of {SPLASH_BLOCK} with model.attention='splash' (the kernel's block), or model.attention='xla'"
    if c.mode in TRAINING_MODES:
        buckets = tuple(c.data.buckets)
        _check(e, all(isinstance(b, int) and b % SPLASH_BLOCK == 0 for b in buckets), "data.buckets", buckets, why)
    if c.mode == "compile":
        seq = c.compile.seq_len or c.data.max_len
        _check(e, seq % SPLASH_BLOCK == 0, "compile.seq_len", seq, f"{why} (0 = data.max_len={c.data.max_len})")


def _validate_ref_sync(c, e: list[str]) -> None:
    """stage2.ref_sync_every / ref_sync_alpha (TR-DPO, pal_jax/training/stage2.py)."""
    s2 = c.stage2
    every, alpha = s2.get("ref_sync_every", 0), s2.get("ref_sync_alpha", 0.6)
    every_ok = isinstance(every, int) and not isinstance(every, bool) and every >= 0
    _check(e, every_ok, "stage2.ref_sync_every", every,
           "an integer >= 0 (0 = a fixed reference; tau > 0 = move the reference every tau steps)")
    alpha_ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and \
        0 < alpha <= 1
    _check(e, alpha_ok, "stage2.ref_sync_alpha", alpha,
           "a finite number in (0, 1] (ref <- alpha * policy + (1 - alpha) * ref; 1 = the hard update)")
    if not (every_ok and every > 0):
        return
    if s2.precompute_ref:
        e.append(PRECOMPUTE_VS_SYNC)
    rank = (c.get("lora") or {}).get("rank", 0)
    if alpha_ok and alpha != 1 and isinstance(rank, int) and rank > 0:
        e.append(f"config.stage2.ref_sync_alpha = {alpha!r} with config.lora.rank = {rank} and "
                 f"config.stage2.ref_sync_every = {every}: with LoRA the reference moves by its adapters, and a soft "
                 f"mix of the A and B factors is not the mix of the models; expected ref_sync_alpha=1 (the hard "
                 f"update, exact), or ref_sync_every=0, or Stage 2 without LoRA")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError listing every invalid value (all of them, not just the first)."""
    e: list[str] = []
    c = config
    _check(e, c.mode in MODES, "mode", c.mode, f"one of {tuple(MODES)}")
    m = c.model
    _check(e, m.family in FAMILIES, "model.family", m.family, f"one of {FAMILIES}")
    for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len"):
        _check(e, isinstance(m[k], int) and m[k] > 0, f"model.{k}", m[k], "a positive integer")
    _check(e, m.vocab_size >= 0, "model.vocab_size", m.vocab_size, ">= 0 (0 = from the tokenizer)")
    if m.n_heads > 0 and m.n_kv_heads > 0:
        _check(e, m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
               f"a divisor of model.n_heads={m.n_heads}")
    _check(e, m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {DTYPES}")
    _check(e, m.param_dtype in DTYPES, "model.param_dtype", m.param_dtype, f"one of {DTYPES}")
    _validate_attention(c, e)
    d = c.data
    _check(e, d.source in SOURCES, "data.source", d.source, f"one of {SOURCES}")
    if d.source in ("convai2", "jsonl"):
        what = ("ConvAI2 text file" if d.source == "convai2" else
                "JSONL file of {persona, history, response, persona_label (optional)}, one turn a line")
        _check(e, bool(d.path), "data.path", d.path, f"the path of a {what} when data.source={d.source!r}")
        reads_corpus = c.mode in CORPUS_MODES or (c.mode in ("predict", "evaluate") and not c.predict.input)
        if d.path and reads_corpus and "://" not in d.path:
            example = ("ParlAI format, e.g. valid_self_original.txt; the data is not part of the repository; "
                       if d.source == "convai2" else "")
            _check(e, os.path.isfile(d.path), "data.path", d.path,
                   f"an existing {what} ({example}relative paths are from the current directory {os.getcwd()})")
    if d.source == "tfds":
        _check(e, bool(d.path), "data.path", d.path,
               "the TFDS data_dir the dataset was built into (pal_jax.data.tfds_builder.build) when data.source='tfds'")
        _check(e, bool(d.get("tfds_split")), "data.tfds_split", d.get("tfds_split"),
               "a TFDS split of the built dataset, e.g. 'train' or 'validation'")
        _check(e, d.get("tfds_config", "self_original") in TFDS_CONFIGS, "data.tfds_config", d.get("tfds_config"),
               f"one of {TFDS_CONFIGS}")
    _check(e, 0 <= d.dev_fraction < 1, "data.dev_fraction", d.dev_fraction, "in [0, 1)")
    _check(e, 0 <= d.test_fraction < 1, "data.test_fraction", d.test_fraction, "in [0, 1)")
    _check(e, d.dev_fraction + d.test_fraction < 1, "data.test_fraction", d.test_fraction,
           f"dev_fraction + test_fraction < 1 (dev_fraction={d.dev_fraction})")
    _check(e, 0.0 <= d.select_ratio <= 1.0, "data.select_ratio", d.select_ratio, "in [0, 1]")
    _check(e, math.isfinite(d.persona_weight) and d.persona_weight > 0, "data.persona_weight", d.persona_weight,
           "a finite number > 0 (1 = plain NLL)")
    packing = d.get("packing", False)
    _check(e, isinstance(packing, bool), "data.packing", packing,
           "True or False (True: several Stage 1 examples per row, attention kept inside each example)")
    buckets = tuple(d.buckets)
    _check(e, len(buckets) > 0 and list(buckets) == sorted(set(buckets)) and buckets[-1] == d.max_len,
           "data.buckets", buckets, f"strictly increasing lengths ending at data.max_len={d.max_len}")
    _check(e, d.max_len <= m.max_len, "data.max_len", d.max_len, f"<= model.max_len={m.max_len}")
    _check(e, d.synthetic_dialogues >= 10, "data.synthetic_dialogues", d.synthetic_dialogues, ">= 10")
    t = c.train
    for k in ("batch_size", "grad_accum", "steps", "log_every", "eval_every", "checkpoint_every",
              "keep_checkpoints", "max_bad_steps"):
        _check(e, isinstance(t[k], int) and t[k] > 0, f"train.{k}", t[k], "a positive integer")
    _check(e, t.eval_batches >= 0, "train.eval_batches", t.eval_batches, ">= 0 (0 = the whole held-out split)")
    st = t.get("sample_turns", 0)
    _check(e, isinstance(st, int) and not isinstance(st, bool) and st >= 0, "train.sample_turns", st,
           "an integer >= 0 (dev turns sampled at every evaluation; 0 = off)")
    if t.grad_accum > 0:
        _check(e, t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
               f"a divisor of train.batch_size={t.batch_size}")
    _check(e, _positive_finite(t.lr), "train.lr", t.lr, "a finite number > 0")
    _check(e, 0 <= t.end_lr_ratio <= 1, "train.end_lr_ratio", t.end_lr_ratio, "in [0, 1]")
    _check(e, 0 <= t.warmup_steps, "train.warmup_steps", t.warmup_steps, ">= 0")
    _check(e, t.schedule in SCHEDULES, "train.schedule", t.schedule, f"one of {SCHEDULES}")
    _check(e, t.clip_norm >= 0, "train.clip_norm", t.clip_norm, ">= 0 (0 = no clipping)")
    _check(e, 0 <= t.b1 < 1 and 0 <= t.b2 < 1, "train.b1/b2", (t.b1, t.b2), "in [0, 1)")
    _check(e, isinstance(t.peak_tflops, (int, float)) and t.peak_tflops >= 0, "train.peak_tflops", t.peak_tflops,
           ">= 0 (0 = the chip's published peak, or measured on CPU)")
    for k in ("profile_start", "profile_steps"):
        _check(e, isinstance(t[k], int) and t[k] >= 0, f"train.{k}", t[k], "an integer >= 0")
    if isinstance(t.profile_steps, int) and t.profile_steps > 0:
        _check(e, isinstance(t.profile_start, int) and t.profile_start >= 1, "train.profile_start", t.profile_start,
               "the first traced step, >= 1 (steps count from 1), when train.profile_steps > 0")
    for k in ("data", "fsdp", "tensor"):
        _check(e, c.mesh[k] == -1 or c.mesh[k] >= 1, f"mesh.{k}", c.mesh[k], ">= 1, or -1 for the rest")
    _check(e, isinstance(c.mesh.get("cpu_devices", 0), int) and c.mesh.get("cpu_devices", 0) >= 0,
           "mesh.cpu_devices", c.mesh.get("cpu_devices"), "an integer >= 0 (0 = JAX's default: one CPU device)")
    _check(e, isinstance(c.get("compile_cache", ""), str), "compile_cache", c.get("compile_cache"),
           "a string: 'auto', '' or 'off', or a directory")
    _check(e, host_malloc.normalized(c.get("host_malloc", "auto")) in host_malloc.VALUES, "host_malloc",
           c.get("host_malloc"), f"one of {host_malloc.VALUES}")
    s2 = c.stage2
    for k in ("steps", "batch_size"):
        _check(e, isinstance(s2[k], int) and s2[k] > 0, f"stage2.{k}", s2[k], "a positive integer")
    _check(e, _positive_finite(s2.lr), "stage2.lr", s2.lr, "a finite number > 0")
    _check(e, s2.warmup_steps >= 0, "stage2.warmup_steps", s2.warmup_steps, ">= 0")
    _check(e, s2.beta > 0, "stage2.beta", s2.beta, "> 0")
    share = s2.get("share_prompt", False)
    sb = tuple(s2.get("share_buckets", ()))
    _check(e, all(isinstance(b, int) and b > 0 for b in sb) and list(sb) == sorted(set(sb)),
           "stage2.share_buckets", sb, "() or strictly increasing positive lengths")
    _check(e, isinstance(share, bool), "stage2.share_prompt", share, "True or False")
    _check(e, not share or (c.model.get("attention", "xla") != "splash" and not c.model.get("sliding_window", 0)),
           "stage2.share_prompt", share, "False with model.attention='splash' (its SegmentIds cannot give the shared "
           "prompt to both replies) or a sliding window (which counts row indices, not positions)")
    flat = s2.get("flat_window", False)
    _check(e, isinstance(flat, bool), "stage2.flat_window", flat, "True or False")
    _check(e, not flat or (share is True and c.train.grad_accum == 1), "stage2.flat_window", flat,
           f"False unless stage2.share_prompt = True and train.grad_accum = 1 (they are {share} and "
           f"{c.train.grad_accum}: the flat window lists each data shard's reply positions in its shared rows, and "
           f"micro-batches would split a shard's rows)")
    try:
        parse_loss_type(s2.loss_type)
    except ValueError as err:  # names the key, the bad entry and the syntax
        e.append(str(err))
    _check(e, isinstance(s2.get("norm_use_reference", True), bool), "stage2.norm_use_reference",
           s2.get("norm_use_reference"), "True or False (sigmoid_norm; False = SimPO: no reference in the margin)")
    g = s2.get("simpo_gamma", 0.0)
    _check(e, isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g >= 0,
           "stage2.simpo_gamma", g, "a finite number >= 0 (the target margin of stage2.loss_type=sigmoid_norm)")
    _check(e, 0 <= s2.label_smoothing < 0.5, "stage2.label_smoothing", s2.label_smoothing, "in [0, 0.5)")
    _check(e, s2.align_weight >= 0, "stage2.align_weight", s2.align_weight, ">= 0 (0 = off)")
    _check(e, s2.align_temperature > 0, "stage2.align_temperature", s2.align_temperature, "> 0")
    _check(e, s2.use_dpo or s2.align_weight > 0 or s2.sft_weight > 0, "stage2.use_dpo", s2.use_dpo,
           "True, or stage2.align_weight > 0 or stage2.sft_weight > 0 (otherwise there is no loss)")
    _check(e, s2.generate_pairs_on in GENERATE_ON, "stage2.generate_pairs_on", s2.generate_pairs_on,
           f"one of {GENERATE_ON}")
    _check(e, s2.max_pair_turns >= 0, "stage2.max_pair_turns", s2.max_pair_turns, ">= 0 (0 = all)")
    _check(e, s2.rejected in REJECTED_FROM, "stage2.rejected", s2.rejected, f"one of {REJECTED_FROM}")
    _check(e, s2.get("identical_pairs", "drop") in IDENTICAL, "stage2.identical_pairs", s2.get("identical_pairs"),
           f"one of {IDENTICAL}")
    _check(e, s2.get("identical_pairs", "drop") != "keep" or s2.sft_weight > 0 or s2.align_weight > 0,
           "stage2.identical_pairs", s2.get("identical_pairs"),
           "'drop', or stage2.sft_weight > 0 or stage2.align_weight > 0 (a pair with the same text on both sides "
           "has no DPO gradient: only those terms train it)")
    _check(e, s2.get("select_rejected", "runner_up") in SELECT_REJECTED, "stage2.select_rejected",
           s2.get("select_rejected"), f"one of {SELECT_REJECTED}")
    _check(e, s2.get("pair_highlight", "label") in HIGHLIGHT, "stage2.pair_highlight", s2.get("pair_highlight"),
           f"one of {HIGHLIGHT}")
    _check(e, s2.get("pair_highlight", "label") != "own_pick" or s2.rejected != "highlighted",
           "stage2.pair_highlight", s2.get("pair_highlight"),
           "'label' with stage2.rejected='highlighted' (its rejected replies are decoded with the label highlighted)")
    _check(e, s2.get("reference", "stage1") in ("stage1", "base"), "stage2.reference", s2.get("reference"),
           "'stage1' (the Stage 1 model) or 'base' (the weights Stage 1 started from)")
    _check(e, 0 < s2.dev_fraction < 1, "stage2.dev_fraction", s2.dev_fraction, "in (0, 1)")
    _validate_ref_sync(c, e)
    if c.mode == "stage2":
        _check(e, bool(c.init_from), "init_from", c.init_from, "the workdir of a Stage 1 run (the reference model)")
    _validate_lora(c, e)
    p = c.predict
    _check(e, p.method in METHODS, "predict.method", p.method, f"one of {METHODS}")
    _check(e, p.select_by in SELECT_RULES, "predict.select_by", p.select_by, f"one of {SELECT_RULES}")
    _check(e, isinstance(p.calibration_turns, int) and p.calibration_turns >= 0, "predict.calibration_turns",
           p.calibration_turns, "an integer >= 0 (0 = the whole dev split)")
    if p.select_by == "calibrated" and c.mode in ("predict", "evaluate", "chat", "pipeline", "make_pairs", "stage2"):
        _check(e, d.dev_fraction > 0, "data.dev_fraction", d.dev_fraction,
               "> 0 with predict.select_by='calibrated' (its bias is fitted on the dev split)")
    for k in ("prompt_format", "select_format"):
        _check(e, p[k] in PROMPT_FORMATS, f"predict.{k}", p[k], f"one of {PROMPT_FORMATS}")
    _check(e, p.batch_size > 0, "predict.batch_size", p.batch_size, "a positive integer")
    _check(e, 0 < p.max_new_tokens < d.max_len, "predict.max_new_tokens", p.max_new_tokens,
           f"in [1, data.max_len={d.max_len})")
    _check(e, p.temperature > 0, "predict.temperature", p.temperature, "> 0")
    _check(e, p.top_k >= 0, "predict.top_k", p.top_k, ">= 0 (0 = off)")
    _check(e, 0 < p.top_p <= 1, "predict.top_p", p.top_p, "in (0, 1]")
    _check(e, p.beam_width >= 1, "predict.beam_width", p.beam_width, ">= 1")
    _check(e, p.max_records >= 0, "predict.max_records", p.max_records, ">= 0 (0 = all)")
    _check(e, p.split in ("test", "dev"), "predict.split", p.split,
           "'test' or 'dev' (tune on dev; read test for final figures)")
    _check(e, isinstance(c.eval.bootstrap_resamples, int) and c.eval.bootstrap_resamples >= 100,
           "eval.bootstrap_resamples", c.eval.bootstrap_resamples, "an integer >= 100")
    if c.mode == "chat":
        _check(e, bool(p.persona_file), "predict.persona_file", p.persona_file,
               "a text file with one persona sentence a line")
    if e:
        raise ConfigError("invalid config:\n  " + "\n  ".join(e))
