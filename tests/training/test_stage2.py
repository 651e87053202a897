"""Stage 2: preference pairs, the DPO trainer with a frozen reference, and the pipeline."""
from __future__ import annotations

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import tiny_config
from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.model import lora
from pal_jax import pipeline as pipeline_mode
from pal_jax.training import samples
from pal_jax.training import stage1
from pal_jax.training import stage2
from pal_jax.training import loop as train
from pal_jax.core.errors import ConfigError
from pal_jax.config import validate
from pal_jax.data import convai2, corpus, preferences, templates
from pal_jax.training.experiment import Experiment

S2 = dict(stage2__steps=2, stage2__batch_size=8, stage2__warmup_steps=0, train__log_every=1, train__eval_every=2,
          predict__batch_size=8, predict__max_new_tokens=6, data__synthetic_dialogues=30)


def _max_abs_diff(a, b) -> float:
    """The largest absolute difference between two params trees' leaves."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _record_step0(seen: dict):
    """A stand-in for train.make_train_step whose step records (as numpy) the params of its first call."""
    real = train.make_train_step

    def make(*args, **kw):
        step = real(*args, **kw)

        def first(params, *rest):
            seen.setdefault("step0", jax.tree.map(np.asarray, jax.device_get(params)))
            return step(params, *rest)
        return first
    return make


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """A random-init tiny Stage 1, and the params its first train step started from."""
    workdir = tmp_path_factory.mktemp("s1")
    seen = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "make_train_step", _record_step0(seen))
        stage1.run(tiny_config(train__steps=4, data__synthetic_dialogues=30), str(workdir))
    return str(workdir), seen["step0"]


@pytest.fixture(scope="module")
def stage1_dir(stage1_run):
    return stage1_run[0]


def test_missing_stage1_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        stage2.run(tiny_config(init_from=str(tmp_path / "nothing")), str(tmp_path / "w2"))
    assert "python -m pal_jax.main --config=configs/stage1.py:tiny" in str(e.value)


def test_stage2_train_settings_extend_train_without_touching_the_config():
    c = tiny_config(train__steps=7, train__lr=3e-3, train__grad_accum=2, stage2__steps=3, stage2__lr=1e-4,
                    stage2__batch_size=4, stage2__warmup_steps=1)
    t = stage2.train_settings(c)
    assert (t.steps, t.lr, t.batch_size, t.warmup_steps) == (3, 1e-4, 4, 1)  # stage2's own schedule
    assert t.grad_accum == 2 and t.clip_norm == c.train.clip_norm and t.schedule == c.train.schedule  # shared
    assert (c.train.steps, c.train.lr) == (7, 3e-3)  # the config itself is left as given


def test_stage2_trains_and_reference_is_untouched(stage1_dir, tmp_path):
    c = tiny_config(init_from=stage1_dir, stage2__align_weight=0.0, train__sample_turns=4, **S2)
    summary, ref = stage2.train_stage2(c, str(tmp_path / "w2"))
    assert summary["step"] == 2 and np.isfinite(summary["dev"]["loss"])
    # the loop trained stage2.steps (2), not train.steps; config.json records the config as given
    saved = json.loads((tmp_path / "w2" / "config.json").read_text())
    assert c.train.steps != 2 and saved["train"]["steps"] == c.train.steps and saved["stage2"]["steps"] == 2
    # samples while training: the evaluation at step 2 decoded the 4 dev turns Stage 1's samples use
    rows = [json.loads(x) for x in open(tmp_path / "w2" / "samples.jsonl")]
    dev = convai2.records_from_dialogues(corpus.load_corpus(c.data)["dev"])
    assert [r["step"] for r in rows] == [2] * 4
    assert [r["id"] for r in rows] == [r.id for r in samples.pick_turns(dev, 4, c.data.split_seed)]
    c.tokenizer.path = os.path.join(stage1_dir, "tokenizer")
    exp = Experiment(c.copy_and_resolve_references(), str(tmp_path / "w2"), need_corpus=False)
    fresh, _ = ckpt_lib.load_params(stage1_dir, exp.model.abstract)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(fresh)):
        assert not a.is_deleted()  # never donated
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical after training
    rows = [json.loads(x) for x in open(tmp_path / "w2" / "metrics.jsonl")]
    first = [r for r in rows if "train/loss" in r][0]
    # step 1: the policy equals the reference, so every pair's DPO loss is log 2 and the margin 0; the loss adds
    # the default stage2.sft_weight = 1 times the chosen replies' mean token NLL (RPO)
    assert first["train/dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["train/chosen_nll"] > 0.5
    assert first["train/loss"] == pytest.approx(math.log(2) + 1.0 * first["train/chosen_nll"], abs=1e-4)
    assert first["train/reward_margin"] == pytest.approx(0.0, abs=1e-5)
    policy, _ = ckpt_lib.load_params(str(tmp_path / "w2"), exp.model.abstract)
    assert _max_abs_diff(policy, fresh) > 0  # the policy moved


def test_pairs_deterministic_resumable_and_precomputed_reference(stage1_dir, tmp_path):
    c = tiny_config(init_from=stage1_dir, **S2)
    info = stage2.run_make_pairs(c, str(tmp_path / "a"))
    assert info["generate_on"] == "persona" and info["turns"] > info["generate_turns"]
    assert info["generate_turns"] == info["generate_pairs"] + info["dropped_identical"] and info["generate_pairs"] > 0
    assert info["pairs"] == info["generate_pairs"] + info["select_pairs"]
    first = open(tmp_path / "a" / "pairs.jsonl").read()
    # an interrupted run: the final file and one shard gone -> the rerun rebuilds them identically
    os.remove(tmp_path / "a" / "pairs.jsonl")
    os.remove(tmp_path / "a" / "pairs_info.json")
    os.remove(tmp_path / "a" / "pairs" / "part-00000.jsonl")
    stage2.run_make_pairs(c, str(tmp_path / "a"))
    assert open(tmp_path / "a" / "pairs.jsonl").read() == first
    rows = [json.loads(x) for x in first.splitlines()]
    assert all(r["chosen"].split() != r["rejected"].split() for r in rows)
    assert all(r["persona_label"] >= 0 for r in rows if r["kind"] == "generate")
    # select pairs: on every labelled turn, the labelled target against the strongest other candidate
    shards = [json.loads(x) for f in sorted(os.listdir(tmp_path / "a" / "pairs"))
              for x in open(tmp_path / "a" / "pairs" / f)]
    sel = [r for r in rows if r["kind"] == "select"]
    assert len(sel) == len(shards) == info["select_pairs"]
    n_right = 0
    for r, t in zip(sel, shards):
        assert r["id"] == t["id"]
        persona, label, scores = t["persona"], t["persona_label"], t["select_scores"]
        targets = [templates.select_target(persona, k) for k in range(len(persona))] + [templates.NONE_PERSONA]
        li = label if label >= 0 else len(persona)
        assert t["selected"] == int(np.argmax(scores)) if np.argmax(scores) < len(persona) else t["selected"] == -1
        assert r["chosen"] == targets[li]
        wrong = [k for k in range(len(targets)) if k != li]
        assert r["rejected"] == targets[max(wrong, key=lambda k: scores[k])] != r["chosen"]
        n_right += t["selected"] == label
    assert info["stage1_selection_accuracy"] == pytest.approx(n_right / len(shards))
    # the same pairs with the reference forward per step, or with reference log-probs computed once
    pairs = str(tmp_path / "a" / "pairs.jsonl")
    live = stage2.run(tiny_config(init_from=stage1_dir, stage2__pairs=pairs, **S2), str(tmp_path / "live"))
    pre = stage2.run(tiny_config(init_from=stage1_dir, stage2__pairs=pairs, stage2__precompute_ref=True, **S2),
                     str(tmp_path / "pre"))
    assert pre["dev"]["loss"] == pytest.approx(live["dev"]["loss"], abs=1e-5)
    # persona-free replies were decoded only on persona turns, so the paper's setting cannot reuse these shards:
    # it says so, and rebuilds them once they are deleted; then every turn gives a generate pair
    assert all((t["rejected"] is None) == (t["persona_label"] < 0) for t in shards)
    os.remove(tmp_path / "a" / "pairs.jsonl")
    os.remove(tmp_path / "a" / "pairs_info.json")
    c_all = tiny_config(init_from=stage1_dir, stage2__generate_pairs_on="all", **S2)
    with pytest.raises(ValueError, match=r"pairs: shards decoded with fewer persona-free replies .* delete"):
        stage2.run_make_pairs(c_all, str(tmp_path / "a"))
    shutil.rmtree(tmp_path / "a" / "pairs")
    every = stage2.run_make_pairs(c_all, str(tmp_path / "a"))
    assert every["generate_turns"] == every["turns"] == info["turns"]
    assert every["generate_pairs"] + every["dropped_identical"] == info["turns"] > info["generate_pairs"]
    assert every["select_pairs"] == info["select_pairs"]
    every_rows = [json.loads(x) for x in open(tmp_path / "a" / "pairs.jsonl")]
    persona_ids = {r["id"] for r in rows if r["kind"] == "generate"}
    assert persona_ids == {r["id"] for r in every_rows if r["kind"] == "generate" and r["persona_label"] >= 0}
    assert any(r["persona_label"] == -1 for r in every_rows if r["kind"] == "generate")


def test_pipeline_runs_and_skips_finished_phases(tmp_path):
    c = tiny_config(train__steps=3, predict__max_records=8, **S2)
    out = pipeline_mode.run(c, str(tmp_path))
    table = open(out["report"]).read()
    assert "| metric | stage1 | stage2 | stage2 - stage1 |" in table and "Persona selection acc." in table
    assert "## What Stage 2 moved" in table and "| F1 |" in table and "select pairs" in table
    m = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert {r["select_by"] for r in m["results"].values()} == {"calibrated"}  # one rule for every checkpoint
    assert m["bootstrap"]["turns"] == 8 and "f1" in m["differences"]["stage2 - stage1"]
    assert set(m["by_turn_type"]) <= {"persona", "none"} and m["by_turn_type"]
    # the Stage 1 bias fitted for the pairs is the one the evaluation reads (one fit, saved in the workdir)
    cal = json.load(open(tmp_path / "stage1" / "select_calibration.json"))
    assert m["results"]["stage1"]["none_bias"] == cal["none_bias"]
    mtime = os.path.getmtime(tmp_path / "eval" / "metrics.json")
    again = pipeline_mode.run(c, str(tmp_path))
    assert os.path.getmtime(tmp_path / "eval" / "metrics.json") == mtime
    assert again["stage1_s"] < 5 and again["pairs_and_stage2_s"] < 5


def test_pipeline_adds_the_base_model_when_stage1_starts_from_pretrained_weights(tmp_path, stage1_dir):
    assert pipeline_mode.base_model(tiny_config()) is None  # random init: no base column
    assert pipeline_mode.base_model(tiny_config(init_from=stage1_dir)) is None  # a pal_jax workdir is no base
    assert pipeline_mode.base_model(tiny_config(init_from="smollm2_gguf")) == "smollm2_gguf"
    assert pipeline_mode.base_model(tiny_config(init_from="/x/model.Q4_1.gguf")) == "/x/model.Q4_1.gguf"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert pipeline_mode.base_model(tiny_config(init_from=str(hf))) == str(hf)
    # the "What Stage 2 moved" section gains a Stage 2 - base column and the base's "none" share
    res = {"base": {"f1": 0.10, "perplexity": 40.0, "selects_none": 0.5},
           "stage1": {"f1": 0.15, "perplexity": 30.0, "selects_none": 0.25},
           "stage2": {"f1": 0.14, "perplexity": 20.0, "selects_none": 0.0}}
    lines = pipeline_mode.what_moved(res, {}, str(tmp_path / "none"))  # no intervals: the plain differences
    assert "| metric | stage2 - stage1 [95% CI] | better | stage2 - base [95% CI] | better |" in lines
    assert "| F1 | -0.0100 | no | +0.0400 | yes |" in lines
    assert "| Perplexity | -10.0000 | yes | -20.0000 | yes |" in lines
    assert any("base 0.5000, stage1 0.2500, stage2 0.0000" in x for x in lines)
    # with the report's paired intervals: a difference whose interval holds 0 is "n.s.", not "no"
    diffs = {"stage2 - stage1": {"f1": {"delta": -0.01, "lo": -0.03, "hi": 0.01, "significant": False},
                                 "perplexity": {"delta": -10.0, "lo": -12.0, "hi": -8.0, "significant": True}},
             "stage2 - base": {"f1": {"delta": 0.04, "lo": 0.02, "hi": 0.06, "significant": True}}}
    lines = pipeline_mode.what_moved(res, diffs, str(tmp_path / "none"))
    assert "| F1 | -0.0100 [-0.0300, +0.0100] | n.s. | +0.0400 [+0.0200, +0.0600] | yes |" in lines
    assert "| Perplexity | -10.0000 [-12.0000, -8.0000] | yes | -20.0000 | yes |" in lines
    assert any("base 0.5000, stage1 0.2500, stage2 0.0000" in x for x in lines)


def test_select_and_generate_pairs_encode_to_their_prompts(stage1_dir):
    from pal_jax.model import tokenizer as tok_lib
    tok = tok_lib.load_tokenizer(os.path.join(stage1_dir, "tokenizer"))
    persona, history = ["i have two dogs.", "i am a nurse."], ["hi , what is your job ?"]
    base = {"persona": persona, "history": history, "persona_label": 1}
    rows = [{**base, "kind": "generate", "chosen": "i am a nurse .", "rejected": "i like pizza ."},
            {**base, "kind": "select", "chosen": templates.select_target(persona, 1),
             "rejected": templates.NONE_PERSONA}]
    enc = stage2.encode_pairs(rows, tok, 128)
    assert enc.is_select == [False, True]
    assert tok.decode(enc.prompt[0]) == templates.generate_prompt(persona, history, persona[1]).text()
    assert tok.decode(enc.prompt[1]) == templates.select_prompt(persona, history).text()
    assert tok.decode(enc.chosen[1][:-1]) == "2.i am a nurse."
    src = stage2.PairSource(enc, 2, (64, 128), seed=0)
    src.set_pad(tok.pad_id)
    batch = src.make_batch(np.array([0, 1]))
    # rows: [chosen 0, chosen 1, rejected 0, rejected 1]; alignment only on the generate pair
    np.testing.assert_array_equal(batch["align_mask"], [1, 0, 1, 0])
    np.testing.assert_array_equal(batch["valid"], [1, 1, 1, 1])
    # the loss weights cover exactly the response (+ eos) of each row
    for r, (i, resp) in enumerate([(0, enc.chosen[0]), (1, enc.chosen[1]), (0, enc.rejected[0]),
                                   (1, enc.rejected[1])]):
        w = batch["weights"][r] > 0
        assert batch["targets"][r][w].tolist() == resp


# -- stage2.reference: the Stage 1 model (default) or the weights Stage 1 started from -------------------------------

def _np(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _reference(s1: str, which: str, devices=None, tok=None, **overrides):
    """(reference params, (frozen base, adapters) or None, the Experiment) as train_stage2 builds them."""
    c = tiny_config(init_from=s1, stage2__reference=which, tokenizer__path=tok or os.path.join(s1, "tokenizer"), **S2,
                    **overrides)
    exp = Experiment(c, s1, need_corpus=False, devices=devices)
    tree, lora_state = stage2.stage1_params(exp, s1)
    return stage2.reference_params(exp, s1, which, tree, lora_state)[0], lora_state, exp


def test_base_reference_is_the_rebuilt_random_init_of_stage1(stage1_run):
    s1, step0 = stage1_run
    ref, _, exp = _reference(s1, "stage1")
    final = _np(ckpt_lib.load_params(s1, exp.model.abstract)[0])
    for a, b in zip(_np(ref), final):
        np.testing.assert_array_equal(a, b)
    # rebuilt from Stage 1's saved seed and model config, here on a 1-device mesh (Stage 1 ran on 8)
    ref, _, _ = _reference(s1, "base", devices=jax.devices()[:1])
    got, want = _np(ref), [np.asarray(x) for x in jax.tree.leaves(step0)]
    assert len(got) == len(want) == len(final)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)  # bit-identical to Stage 1's step-0 params
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, final)) > 0  # and not Stage 1's trained ones


def test_base_reference_refuses_a_random_init_it_cannot_rebuild(stage1_dir):
    _, _, exp = _reference(stage1_dir, "base")
    saved = ckpt_lib.load_meta(stage1_dir)["config"]
    other = {**saved, "model": {**saved["model"], "d_ff": 2 * saved["model"]["d_ff"]}}
    with pytest.raises(ValueError, match=r"config\.stage2\.reference = 'base'.*random init.*stage2\.reference=stage1"):
        stage2._random_init(exp, stage1_dir, other)


@pytest.fixture(scope="module")
def pairs_file(stage1_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pairs"))
    stage2.run_make_pairs(tiny_config(init_from=stage1_dir, **S2), workdir)
    return os.path.join(workdir, "pairs.jsonl")


def _first_step(workdir) -> dict:
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in rows if "train/loss" in r][0]


@pytest.mark.slow  # three Stage 2 runs, 30 s; the default suite's loss-type and reference tests cover each path
def test_first_dpo_loss_is_log2_only_against_the_stage1_reference(stage1_run, pairs_file, tmp_path):
    s1, step0 = stage1_run
    one = dict(S2, stage2__steps=1, stage2__pairs=pairs_file, stage2__align_weight=0.0)
    out = {}
    for name, which, pre in (("stage1", "stage1", True), ("base", "base", False), ("base_pre", "base", True)):
        c = tiny_config(init_from=s1, stage2__reference=which, stage2__precompute_ref=pre, **one)
        summary, ref = stage2.train_stage2(c, str(tmp_path / name))
        assert summary["reference"] == which and summary["stage1"] == s1
        saved = json.load(open(tmp_path / name / "config.json"))
        assert saved["stage2"]["reference"] == which  # the run's resolved config records it
        out[name] = (_first_step(tmp_path / name), ref)
    # the policy starts from Stage 1 in both cases: against Stage 1 it equals the reference, so loss log 2
    assert out["stage1"][0]["train/dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert out["stage1"][0]["train/reward_margin"] == pytest.approx(0.0, abs=1e-5)
    base = out["base"][0]
    assert abs(base["train/dpo_loss"] - math.log(2)) > 1e-3 and abs(base["train/reward_margin"]) > 1e-3
    # precomputed reference log-probs give the same first step as the reference forward
    assert out["base_pre"][0]["train/dpo_loss"] == pytest.approx(base["train/dpo_loss"], abs=1e-5)
    for a, b in zip(jax.tree.leaves(out["base"][1]), jax.tree.leaves(step0)):
        assert not a.is_deleted()  # the base reference was never donated
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta = ckpt_lib.load_meta(str(tmp_path / "base"))
    assert meta["data"]["reference"] == "base" and "random init" in meta["data"]["reference_weights"]


@pytest.mark.parametrize("loss_type,pre,want", [
    ("ipo", False, 25.0),
    # a weighted list with the length-normalised loss, on precomputed reference log-probs: 2 apo_zero terms of 1,
    # a hinge of 1 at weight 0.5, and log 2 for sigmoid_norm (its normalised margin is 0 too)
    ("sigmoid_norm,apo_zero:2,hinge:0.5", True, math.log(2) + 2.0 + 0.5),
])
def test_loss_type_reaches_the_train_step(stage1_run, pairs_file, tmp_path, loss_type, pre, want):
    """stage2.loss_type: at the first step the policy equals the Stage 1 reference, so h = 0 and the loss is known:
    ipo (1 / (2 beta))^2 = 25 at beta 0.1 (sigmoid DPO gives log 2 there)."""
    s1, _ = stage1_run
    c = tiny_config(init_from=s1, stage2__loss_type=loss_type, stage2__beta=0.1, stage2__precompute_ref=pre,
                    **dict(S2, stage2__steps=1, stage2__pairs=pairs_file, stage2__align_weight=0.0))
    stage2.train_stage2(c, str(tmp_path / "run"))
    first = _first_step(tmp_path / "run")
    assert first["train/dpo_loss"] == pytest.approx(want, rel=1e-5)
    assert first["train/reward_margin"] == pytest.approx(0.0, abs=1e-5)  # the same metrics for every loss type


SAME = ("loss", "dpo_loss", "chosen_nll", "align_loss", "logps_chosen", "logps_rejected", "reward_margin",
        "grad_norm", "perplexity")


def test_share_prompt_trains_the_same_steps_as_the_two_row_layout(stage1_run, pairs_file, tmp_path):
    """stage2.share_prompt through train_stage2: the same batches, losses and held-out metrics as two rows per pair
    (float rounding aside), here with the precomputed reference log-probs on the shared side; and with
    stage2.flat_window on the shared rows (the reference's forward in the step; a data 2 x fsdp 2 x tensor 2 mesh:
    4 groups of 2 rows)."""
    s1, _ = stage1_run
    logged = {}
    for name, share, flat in (("plain", False, False), ("shared", True, False), ("flat", True, True)):
        mesh = dict(mesh__data=2, mesh__fsdp=2, mesh__tensor=2) if flat else {}
        c = tiny_config(init_from=s1, stage2__share_prompt=share, stage2__precompute_ref=share and not flat,
                        stage2__flat_window=flat, **mesh, **dict(S2, stage2__pairs=pairs_file))
        summary, _ = stage2.train_stage2(c, str(tmp_path / name))
        assert summary["step"] == 2
        rows = [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]
        logged[name] = {(r["step"], k): v for r in rows for k, v in r.items()
                        if k.split("/")[0] in ("train", "dev") and k.split("/")[-1] in SAME}
    assert logged["plain"].keys() == logged["shared"].keys() == logged["flat"].keys()
    assert len(logged["plain"]) == 2 * 8 + 8  # steps 1 and 2, and the held-out evaluation at step 2
    for key, v in logged["plain"].items():
        assert logged["shared"][key] == pytest.approx(v, rel=1e-4, abs=1e-5), key
        assert logged["flat"][key] == pytest.approx(v, rel=1e-4, abs=1e-5), key


def test_config_refuses_bad_loss_types_naming_the_key_and_entry():
    validate(tiny_config(stage2__loss_type="sigmoid:1,ipo:0.5"))
    validate(tiny_config(stage2__loss_type="sigmoid_norm", stage2__norm_use_reference=False,
                         stage2__simpo_gamma=0.5))
    with pytest.raises(ConfigError, match=r"config\.stage2\.loss_type = 'kto': expected one of"):
        validate(tiny_config(stage2__loss_type="kto"))
    for bad, entry in (("sigmoid:1,kto:2", "kto:2"), ("sigmoid:0", "sigmoid:0"), ("ipo:x", "ipo:x"),
                       ("ipo,ipo", "ipo"), ("sigmoid,", "")):
        with pytest.raises(ConfigError) as err:
            validate(tiny_config(stage2__loss_type=bad))
        msg = str(err.value)
        assert f"config.stage2.loss_type = {bad!r}: expected one of" in msg and "'sigmoid:1,ipo:0.5'" in msg
        assert f"bad entry {entry!r}" in msg
    with pytest.raises(ConfigError, match=r"config\.stage2\.simpo_gamma = -1"):
        validate(tiny_config(stage2__simpo_gamma=-1.0))


def test_config_rejects_an_unknown_reference():
    validate(tiny_config(mode="stage2", init_from="W1", stage2__reference="base"))
    with pytest.raises(ConfigError, match=r"config\.stage2\.reference = 'foo': expected 'stage1'.* or 'base'"):
        validate(tiny_config(stage2__reference="foo"))


@pytest.mark.slow  # a LoRA variant of a path the default suite covers without LoRA; `pytest -m slow`
def test_lora_base_reference_is_the_frozen_base_without_adapters(stage1_dir, pairs_file, tmp_path):
    """A LoRA Stage 1 on another pal_jax workdir (stage1_dir): "base" = that workdir's params + zero adapters,
    sharing the policy's frozen base arrays; "stage1" = the same base + Stage 1's trained adapters."""
    tok = os.path.join(stage1_dir, "tokenizer")
    lo = dict(lora__rank=4, lora__alpha=8.0)
    s1 = str(tmp_path / "lora_s1")
    stage1.run(tiny_config(init_from=stage1_dir, tokenizer__path=tok, train__steps=2, train__eval_every=2,
                           train__checkpoint_every=2, data__synthetic_dialogues=30, **lo), s1)
    init_w = _np(ckpt_lib.load_params(stage1_dir, _reference(stage1_dir, "stage1")[2].model.abstract)[0])
    ref, (frozen, _), exp = _reference(s1, "base", tok=tok, **lo)
    ref_adapters, ref_base = lora.split(ref)
    assert all(a is b for a, b in zip(jax.tree.leaves(ref_base), jax.tree.leaves(frozen)))  # one copy of the base
    assert jax.tree.structure(ref_base) == jax.tree.structure(frozen)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(ref_adapters))  # no adapter contribution
    for a, b in zip(_np(ref_base), init_w):  # the base is what Stage 1 started from: stage1_dir's params
        np.testing.assert_array_equal(a, b)
    ms = exp.model
    tokens = np.random.RandomState(0).randint(0, ms.cfg.vocab_size, (2, 16)).astype(np.int32)
    ours = jax.jit(lambda p, t: ms.merge(p)(t)[0])(ref, tokens)
    plain = jax.jit(lambda p, t: ms.plain().merge(p)(t)[0])(ref_base, tokens)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), rtol=0, atol=1e-6)  # = the base model alone
    s1_ref, (frozen1, _), _ = _reference(s1, "stage1", tok=tok, **lo)
    s1_adapters, s1_base = lora.split(s1_ref)
    assert all(a is b for a, b in zip(jax.tree.leaves(s1_base), jax.tree.leaves(frozen1)))
    assert max(float(np.abs(x).max()) for x in _np(s1_adapters)) > 0  # Stage 1's trained adapters
    # without LoRA in Stage 2, "base" is the same weights as one full tree
    full, _, _ = _reference(s1, "base", tok=tok)
    for a, b in zip(_np(full), init_w):
        np.testing.assert_array_equal(a, b)
    # one Stage 2 step against it, with precomputed reference log-probs: the reference stays intact
    c = tiny_config(init_from=s1, tokenizer__path=tok, stage2__reference="base", stage2__precompute_ref=True,
                    **lo, **dict(S2, stage2__steps=1, stage2__pairs=pairs_file, stage2__align_weight=0.0))
    summary, ref = stage2.train_stage2(c, str(tmp_path / "lora_s2"))
    assert summary["reference"] == "base" and "no adapters" in summary["reference_weights"]
    ref_adapters, ref_base = lora.split(ref)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(ref_adapters))
    for a, b in zip(jax.tree.leaves(ref_base), init_w):
        assert not a.is_deleted()
        np.testing.assert_array_equal(np.asarray(a), b)
    first = _first_step(tmp_path / "lora_s2")
    print(f"LoRA Stage 2 against the base: first-step DPO loss {first['train/dpo_loss']:.6f} "
          f"margin {first['train/reward_margin']:.3g}")
    assert abs(first["train/reward_margin"]) > 1e-4 and np.isfinite(first["train/dpo_loss"])


def test_rejected_replies_come_from_the_configured_prompt(stage1_dir, tmp_path):
    """stage2.rejected: the generate pairs' rejected side is the Stage 1 model's greedy reply to that prompt (the
    persona-free one, the generate prompt without a persona, or the one with the labelled persona highlighted);
    shards decoded one way are refused by another."""
    from pal_jax.training import make_pairs as pairs_lib
    from pal_jax.inference.predictor import Record
    c = tiny_config(init_from=stage1_dir, **S2)
    exp = Experiment(c.copy_and_resolve_references(), str(tmp_path / "x"))
    s1_params, _ = stage2.stage1_params(exp, stage1_dir)
    predictor = stage2.stage1_predictor(c, exp, s1_params, stage1_dir)
    recs = [r for r in pairs_lib.convai2.records_from_dialogues(exp.corpus["train"]) if r.persona_label >= 0][:8]
    got = {k: pairs_lib.rejected_replies(predictor, recs, k) for k in pairs_lib.REJECTED_FROM}
    assert got["highlighted"] == predictor.generate(recs, [r.persona_label for r in recs])
    assert got["persona_free"] == predictor.persona_free(recs)
    assert got["no_persona"] == predictor.generate([Record((), r.history) for r in recs], [-1] * len(recs))
    info = stage2.run_make_pairs(tiny_config(init_from=stage1_dir, stage2__rejected="highlighted", **S2),
                                 str(tmp_path / "h"))
    assert info["rejected_from"] == "highlighted"
    shard = [json.loads(x) for x in open(tmp_path / "h" / "pairs" / "part-00000.jsonl")]
    turns = pairs_lib.convai2.records_from_dialogues(exp.corpus["train"])[:len(shard)]
    asked = [r for r in turns if r.persona_label >= 0]  # the same records in the same batches as make_pairs
    want = iter(predictor.generate(asked, [r.persona_label for r in asked]))
    assert [t["rejected"] for t in shard] == [next(want) if r.persona_label >= 0 else None for r in turns]
    os.remove(tmp_path / "h" / "pairs.jsonl")
    os.remove(tmp_path / "h" / "pairs_info.json")
    with pytest.raises(ValueError, match=r"shards decoded with stage2.rejected=\['highlighted'\], not "
                                         r"'persona_free'; delete"):
        stage2.run_make_pairs(c, str(tmp_path / "h"))
    with pytest.raises(ConfigError, match=r"config\.stage2\.rejected = 'gold': expected one of"):
        validate(tiny_config(stage2__rejected="gold"))


def test_stage2_trains_on_a_users_preference_file_in_both_forms(stage1_dir, tmp_path, caplog):
    """stage2.pairs = the user's JSONL, persona-form and conversational lines mixed (the tiny Stage 1 has no chat
    template: the system message is the persona); an empty reply is dropped, counted and logged, never trained on."""
    personas = [[f"i like sport {k}.", f"i have {k} cats."] for k in range(8)]
    lines = []
    for k, persona in enumerate(personas):
        lines.append({"persona": persona, "history": ["hi , any pets ?"], "chosen": f"yes , {k} cats .",
                      "rejected": "no ."})
        lines.append({"prompt": [{"role": "system", "content": "\n".join(persona)},
                                 {"role": "user", "content": "what do you like ?"}],
                      "chosen": [{"role": "assistant", "content": f"sport {k} !"}],
                      "rejected": [{"role": "assistant", "content": "" if k == 0 else "nothing ."}]})
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    c = tiny_config(init_from=stage1_dir, stage2__pairs=str(path), stage2__dev_fraction=0.3,
                    stage2__align_weight=0.0, **dict(S2, stage2__steps=1))
    with caplog.at_level("INFO"):
        summary, _ = stage2.train_stage2(c, str(tmp_path / "w"))
    data = ckpt_lib.load_meta(str(tmp_path / "w"))["data"]
    assert data["train_pairs"] + data["dev_pairs"] == len(lines) - 1 and data["dev_pairs"] > 0
    dropped = [r.getMessage() for r in caplog.records if "pairs dropped: empty chosen/rejected" in r.getMessage()]
    assert len(dropped) == 1 and ": 1 pairs dropped: empty chosen/rejected after truncation (1 empty" in dropped[0]
    assert _first_step(tmp_path / "w")["train/dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)


# -- stage2.precompute_ref: reference log-probs cached on disk (pal_jax/training/ref_cache.py) ----------------------------------

def _count_reference_passes(monkeypatch) -> list:
    calls = []
    real = stage2.precompute_reference

    def counted(ms, ref_params, src):
        calls.append(len(src.pairs.prompt))
        return real(ms, ref_params, src)
    monkeypatch.setattr(stage2, "precompute_reference", counted)
    return calls


def test_params_hash_is_the_same_on_any_mesh_and_sees_one_changed_bit():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from pal_jax.training import ref_cache
    rng = np.random.RandomState(0)
    tree = {"w": rng.randn(8, 6).astype(np.float32), "b": rng.randn(6).astype(np.float32).astype(jax.numpy.bfloat16)}
    one = ref_cache.params_hash(jax.device_put(tree, jax.devices()[0]))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    sharded = {"w": jax.device_put(tree["w"], NamedSharding(mesh, P("a", "b"))),
               "b": jax.device_put(tree["b"], NamedSharding(mesh, P("b")))}
    assert ref_cache.params_hash(sharded) == one
    flipped = tree["w"].copy()
    flipped.view(np.uint32)[3, 4] ^= 1  # the lowest mantissa bit of one element
    assert ref_cache.params_hash({**tree, "w": flipped}) != one
    assert ref_cache.params_hash({"w": tree["w"].T.copy().T, "b": tree["b"]}) == one  # the values, not the layout
    assert ref_cache.params_hash({"w2": tree["w"], "b": tree["b"]}) != one  # the paths count


def test_reference_logps_are_cached_beside_the_pairs_and_never_trusted_blindly(stage1_dir, pairs_file, tmp_path,
                                                                                 monkeypatch, caplog):
    import logging
    from etils import epath
    from pal_jax.training import ref_cache
    pairs_dir = tmp_path / "pairs"
    pairs_dir.mkdir()
    pairs = str(pairs_dir / "pairs.jsonl")
    shutil.copy(pairs_file, pairs)
    calls = _count_reference_passes(monkeypatch)
    one = dict(S2, stage2__steps=1, stage2__pairs=pairs, stage2__align_weight=0.0, stage2__precompute_ref=True)
    c = tiny_config(init_from=stage1_dir, **one)
    caplog.set_level(logging.INFO)
    # a miss: computed (train and dev splits) and written beside the pairs file
    first = stage2.run(c, str(tmp_path / "w1"))
    path = first["ref_logps_cache"]
    assert len(calls) == 2 and os.path.dirname(path) == str(pairs_dir / "ref_logps") and os.path.exists(path)
    assert f"reference log-probs: computed and cached {path}" in caplog.text
    assert not [f for f in os.listdir(pairs_dir / "ref_logps") if ".tmp" in f]  # written whole, then renamed
    # a hit: another Stage 2 (another workdir) on the same pairs and reference runs no reference forward (checked
    # without a training run: the same inputs as train_stage2's)
    c2 = c.copy_and_resolve_references()
    c2.tokenizer.path = os.path.join(stage1_dir, "tokenizer")
    exp = Experiment(c2, str(tmp_path / "w3"), need_corpus=False)
    ref, _ = stage2.stage1_params(exp, stage1_dir)

    def lookup(pairs_path):
        src, dev = stage2.pair_sources(c2, exp.tokenizer, pairs_path, stage1_dir)
        caplog.clear()
        got = stage2.cached_reference(c2, exp.model, ref, {"train": src, "dev": dev}, pairs_path, exp.tokenizer,
                                      str(tmp_path / "w3"))
        return got, src
    (p, hit), src = lookup(pairs)
    assert (p, hit, len(calls)) == (path, True, 2)
    assert f"reference log-probs: cache hit {path}" in caplog.text
    good = np.load(path)["train"]
    np.testing.assert_array_equal(src.ref_logps, good)
    # a damaged file (bytes flipped in its arrays): a warning, computed again and rewritten, the same numbers
    raw = bytearray(open(path, "rb").read())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    (p, hit), src = lookup(pairs)
    assert (p, hit, len(calls)) == (path, False, 4)
    assert "is not used" in caplog.text and "computing them again" in caplog.text
    np.testing.assert_allclose(src.ref_logps, good, rtol=0, atol=1e-5)
    assert lookup(pairs)[0] == (path, True) and len(calls) == 4  # the rewritten file is trusted again
    # a file whose record is another run's (renamed by hand): refused, naming what differs
    tr, dv = stage2.pair_sources(c2, exp.tokenizer, pairs, stage1_dir)
    key = ref_cache.cache_key(c2, pairs, ref, exp.tokenizer, {"train": tr.pairs, "dev": dv.pairs})
    sizes = {"train": len(good), "dev": len(dv.pairs.prompt)}
    assert ref_cache.load(epath.Path(path), key, sizes) is not None
    assert ref_cache.load(epath.Path(path), {**key, "max_len": 64}, sizes) is None
    assert "differs from this run's in ['max_len']" in caplog.text
    # another pairs file (one pair fewer): another fingerprint, a miss
    lines = open(pairs).read().splitlines(keepends=True)
    open(pairs, "w").write("".join(lines[:-1]))
    (p, hit), _ = lookup(pairs)
    assert not hit and p != path and len(calls) == 6
    assert sorted(os.listdir(pairs_dir / "ref_logps")) == sorted([os.path.basename(path), os.path.basename(p)])


# -- stage2.ref_sync_every / ref_sync_alpha: the TR-DPO reference update --------------------------------------------

def _record_steps(seen: list):
    """A stand-in for train.make_train_step recording (params, extra) as numpy at every call (before the step)."""
    real = train.make_train_step

    def make(*args, **kw):
        step = real(*args, **kw)

        def record(params, opt_state, batch, extra, *rest):
            seen.append((_np(params), _np(extra)))
            return step(params, opt_state, batch, extra, *rest)
        return record
    return make


def test_trdpo_reference_moves_by_the_mix_at_its_steps_and_resumes_exactly(stage1_dir, pairs_file, tmp_path,
                                                                           monkeypatch):
    alpha = 0.6
    c = tiny_config(init_from=stage1_dir, **dict(S2, stage2__steps=5, stage2__pairs=pairs_file,
                                                  stage2__align_weight=0.0, stage2__ref_sync_every=2,
                                                  stage2__ref_sync_alpha=alpha, train__eval_every=5,
                                                  train__checkpoint_every=3, train__log_every=5))
    validate(c)
    seen = []
    monkeypatch.setattr(train, "make_train_step", _record_steps(seen))
    w = tmp_path / "w"
    _, final_ref = stage2.train_stage2(c, str(w))
    assert len(seen) == 5
    params = [p for p, _ in seen]  # params[k]: the policy after k steps
    refs = [r for _, r in seen]  # refs[k]: the reference step k + 1 used

    def mix(p, r):
        return [np.float32(alpha) * a + np.float32(1 - alpha) * b for a, b in zip(p, r)]

    def same(a, b, tol=0.0):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=tol, atol=tol)
    same(refs[0], params[0])  # the Stage 1 model, the policy's start
    same(refs[1], refs[0])  # no update after step 1
    same(refs[2], mix(params[2], refs[1]), 1e-6)  # after step 2: ref <- alpha * policy + (1 - alpha) * ref
    assert max(float(np.abs(a - b).max()) for a, b in zip(refs[2], refs[1])) > 0
    same(refs[3], refs[2])  # not after step 3
    same(refs[4], mix(params[4], refs[3]), 1e-6)  # after step 4
    same(_np(final_ref), refs[4])  # step 5 is no update step: the run ends with that reference
    final_policy = _np(ckpt_lib.load_params(str(w), _abstract(c, stage1_dir, w))[0])
    # resume from the step-3 checkpoint (its reference: the one moved after step 2): the same steps 4 and 5
    shutil.rmtree(w / "checkpoints" / "5")
    seen.clear()
    _, ref2 = stage2.train_stage2(c, str(w))
    assert len(seen) == 2
    same(seen[0][1], refs[3])  # the restored reference, exactly
    same(seen[0][0], params[3])
    same(seen[1][1], refs[4], 1e-6)
    same(_np(ref2), _np(final_ref), 1e-6)
    same(_np(ckpt_lib.load_params(str(w), _abstract(c, stage1_dir, w))[0]), final_policy, 1e-6)
    # a run that changes the update (or turns it off) cannot resume that checkpoint
    with pytest.raises(ConfigError,
                       match=r"(?s)cannot resume .*stage2\.ref_sync.*\{'every': 2, 'alpha': 0\.6\}, now None"):
        stage2.train_stage2(tiny_config(init_from=stage1_dir, **dict(
            S2, stage2__steps=6, stage2__pairs=pairs_file, stage2__align_weight=0.0, train__eval_every=5,
            train__checkpoint_every=3)), str(w))


def _abstract(c, s1, w):
    c2 = c.copy_and_resolve_references()
    c2.tokenizer.path = os.path.join(s1, "tokenizer")
    return Experiment(c2, str(w), need_corpus=False).model.abstract


@pytest.mark.slow  # a LoRA variant of a path the default suite covers without LoRA; `pytest -m slow`
def test_trdpo_with_lora_hard_update_moves_the_adapters_only(stage1_dir, pairs_file, tmp_path):
    """LoRA Stage 2 on a full Stage 1: the policy and the reference share the frozen base; with alpha = 1 the
    reference's adapters become the policy's after every update step, and its base stays the base."""
    lo = dict(lora__rank=4, lora__alpha=8.0)
    c = tiny_config(init_from=stage1_dir, tokenizer__path=os.path.join(stage1_dir, "tokenizer"), **lo,
                    **dict(S2, stage2__steps=1, stage2__pairs=pairs_file, stage2__align_weight=0.0,
                           stage2__ref_sync_every=1, stage2__ref_sync_alpha=1.0))
    validate(c)
    _, ref = stage2.train_stage2(c, str(tmp_path / "w"))
    ref_adapters, ref_base = lora.split(ref)
    exp = Experiment(c.copy_and_resolve_references(), str(tmp_path / "w"), need_corpus=False)
    policy, _ = ckpt_lib.load_params(str(tmp_path / "w"), exp.model.abstract)  # the adapters after step 1
    for a, b in zip(_np(ref_adapters), _np(policy)):
        np.testing.assert_array_equal(a, b)
    moved_b = [np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(ref_adapters)[0]
               if str(p[-1]).strip("[]'\"").endswith("_lora_b")]
    assert moved_b and max(float(np.abs(x).max()) for x in moved_b) > 0  # B starts at zero: these are trained
    plain = exp.model.plain()
    for a, b in zip(_np(ref_base), _np(ckpt_lib.load_params(stage1_dir, plain.abstract)[0])):
        np.testing.assert_array_equal(a, b)  # the frozen base: Stage 1's params


def test_config_checks_the_reference_update_keys():
    validate(tiny_config(stage2__ref_sync_every=512, stage2__ref_sync_alpha=0.6))
    validate(tiny_config(stage2__ref_sync_every=4, stage2__ref_sync_alpha=1.0, lora__rank=4))
    validate(tiny_config(stage2__precompute_ref=True, lora__rank=4))  # off: no constraint
    cases = [(dict(stage2__ref_sync_every=-1), r"config\.stage2\.ref_sync_every = -1: expected an integer >= 0"),
             (dict(stage2__ref_sync_alpha=0.0), r"config\.stage2\.ref_sync_alpha = 0\.0: expected a finite number"),
             (dict(stage2__ref_sync_alpha=1.5), r"config\.stage2\.ref_sync_alpha = 1\.5: expected .*\(0, 1\]"),
             (dict(stage2__ref_sync_alpha=float("nan")), r"config\.stage2\.ref_sync_alpha = nan"),
             (dict(stage2__ref_sync_every=8, stage2__precompute_ref=True),
              r"config\.stage2\.ref_sync_every > 0 .* config\.stage2\.precompute_ref = True"),
             (dict(stage2__ref_sync_every=8, stage2__ref_sync_alpha=0.6, lora__rank=4),
              r"config\.stage2\.ref_sync_alpha = 0\.6 with config\.lora\.rank = 4 .*ref_sync_alpha=1")]
    for overrides, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            validate(tiny_config(**overrides))


def test_pair_keep_rules_rebuild_the_pairs_from_the_decoded_shards(stage1_dir, tmp_path, caplog):
    """stage2.identical_pairs=keep keeps the generate pairs whose rejected reply equals the gold one, and
    stage2.select_rejected=own_pick pairs the labelled target with the model's own pick. Changing either (or
    select_pairs, or max_pair_turns) rebuilds pairs.jsonl from the shards without decoding the turns again."""
    w = str(tmp_path / "p")
    c = tiny_config(init_from=stage1_dir, stage2__rejected="highlighted", **S2)
    drop = stage2.run_make_pairs(c, w)
    shard_dir = tmp_path / "p" / "pairs"
    stamps = {f: os.stat(shard_dir / f).st_mtime_ns for f in os.listdir(shard_dir)}
    shards = [json.loads(x) for f in sorted(stamps) for x in open(shard_dir / f)]
    persona = [t for t in shards if t["persona_label"] >= 0]
    same = [t for t in persona if t["chosen"].split() == t["rejected"].split()]
    assert drop["identical_kept"] == 0 and drop["dropped_identical"] == len(same)
    assert drop["select_pairs"] == len(shards)  # runner-up: one per turn, never identical

    keep = tiny_config(init_from=stage1_dir, stage2__rejected="highlighted", stage2__identical_pairs="keep",
                       stage2__select_rejected="own_pick", **S2)
    with caplog.at_level("INFO"):
        info = stage2.run_make_pairs(keep, w)
    assert "built with other settings (identical 'drop' -> 'keep', select_rejected 'runner_up' -> 'own_pick')" \
        in caplog.text
    assert {f: os.stat(shard_dir / f).st_mtime_ns for f in os.listdir(shard_dir)} == stamps  # not decoded again
    rows = [json.loads(x) for x in open(tmp_path / "p" / "pairs.jsonl")]
    gen = [r for r in rows if r["kind"] == "generate"]
    sel = [r for r in rows if r["kind"] == "select"]
    assert info["generate_pairs"] == len(gen) == len(persona) and info["dropped_identical"] == 0
    assert [(r["id"], r["chosen"], r["rejected"]) for r in gen] == \
        [(t["id"], t["chosen"], t["rejected"]) for t in persona]
    right = [t for t in shards if t["selected"] == t["persona_label"]]
    assert len(sel) == len(shards) and info["identical_kept"] == len(same) + len(right)
    for r, t in zip(sel, shards):
        assert r["chosen"] == templates.select_target(t["persona"], t["persona_label"])
        assert r["rejected"] == templates.select_target(t["persona"], t["selected"])
    # own_pick without keeping identical pairs: only the wrong picks give select pairs
    info = stage2.run_make_pairs(tiny_config(init_from=stage1_dir, stage2__rejected="highlighted",
                                             stage2__select_rejected="own_pick", **S2), w)
    assert info["select_pairs"] == len(shards) - len(right) and info["generate_pairs"] == len(persona) - len(same)
    # fewer turns: the pairs of the first 5 only, from the same shards
    info = stage2.run_make_pairs(tiny_config(init_from=stage1_dir, stage2__rejected="highlighted",
                                             stage2__max_pair_turns=5, **S2), w)
    assert info["turns"] == 5 and {json.loads(x)["id"] for x in open(tmp_path / "p" / "pairs.jsonl")} <= \
        {t["id"] for t in shards[:5]}
    with pytest.raises(ConfigError, match=r"config\.stage2\.identical_pairs = 'some': expected one of"):
        validate(tiny_config(stage2__identical_pairs="some"))
    with pytest.raises(ConfigError, match=r"config\.stage2\.select_rejected = 'best': expected one of"):
        validate(tiny_config(stage2__select_rejected="best"))


def test_pair_highlight_own_pick_shows_the_stage1_pick_in_the_generate_prompt(stage1_dir, tmp_path, caplog):
    """stage2.pair_highlight=own_pick: a generate pair's prompt highlights the Stage 1 model's own Select pick (the
    prompt Select then Generate shows it), not the label; the Select step runs for it even without select pairs,
    and switching back to 'label' rebuilds the pairs from the same shards."""
    w = str(tmp_path / "p")
    own = tiny_config(init_from=stage1_dir, stage2__select_pairs=False, stage2__generate_pairs_on="all",
                      stage2__pair_highlight="own_pick", **S2)
    info = stage2.run_make_pairs(own, w)
    shard_dir = tmp_path / "p" / "pairs"
    shards = [json.loads(x) for f in sorted(os.listdir(shard_dir)) for x in open(shard_dir / f)]
    assert all(t["select_scores"] is not None for t in shards)  # the Select step ran
    rows = [json.loads(x) for x in open(tmp_path / "p" / "pairs.jsonl")]
    assert info["rules"]["highlight"] == "own_pick" and info["select_pairs"] == 0 and rows
    by_id = {t["id"]: t for t in shards}
    assert [r["persona_label"] for r in rows] == [by_id[r["id"]]["selected"] for r in rows]
    differ = [r for r in rows if by_id[r["id"]]["selected"] != by_id[r["id"]]["persona_label"]]
    assert differ, "the tiny Stage 1 picks the label on every turn: the test shows nothing"
    r = differ[0]
    shown = None if r["persona_label"] < 0 else r["persona"][r["persona_label"]]
    assert preferences.prompt_parts({**r, "kind": "generate"}) == templates.generate_prompt(r["persona"], r["history"],
                                                                                            shown)
    with caplog.at_level("INFO"):
        info = stage2.run_make_pairs(tiny_config(init_from=stage1_dir, stage2__select_pairs=False,
                                                 stage2__generate_pairs_on="all", **S2), w)
    assert "highlight 'own_pick' -> 'label'" in caplog.text and info["rules"]["highlight"] == "label"
    rows = [json.loads(x) for x in open(tmp_path / "p" / "pairs.jsonl")]
    assert [r["persona_label"] for r in rows] == [by_id[r["id"]]["persona_label"] for r in rows]
    with pytest.raises(ConfigError, match=r"config\.stage2\.pair_highlight = 'pick': expected one of"):
        validate(tiny_config(stage2__pair_highlight="pick"))
    with pytest.raises(ConfigError, match=r"config\.stage2\.pair_highlight = 'own_pick': expected 'label' with "
                                          r"stage2\.rejected='highlighted'"):
        validate(tiny_config(stage2__pair_highlight="own_pick", stage2__rejected="highlighted"))


def test_an_identical_pair_trains_only_the_nll_term(stage1_dir, tmp_path):
    """A pair with the same text on both sides has a DPO margin of exactly 0 and no DPO gradient (float rounding
    aside): with the NLL and alignment terms off its DPO loss is log 2 at every step and the gradient norm is at the
    rounding level; with the NLL term on, the gradient is the NLL's and the params move. Keeping identical pairs
    needs a term that trains them (Adam would scale the rounding noise up to lr-sized steps)."""
    pairs = tmp_path / "same.jsonl"
    with open(pairs, "w") as f:
        for k in range(40):
            f.write(json.dumps({"persona": [f"i have {k} cats.", "i like tea."], "history": ["any pets ?"],
                                "persona_label": 0, "chosen": f"yes , {k} cats .", "rejected": f"yes , {k} cats ."})
                    + "\n")
    common = dict(init_from=stage1_dir, stage2__pairs=str(pairs), stage2__align_weight=0.0,
                  stage2__dev_fraction=0.3, **S2)
    s1, _ = ckpt_lib.load_params(stage1_dir, Experiment(tiny_config(**common), str(tmp_path / "x")).model.abstract)
    norms = {}
    for sft in (0.0, 1.0):
        w = tmp_path / f"sft{sft}"
        stage2.run(tiny_config(stage2__sft_weight=sft, **common), str(w))
        rows = [json.loads(x) for x in open(w / "metrics.jsonl")]
        assert [r["train/dpo_loss"] for r in rows if "train/dpo_loss" in r] == pytest.approx([math.log(2)] * 2,
                                                                                            abs=1e-6)
        norms[sft] = max(r["train/grad_norm"] for r in rows if "train/grad_norm" in r)
    assert norms[0.0] < 1e-6 and norms[1.0] > 1e-2, norms
    policy, _ = ckpt_lib.load_params(str(tmp_path / "sft1.0"), Experiment(tiny_config(**common), str(w)).model.abstract)
    assert _max_abs_diff(policy, s1) > 1e-4
    with pytest.raises(ConfigError, match=r"config\.stage2\.identical_pairs = 'keep': expected 'drop', or "
                                          r"stage2\.sft_weight > 0 or stage2\.align_weight > 0"):
        validate(tiny_config(stage2__identical_pairs="keep", stage2__sft_weight=0.0, stage2__align_weight=0.0))
