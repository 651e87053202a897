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
from pal_jax import checkpoint as ckpt_lib
from pal_jax import pipeline_mode, stage1, stage2
from pal_jax.data import templates
from pal_jax.experiment import Experiment

S2 = dict(stage2__steps=2, stage2__batch_size=8, stage2__warmup_steps=0, train__log_every=1, train__eval_every=2,
          predict__batch_size=8, predict__max_new_tokens=6, data__synthetic_dialogues=30)


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("s1")
    stage1.run(tiny_config(train__steps=4, data__synthetic_dialogues=30), str(workdir))
    return str(workdir)


def test_missing_stage1_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        stage2.run(tiny_config(init_from=str(tmp_path / "nothing")), str(tmp_path / "w2"))
    assert "python -m pal_jax.main --config=configs/stage1.py:tiny" in str(e.value)


def test_stage2_trains_and_reference_is_untouched(stage1_dir, tmp_path):
    c = tiny_config(init_from=stage1_dir, stage2__align_weight=0.0, **S2)
    summary, ref = stage2.train_stage2(c, str(tmp_path / "w2"))
    assert summary["step"] == 2 and np.isfinite(summary["dev"]["loss"])
    c.tokenizer.path = os.path.join(stage1_dir, "tokenizer")
    exp = Experiment(stage2.stage2_config(c), str(tmp_path / "w2"), need_corpus=False)
    fresh, _ = ckpt_lib.load_params(stage1_dir, exp.model.abstract)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(fresh)):
        assert not a.is_deleted()  # never donated
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical after training
    rows = [json.loads(x) for x in open(tmp_path / "w2" / "metrics.jsonl")]
    first = [r for r in rows if "train/loss" in r][0]
    # step 1: the policy equals the reference, so every pair's DPO loss is log 2 and the margin 0
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["train/reward_margin"] == pytest.approx(0.0, abs=1e-5)
    policy, _ = ckpt_lib.load_params(str(tmp_path / "w2"), exp.model.abstract)
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(fresh))) > 0  # the policy moved


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
    assert "| metric | stage1 | stage2 |" in table and "Persona selection acc." in table
    assert "## What Stage 2 moved" in table and "| F1 |" in table and "select pairs" in table
    mtime = os.path.getmtime(tmp_path / "eval" / "metrics.json")
    again = pipeline_mode.run(c, str(tmp_path))
    assert os.path.getmtime(tmp_path / "eval" / "metrics.json") == mtime
    assert again["stage1_s"] < 5 and again["pairs_and_stage2_s"] < 5


def test_pipeline_adds_the_base_model_when_stage1_starts_from_pretrained_weights(tmp_path, stage1_dir):
    import json
    assert pipeline_mode.base_model(tiny_config()) is None  # random init: no base column
    assert pipeline_mode.base_model(tiny_config(init_from=stage1_dir)) is None  # a pal_jax workdir is no base
    assert pipeline_mode.base_model(tiny_config(init_from="smollm2_gguf")) == "smollm2_gguf"
    assert pipeline_mode.base_model(tiny_config(init_from="/x/model.Q4_1.gguf")) == "/x/model.Q4_1.gguf"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert pipeline_mode.base_model(tiny_config(init_from=str(hf))) == str(hf)
    # the "What Stage 2 moved" section gains a Stage 2 - base column and the base's "none" share
    ev = tmp_path / "eval"
    ev.mkdir()
    res = {"base": {"f1": 0.10, "perplexity": 40.0}, "stage1": {"f1": 0.15, "perplexity": 30.0},
           "stage2": {"f1": 0.14, "perplexity": 20.0}}
    (ev / "metrics.json").write_text(json.dumps({"results": res}))
    for name, sel in (("base", [-1, -1, 0, 1]), ("stage1", [0, 0, 0, -1]), ("stage2", [0, 1, 2, 3])):
        (ev / f"predictions_{name}.jsonl").write_text("".join(json.dumps({"selected_persona": x}) + "\n"
                                                              for x in sel))
    lines = pipeline_mode.what_moved(str(ev), str(tmp_path / "none"))
    assert "| metric | stage2 - stage1 | better | stage2 - base | better |" in lines
    assert "| F1 | -0.0100 | no | +0.0400 | yes |" in lines
    assert "| Perplexity | -10.0000 | yes | -20.0000 | yes |" in lines
    assert any("base 0.5000, stage1 0.2500, stage2 0.0000" in x for x in lines)


def test_select_and_generate_pairs_encode_to_their_prompts(stage1_dir):
    from pal_jax import tokenizer as tok_lib
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
