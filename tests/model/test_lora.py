"""LoRA: adapters on a frozen base (model, train step, Stage 1, Stage 2 reference), memory, merge-and-export."""
from __future__ import annotations

import json
import math
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_config
from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.weights import hf as convert
from pal_jax.model import lora
from pal_jax.core import optim
from pal_jax.training import stage1
from pal_jax.training import stage2
from pal_jax.training import loop as train
from pal_jax.core.errors import ConfigError
from pal_jax.config import validate
from pal_jax.training.experiment import Experiment
from pal_jax.model.transformer import LoraConfig, ModelConfig, Transformer
from pal_jax.model.spec import ModelSpec

LLAMA = ModelConfig(family="llama", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                    d_ff=48, max_len=32, tie_embeddings=False)
GPT2 = ModelConfig(family="gpt2", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                   max_len=32, tie_embeddings=True)
FULL = {"llama": ("q", "k", "v", "o", "gate", "up", "down"), "gpt2": ("q", "k", "v", "o", "fc", "proj")}
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 12)), jnp.int32)


def _random(cfg, lo=None, b_std=0.0, std=0.1) -> Transformer:
    """A model with numpy-random params (a jitted random init compiles slowly on this CPU): each base param drawn
    from a generator seeded by its path, so the plain and the LoRA model share their base values; A normal with
    std 1/sqrt(fan in); B normal(0, b_std) (0: zeros, as at init)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), lora=lo)), nnx.Param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
    leaves = []
    for path, x in flat:
        name = jax.tree_util.keystr(path)
        rng = np.random.RandomState(zlib.crc32(name.encode()))
        if name.endswith("_lora_a']"):
            v = rng.normal(0, 1 / math.sqrt(math.prod(x.shape[:-1])), x.shape)
        elif name.endswith("_lora_b']"):
            v = rng.normal(0, b_std, x.shape) if b_std else np.zeros(x.shape)
        else:
            v = rng.normal(0, std, x.shape)
        leaves.append(jnp.asarray(v, x.dtype))
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _pure(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


# -- model ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_adapters_shapes_axes_and_exact_base_output(cfg):
    plain = _random(cfg)
    lo = LoraConfig(rank=4, alpha=8.0, targets=FULL[cfg.family])
    model = _random(cfg, lo)
    adapters, base = lora.split(_pure(model))
    pb, mb = _leaves(_pure(plain)), _leaves(base)
    assert pb.keys() == mb.keys()  # the same base params as the plain model, and the adapters apart
    assert all(np.array_equal(pb[k], mb[k]) for k in pb)
    # A [in..., r] random, B [r, out...] zero, logical axes following the base weight
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    hd = cfg.hd
    assert attn.q_lora_a.shape == (32, 4) and attn.q_lora_b.shape == (4, 4, hd)
    assert attn.o_lora_a.shape == (4, hd, 4) and attn.o_lora_b.shape == (4, 32)
    assert attn.o_lora_a.get_metadata()["out_sharding"] == ("heads", "head_dim", None)
    assert attn.k_lora_b.get_metadata()["out_sharding"] == (None, "kv_heads", "head_dim")
    down = mlp.down_lora_a if cfg.family == "llama" else mlp.proj_lora_a
    assert down.get_metadata()["out_sharding"] == ("mlp", None)
    assert len(_leaves(adapters)) == 2 * len(FULL[cfg.family]) * cfg.n_layers
    assert isinstance(attn.q_lora_a, nnx.LoRAParam)
    # B = 0: the LoRA model's logits and hidden states are the base model's: exactly for llama; for gpt2 XLA's CPU
    # dot fuses the plain model's bias add into the matmul's accumulation, a last-bit difference in rounding
    (l0, h0), (l1, h1) = _forward(plain, TOKENS), _forward(model, TOKENS)
    tol = 0.0 if cfg.family == "llama" else 1e-6
    assert float(np.abs(np.asarray(l1) - np.asarray(l0)).max()) <= tol
    assert float(np.abs(np.asarray(h1) - np.asarray(h0)).max()) <= tol


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_forward_is_base_plus_scaled_low_rank_and_merges(cfg):
    lo = LoraConfig(rank=3, alpha=6.0, targets=FULL[cfg.family])
    model = _random(cfg, lo, b_std=0.3)
    plain = _random(cfg)
    lora_logits = np.asarray(_forward(model, TOKENS)[0])
    assert np.abs(lora_logits - np.asarray(_forward(plain, TOKENS)[0])).max() > 1e-2  # the adapters act
    # merged W + (alpha/r) A B in a plain model gives the same logits
    merged = lora.merge_adapters(_pure(model), lo)
    assert not lora.split(merged)[0]
    graphdef, _ = nnx.split(plain, nnx.Param)
    merged_logits = np.asarray(_forward(nnx.merge(graphdef, merged), TOKENS)[0])
    assert np.abs(merged_logits - lora_logits).max() < 1e-5
    # the scale is alpha / rank: doubling alpha doubles each projection's low-rank term
    w = np.asarray(model.blocks[0].attn.o[...])
    a, b = np.asarray(model.blocks[0].attn.o_lora_a[...]), np.asarray(model.blocks[0].attn.o_lora_b[...])
    np.testing.assert_allclose(np.asarray(merged["blocks"][0]["attn"]["o"]), w + 2.0 * np.tensordot(a, b, 1),
                               rtol=1e-6, atol=1e-6)
    # numpy params (export path) merge to the same values
    as_np = jax.tree.map(np.asarray, _pure(model))
    for k, v in _leaves(lora.merge_adapters(as_np, lo)).items():
        np.testing.assert_allclose(v, np.asarray(_leaves(merged)[k]), rtol=1e-6, atol=1e-7)


def test_some_targets_only_and_decode_uses_adapters():
    lo = LoraConfig(rank=2, alpha=2.0, targets=("v", "down"))
    model = _random(LLAMA, lo, b_std=0.3)
    adapters, _ = lora.split(_pure(model))
    assert sorted(adapters["blocks"][0]["attn"]) == ["v_lora_a", "v_lora_b"]
    assert sorted(adapters["blocks"][0]["mlp"]) == ["down_lora_a", "down_lora_b"]
    # the KV-cache path gives the full forward's logits (adapters in both)
    full = np.asarray(_forward(model, TOKENS)[0])
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    decode = nnx.jit(lambda m: m.decode(TOKENS, m.init_cache(2, 16), positions=pos, cache_index=0,
                                        key_mask=jnp.ones((2, 16), bool))[0])
    assert np.abs(np.asarray(decode(model)) - full).max() < 1e-5
    assert np.abs(full - np.asarray(_forward(_random(LLAMA), TOKENS)[0])).max() > 1e-3


def _mesh1():
    return jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:1])


def test_rank_zero_is_the_plain_model():
    c = tiny_config()
    assert c.lora.rank == 0 and lora.lora_config(c) is None
    assert lora.lora_config({"model": {}}) is None  # a config saved before LoRA existed
    rules = tuple(c.mesh.axis_rules)
    ms = ModelSpec(LLAMA, _mesh1(), rules)
    ms0 = ModelSpec(LLAMA, _mesh1(), rules, lora=lora.lora_config(c))
    assert ms0.lora is None and ms0.frozen_abstract is None and ms0.graphdef == ms.graphdef
    assert jax.tree.leaves(ms0.abstract) == jax.tree.leaves(ms.abstract)
    assert jax.tree.structure(ms0.abstract) == jax.tree.structure(ms.abstract)
    # with LoRA: trainable = the adapters; the frozen base has the plain model's params
    msl = ModelSpec(LLAMA, _mesh1(), rules, lora=LoraConfig(rank=4))
    assert msl.graphdef != ms.graphdef and jax.tree.leaves(msl.frozen_abstract) == jax.tree.leaves(ms.abstract)
    # r (in + out) per adapted projection: q, k, v, o, gate, up, down; 2 layers
    assert msl.n_params() == 2 * 4 * ((32 + 48) + 2 * (32 + 24) + (48 + 32) + 3 * (32 + 48))
    assert msl.n_frozen() == ms.n_params()


TINY_INIT = ModelConfig(family="llama", vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=8)


def test_adapter_init_a_random_b_zero():
    msl = ModelSpec(TINY_INIT, _mesh1(), tuple(tiny_config().mesh.axis_rules), lora=LoraConfig(rank=2))
    adapters = _leaves(jax.device_get(msl.init(5)))
    assert len(adapters) == 14 and all(lora.is_adapter(k.split("'")[-2]) for k in adapters)
    assert all(not v.any() for k, v in adapters.items() if k.endswith("_lora_b']"))
    a = adapters["['blocks'][0]['mlp']['gate_lora_a']"]
    assert a.shape == (8, 2) and 0.5 / math.sqrt(8) < a.std() < 2 / math.sqrt(8)  # std 1/sqrt(fan in)


@pytest.mark.slow  # two jitted random inits: ~35 s on this 2-core CPU under load
def test_lora_base_init_is_the_plain_init():
    """Adapters are drawn after every base param: a LoRA model's random base equals the plain model's (seed)."""
    rules = tuple(tiny_config().mesh.axis_rules)
    plain = jax.device_get(ModelSpec(TINY_INIT, _mesh1(), rules).init(5))
    msl = ModelSpec(TINY_INIT, _mesh1(), rules, lora=LoraConfig(rank=2))
    base = jax.device_get(msl.init_frozen(5))
    assert jax.tree.structure(base) == jax.tree.structure(plain)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(base)))


def test_config_validation_names_the_key():
    c = tiny_config(lora__rank=-1)
    with pytest.raises(ConfigError, match=r"config\.lora\.rank = -1: expected an integer >= 0 \(0 = LoRA off\)"):
        validate(c)
    c = tiny_config(lora__rank=4, lora__alpha=0.0, lora__targets="q,v,fc")
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert "config.lora.alpha = 0.0: expected a number > 0" in str(e.value)
    assert ("config.lora.targets = 'q,v,fc': expected distinct comma-separated projections of a llama model, from "
            "'q,k,v,o,gate,up,down'") in str(e.value)
    validate(tiny_config(lora__rank=4, lora__targets="q, v,down"))
    assert lora.lora_config(tiny_config(lora__rank=4, lora__targets="q, v,down")).targets == ("q", "v", "down")
    from configs import common
    assert common.base_config("stage1", "gpt2").lora.targets == "q,k,v,o,fc,proj"
    validate(common.base_config("stage1", "gpt2"))


def test_resume_refuses_other_adapters_and_reads_old_checkpoints():
    task = train.Task(name="stage1", loss_fn=None, train_batch=None, eval_batches=None)
    saved = json.loads(tiny_config(lora__rank=4).to_json_best_effort())
    now = json.loads(tiny_config(lora__rank=8).to_json_best_effort())
    with pytest.raises(ValueError, match=r"config\.lora\.rank: checkpoint has 4, now 8"):
        train._check_resume({"config": saved}, now, task, "W")
    train._check_resume({"config": saved}, saved, task, "W")
    plain = json.loads(tiny_config().to_json_best_effort())
    old = {k: v for k, v in plain.items() if k != "lora"}  # saved before LoRA existed
    train._check_resume({"config": old}, plain, task, "W")


# -- train step and memory ----------------------------------------------------------------------------------------

def test_optimizer_state_holds_adapter_moments_only():
    """Stage 2 bytes for the smollm2_135m shape from abstract shapes: params + Adam state + reference."""
    c = tiny_config()
    mesh = _mesh1()
    from configs import common
    cfg = ModelConfig.from_dict(common.MODEL_PRESETS["smollm2_135m"])
    tx = optim.make_optimizer(c.train)
    full = lora.stage2_bytes(ModelSpec(cfg, mesh, tuple(c.mesh.axis_rules)), tx)
    lo = lora.stage2_bytes(ModelSpec(cfg, mesh, tuple(c.mesh.axis_rules), lora=LoraConfig(rank=8)), tx)
    n_full = 134_515_008  # SmolLM2-135M: 49152 x 576 tied embedding + 30 layers
    assert full["trainable_params"] == full["reference"] == 4 * n_full
    assert 8 * n_full <= full["optimizer_state"] < 8 * n_full + 64  # Adam mu and nu for every param
    n_adapters = 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # r (in + out): q,o; k,v; mlp
    assert lo["trainable_params"] == lo["reference"] == 4 * n_adapters
    assert 8 * n_adapters <= lo["optimizer_state"] < 8 * n_adapters + 64  # no moments for the frozen base
    assert lo["frozen_base"] == 4 * n_full
    print(f"stage2 bytes, full: {full}\nstage2 bytes, LoRA r=8: {lo}")
    # one full copy of the weights + 4 of the adapters (policy, mu, nu, reference) against 4 full copies
    assert lo["total"] - lo["optimizer_state"] + 8 * n_adapters == 4 * (n_full + 4 * n_adapters)
    assert full["total"] - full["optimizer_state"] + 8 * n_full == 4 * (4 * n_full)


def test_train_step_moves_adapters_only_and_shards_them_like_the_base():
    """make_train_step with LoRA on 8 devices (data 2, fsdp 2, tensor 2): 3 steps update the adapters; the frozen
    base argument is bit-identical after them and never donated; the optimizer state is the adapters' moments."""
    c = tiny_config(train__warmup_steps=0, mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
    from pal_jax.core import mesh as mesh_lib
    mesh = mesh_lib.make_mesh(c.mesh)
    ms = ModelSpec(LLAMA, mesh, mesh_lib.axis_rules(c), lora=LoraConfig(rank=4, alpha=8.0))
    # adapters shard like their base weight: A on the weight's input axes, B on its output axes
    q_a, q_b = ms.shardings["blocks"][0]["attn"]["q_lora_a"], ms.shardings["blocks"][0]["attn"]["q_lora_b"]
    assert tuple(q_a.spec) == ("fsdp", None) and tuple(q_b.spec) == (None, "tensor", None)
    assert tuple(ms.shardings["blocks"][0]["mlp"]["down_lora_a"].spec) == ("tensor", None)
    assert tuple(ms.frozen_shardings["blocks"][0]["attn"]["q"].spec) == ("fsdp", "tensor", None)
    adapters, base = lora.split(_pure(_random(LLAMA, ms.lora)))
    base_np = jax.tree.map(np.asarray, base)
    base = jax.device_put(base, ms.frozen_shardings)
    params = jax.device_put(adapters, ms.shardings)

    def loss_fn(model, batch, extra):
        logits, _ = model(batch["inputs"])
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, batch["inputs"][:, 1:, None], axis=-1)
        return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32), {}

    task = train.Task(name="t", loss_fn=loss_fn, train_batch=None, eval_batches=None)
    tx = optim.make_optimizer(c.train)
    opt_shardings = train.optimizer_shardings(tx, ms)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    step = train.make_train_step(ms, task, tx, 1, opt_shardings)
    tokens = np.random.RandomState(0).randint(0, 97, (8, 12)).astype(np.int32)
    batch = mesh_lib.global_batch({"inputs": tokens}, mesh)
    losses = []
    for _ in range(3):
        params, opt_state, m = step(params, opt_state, batch, None, base)
        losses.append(float(m["loss"]))
    assert losses[2] < losses[0]
    for k, v in _leaves(base).items():
        assert not v.is_deleted()
        np.testing.assert_array_equal(np.asarray(v), _leaves(base_np)[k], err_msg=k)
    assert all(float(np.abs(np.asarray(v)).max()) > 0 for k, v in _leaves(params).items() if "_lora_b" in k)
    adapter_bytes, opt_bytes = lora.tree_bytes(params), lora.tree_bytes(opt_state)
    assert 2 * adapter_bytes <= opt_bytes < 2 * adapter_bytes + 64  # Adam mu and nu of the adapters, step counts
    full_opt = lora.tree_bytes(jax.eval_shape(tx.init, ms.plain().abstract))
    print(f"optimizer state: {opt_bytes} B with LoRA rank 4 (adapters {adapter_bytes} B) vs {full_opt} B for the "
          f"full model (params {lora.tree_bytes(base)} B)")
    assert full_opt >= 2 * lora.tree_bytes(base) > 4 * opt_bytes


# -- Stage 1 and Stage 2 with LoRA on a pretrained (HF dir) base: a few minutes on this CPU, so marked slow ---------

S2 = dict(stage2__steps=2, stage2__batch_size=8, stage2__warmup_steps=0, train__log_every=1, train__eval_every=2,
          predict__batch_size=8, predict__max_new_tokens=4, stage2__max_pair_turns=24, data__synthetic_dialogues=30)
LORA = dict(lora__rank=4, lora__alpha=8.0)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """base (an HF dir of a random model) -> LoRA Stage 1 -> LoRA Stage 2, with train.run's arguments recorded."""
    root = tmp_path_factory.mktemp("lora")
    base_dir, s1, s2 = str(root / "base"), str(root / "s1"), str(root / "s2")
    c0 = tiny_config(data__synthetic_dialogues=30)
    exp = Experiment(c0, base_dir, devices=jax.devices()[:1])  # trains the tokenizer
    base_np = jax.tree.map(np.asarray, jax.device_get(exp.model.init(7)))
    convert.export_hf_dir(exp.model.init(7), exp.model.cfg, os.path.join(base_dir, "hf"), exp.tokenizer)
    tok = os.path.join(base_dir, "tokenizer")
    seen = {}
    real_run = train.run

    def spy(config, workdir, task, ms, init_params=None, frozen=None, settings=None):
        seen[task.name] = {"frozen": frozen, "extra": task.reference, "ms": ms}
        return real_run(config, workdir, task, ms, init_params=init_params, frozen=frozen,
                        settings=settings)

    c1 = tiny_config(train__steps=3, train__eval_every=3, data__synthetic_dialogues=30,
                     init_from=os.path.join(base_dir, "hf"), tokenizer__path=tok, **LORA)
    c2 = tiny_config(init_from=s1, tokenizer__path=tok, **LORA, **S2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "run", spy)
        sum1 = stage1.run(c1, s1)
        sum2, ref = stage2.train_stage2(c2, s2)
    return dict(base=base_np, s1=s1, s2=s2, c1=c1, c2=c2, sum1=sum1, sum2=sum2, ref=ref, seen=seen, tok=tok)


@pytest.mark.slow
def test_stage1_trains_adapters_only(chain):
    seen, c1 = chain["seen"]["stage1"], chain["c1"]
    ms = seen["ms"]
    assert chain["sum1"]["step"] == 3 and np.isfinite(chain["sum1"]["dev"]["loss"])
    # the frozen base: the HF file's weights, bit-identical after training, never donated
    got, want = _leaves(seen["frozen"]), _leaves(chain["base"])
    assert got.keys() == want.keys()
    for k in want:
        assert not got[k].is_deleted()
        np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
    # the checkpoint: adapters and their Adam moments only; B moved off zero
    tx = optim.make_optimizer(c1.train)
    abstract_opt = ckpt_lib.abstract_like(jax.eval_shape(tx.init, ms.abstract), train.optimizer_shardings(tx, ms))
    ck = ckpt_lib.Checkpointer(chain["s1"])
    params, opt_state, meta = ck.restore(3, ms.abstract, abstract_opt)
    ck.close()
    assert meta["config"]["lora"]["rank"] == 4 and meta["config"]["init_from"].endswith("hf")
    assert all(lora.is_adapter(str(k[-1].key)) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    assert max(float(np.abs(np.asarray(v)).max()) for k, v in _leaves(params).items() if "lora_b" in k) > 0
    import orbax.checkpoint as ocp
    stored = ocp.StandardCheckpointer().metadata(os.path.join(chain["s1"], "checkpoints", "3", "params"))
    stored = stored.item_metadata if hasattr(stored, "item_metadata") else stored
    assert len(jax.tree.leaves(stored)) == len(jax.tree.leaves(ms.abstract))  # no base weight in the checkpoint
    adapter_bytes = lora.tree_bytes(params)
    opt_bytes = lora.tree_bytes(opt_state)
    plain = ms.plain()
    plain_opt_bytes = lora.tree_bytes(jax.eval_shape(tx.init, plain.abstract))
    print(f"tiny stage 1: adapters {adapter_bytes} B, their optimizer state {opt_bytes} B; a full fine-tune's "
          f"optimizer state {plain_opt_bytes} B")
    assert 2 * adapter_bytes <= opt_bytes < 2 * adapter_bytes + 64  # Adam mu, nu of the adapters + step counts
    assert plain_opt_bytes > 2 * lora.tree_bytes(plain.abstract) > 4 * opt_bytes


@pytest.mark.slow
def test_stage2_reference_shares_the_base_and_stays_intact(chain):
    seen = chain["seen"]["stage2"]
    frozen, extra = seen["frozen"], seen["extra"]
    ref_adapters, ref_base = lora.split(extra)
    # the reference's base leaves ARE the policy's frozen base arrays: one copy of the base is held
    fb = _leaves(frozen)
    assert all(v is fb[k] for k, v in _leaves(ref_base).items()) and _leaves(ref_base).keys() == fb.keys()
    assert extra is chain["ref"]
    # Stage 1's adapters, bit-identical after Stage 2, never donated; the base too
    ms = seen["ms"]
    s1_adapters, _ = ckpt_lib.load_params(chain["s1"], ms.abstract)
    for k, v in _leaves(s1_adapters).items():
        assert not _leaves(ref_adapters)[k].is_deleted()
        np.testing.assert_array_equal(np.asarray(_leaves(ref_adapters)[k]), np.asarray(v), err_msg=k)
    for k, v in _leaves(chain["base"]).items():
        np.testing.assert_array_equal(np.asarray(fb[k]), v, err_msg=k)
    # step 1: the policy equals the reference -> DPO loss log 2; then the policy's adapters moved
    rows = [json.loads(x) for x in open(os.path.join(chain["s2"], "metrics.jsonl"))]
    first = [r for r in rows if "train/loss" in r][0]
    assert first["train/dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["train/reward_margin"] == pytest.approx(0.0, abs=1e-5)
    policy, _ = ckpt_lib.load_params(chain["s2"], ms.abstract)
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(s1_adapters))) > 0
    # the bytes held: unique device buffers of policy adapters + base + reference
    held = {id(x): x.nbytes for x in jax.tree.leaves((frozen, extra))}
    assert sum(held.values()) == lora.tree_bytes(frozen) + lora.tree_bytes(ref_adapters)


@pytest.mark.slow
def test_merge_and_export_loads_in_transformers(chain, tmp_path):
    torch = pytest.importorskip("torch", reason="torch (test-only, CPU wheel) is needed for the HF parity check")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    # the export mode on the Stage 2 workdir: its adapters merged into the base found through Stage 1's init_from
    from configs import export
    from pal_jax import main
    config = export.get_config("tiny")
    config.export.output_dir = str(tmp_path / "hf")
    summary = main.dispatch(config, chain["s2"])
    assert summary["step"] == 2
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(summary["output_dir"])
    hf_model.eval()
    # our LoRA model: base (as trained on) + Stage 2 adapters, unmerged
    ms = chain["seen"]["stage2"]["ms"]
    adapters, _ = ckpt_lib.load_params(chain["s2"], ms.abstract)
    frozen = chain["seen"]["stage2"]["frozen"]
    tokens = np.random.RandomState(1).randint(0, ms.cfg.vocab_size, (2, 20)).astype(np.int32)
    ours = np.asarray(jax.jit(lambda a, b, t: ms.merge(a, b)(t)[0])(adapters, frozen, tokens))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    diff = float(np.abs(ours - theirs).max())
    base_logits = np.asarray(jax.jit(lambda b, t: ms.plain().merge(b)(t)[0])(frozen, tokens))
    print(f"LoRA Stage 2 export: transformers vs pal_jax LoRA logits max|diff| = {diff:.3g}; "
          f"LoRA vs base {np.abs(ours - base_logits).max():.3g}")
    assert diff <= 1e-4
    assert np.abs(ours - base_logits).max() > 1e-4  # the adapters changed the model: the merge is exercised


def test_merge_export_parity_random_adapters(tmp_path):
    """A tiny random llama with random (nonzero) A and B: the merged export equals our LoRA forward."""
    torch = pytest.importorskip("torch", reason="torch (test-only, CPU wheel) is needed for the HF parity check")
    transformers = pytest.importorskip("transformers")
    lo = LoraConfig(rank=4, alpha=8.0, targets=FULL["llama"])
    model = _random(LLAMA, lo, b_std=0.05)
    out = convert.export_hf_dir(lora.merge_adapters(jax.tree.map(np.asarray, _pure(model)), lo), LLAMA,
                                tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf_model.eval()
    with torch.no_grad():
        theirs = hf_model(torch.tensor(np.asarray(TOKENS), dtype=torch.long)).logits.numpy()
    ours = np.asarray(_forward(model, TOKENS)[0])
    plain = np.asarray(_forward(_random(LLAMA), TOKENS)[0])
    diff = float(np.abs(ours - theirs).max())
    print(f"random adapters, merged export: transformers vs pal_jax LoRA logits max|diff| = {diff:.3g}; LoRA vs "
          f"base {np.abs(ours - plain).max():.3g}")
    assert np.abs(ours - plain).max() > 1e-2
    assert diff <= 1e-4
