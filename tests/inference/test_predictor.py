"""Select then Generate, the predict/evaluate/chat modes and the report."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from helpers import run_main, tiny_config
from pal_jax.evaluation import evaluate
from pal_jax.evaluation import metrics
from pal_jax.inference import predictor as predict
from pal_jax.training import stage1
from pal_jax.data import convai2, corpus
from pal_jax.data import records as records_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("s1")
    config = tiny_config(train__steps=6, predict__batch_size=8, predict__max_new_tokens=8)
    stage1.run(config, str(workdir))
    return config, str(workdir)


@pytest.fixture(scope="module")
def records(trained):
    config, _ = trained
    return convai2.records_from_dialogues(corpus.load_corpus(config.data)["test"])[:10]


def test_predictions_ignore_gold_labels_and_references(trained, records):
    config, workdir = trained
    predictor = predict.load_predictor(config, workdir)
    base = predictor.predict(records)
    rng = np.random.default_rng(0)
    scrambled = [dataclasses.replace(r, response="zebra " * int(rng.integers(1, 9)),
                                     persona_label=int(rng.integers(-1, len(r.persona))),
                                     candidates=("x",) * 20) for r in records]
    stripped = [dataclasses.replace(r, response=None, persona_label=None, candidates=None) for r in records]
    for variant in (scrambled, stripped):
        again = predict.load_predictor(config, workdir).predict(variant)  # fresh rng: sampling must not matter
        assert [(p.selected, p.response) for p in again] == [(p.selected, p.response) for p in base]
        for a, b in zip(again, base):
            np.testing.assert_allclose(a.candidate_scores, b.candidate_scores, atol=1e-5)
    for r, p in zip(records, base):
        assert len(p.candidate_scores) == len(r.persona) + 1  # every sentence and "none"
        assert p.select_score == max(p.candidate_scores)
        best = int(np.argmax(p.candidate_scores))
        assert p.selected == (best if best < len(r.persona) else -1)


def test_select_scores_equal_direct_scoring(trained, records):
    """The select candidates' summed log-probs are those of 'k.<sentence>' + eos after the select prompt, scored
    one at a time; the default calibrated rule adds its dev-fitted bias to "none" alone, and saves it."""
    config, workdir = trained
    predictor = predict.load_predictor(config, workdir)
    assert predictor.select_by == "calibrated" and predictor.calibration["dev_turns"] > 0
    saved = json.load(open(f"{workdir}/{predict.CALIBRATION_FILE}"))
    assert saved["none_bias"] == predictor.none_bias and saved["key"]["step"] == 6
    r = records[0]
    feats = predictor.select_features([r])[0]
    sel = predictor.select([r], [feats])[0]
    from pal_jax.data import pipeline, templates
    prompt = pipeline.encode_prompt(templates.select_prompt(list(r.persona), list(r.history)), predictor.tok, 200)
    texts = predictor.candidate_texts(r.persona)
    for k, text in enumerate(texts):
        ids = predictor.tok.encode(text) + [predictor.tok.eos_id]
        sums, means = predictor.score([prompt], [[ids]])
        assert feats["sum"][k] == pytest.approx(float(sums[0, 0]), abs=1e-4)
        assert feats["mean"][k] == pytest.approx(float(means[0, 0]), abs=1e-5)
        bias = predictor.none_bias if k == len(texts) - 1 else 0.0
        assert sel[2][k] == pytest.approx(float(sums[0, 0]) + bias, abs=1e-4)
    # a second load reads the saved bias instead of fitting it again
    again = predict.load_predictor(config, workdir)
    assert again.none_bias == predictor.none_bias and again.calibration == saved


def test_evaluate_report_has_every_metric(trained, records, tmp_path):
    config, workdir = trained
    predictor = predict.load_predictor(config, workdir)
    with_cands = [dataclasses.replace(r, candidates=tuple(f"cand {i} {r.response}" for i in range(19))
                                      + (r.response,)) for r in records]
    ev = evaluate.evaluate(predictor, with_cands, oracle=True)
    res = ev.results
    for key in ("f1", "bleu1", "bleu2", "bleu4", "rouge_l", "dist1", "dist2", "entropy1", "entropy4",
                "repetition_rate", "perplexity", "hits_at_1_mean", "hits_at_1_sum", "persona_selection_accuracy",
                "selects_none", "persona_coverage", "persona_f1"):
        assert key in res and np.isfinite(res[key]), key
    assert res["n"] == len(records) and res["hits_at_1_n"] == len(records) and res["select_by"] == "calibrated"
    assert 0 <= res["hits_at_1_mean"] <= 1 and res["perplexity"] > 1
    assert res["selects_none"] == np.mean([p.selected == -1 for p in ev.predictions])
    # the oracle row generates with the gold persona on every labelled turn, apart from the real results
    assert ev.oracle_results["n"] == sum(r.persona_label is not None for r in records) and "f1" in ev.oracle_results
    reference = evaluate.reference_stats(with_cands)
    analysis = evaluate.analyse({"a": ev, "b": ev}, with_cands, n_resamples=200, reference=reference)
    # the gold replies' own row: the reply-side metrics of the human replies, never a model's
    gold = analysis["reference"]["values"]["gold replies"]
    assert set(gold) <= set(evaluate.REFERENCE_KEYS) and "f1" not in gold
    assert gold["persona_coverage"] == pytest.approx(
        np.mean([metrics.persona_coverage(r.response, list(r.persona)) for r in with_cands]), abs=1e-12)
    assert gold["repetition_rate"] == np.mean([metrics.repeats_ngram(r.response, 3) for r in with_cands])
    lo, hi = analysis["reference"]["intervals"]["gold replies"]["persona_coverage"]
    assert lo <= gold["persona_coverage"] <= hi and lo < hi
    assert analysis["differences"]["b - a"]["f1"] == {"delta": 0.0, "lo": 0.0, "hi": 0.0, "significant": False}
    paths = evaluate.write_report(str(tmp_path), {"a": res, "b": res}, {"data": "test", "n": len(records)},
                                  analysis, curves={"a": workdir})
    table = open(paths["markdown"]).read()
    assert "| F1 ↑ | " in table and "| Perplexity ↓ |" in table and "C-score" in table  # noted as not measured
    assert "Selection rule, the same for every checkpoint: a: `calibrated" in table
    assert "## Selection errors (labelled turns)" in table and "## Oracle persona: an upper bound" in table
    assert f"## The gold replies themselves ({len(records)} turns)" in table
    assert "| Persona coverage ↑ | " in table.split("## The gold replies themselves")[1]
    assert " n.s. |" in table  # identical checkpoints: every difference is not significant
    # eval.hits_at_1=False: the same replies and perplexity, no candidate ranking (and no Hits@1 rows)
    off = evaluate.evaluate(predictor, with_cands, hits_at_1=False).results
    assert "hits_at_1_mean" not in off and "hits_at_1_n" not in off
    assert off["perplexity"] == pytest.approx(res["perplexity"], rel=1e-6) and off["f1"] == res["f1"]
    saved = json.load(open(paths["json"]))
    assert saved["results"]["a"]["f1"] == res["f1"] and saved["bootstrap"]["unit"] == "dialogue"
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_predict_cli_on_jsonl(trained, tmp_path):
    _, workdir = trained
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"persona": ["i love to go hiking.", "i have two dogs."],
                               "history": ["hi ! do you have pets ?"]}) + "\n")
    out = tmp_path / "out.jsonl"
    r = run_main(workdir, {"predict.input": str(inp), "predict.output": str(out), "predict.max_new_tokens": 8},
                 config="configs/predict.py:tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 1 and len(rows[0]["candidate_scores"]) == 3
    assert rows[0]["selected_persona"] in (-1, 0, 1) and isinstance(rows[0]["response"], str)


def test_chat_mode_shows_selected_persona(trained, tmp_path, capsys):
    config, workdir = trained
    persona = tmp_path / "persona.txt"
    persona.write_text("i love to go hiking.\ni have two dogs.\n")
    config = tiny_config(predict__persona_file=str(persona), predict__max_new_tokens=6, predict__batch_size=8)
    out = predict.run_chat(config, workdir, lines=["hello !", "do you have pets ?", ""])
    text = capsys.readouterr().out
    assert out["turns"] == 2
    assert text.count("bot: ") == 2 and text.count("[persona: ") == 2


def test_records_from_the_dev_split_for_tuning(trained):
    config, _ = trained
    from pal_jax.data import corpus as corpus_lib
    dev, origin = records_lib.load_records(tiny_config(predict__split="dev"))
    want = convai2.records_from_dialogues(corpus_lib.load_corpus(config.data)["dev"])
    assert origin == "synthetic dev split" and [r.id for r in dev] == [r.id for r in want]
    test, _ = records_lib.load_records(config)
    assert not {r.id for r in dev} & {r.id for r in test}


class _DirectionNLI:
    """A stub NLI model: entailment (+1) when the premise is a persona sentence, contradiction (-1) otherwise, so
    the two C-score forms (which put the persona on opposite sides) come out apart."""

    def __init__(self, persona_sentences):
        self.persona = set(persona_sentences)

    def predict(self, premises, hypotheses, batch_size=32):
        return [1 if p in self.persona else -1 for p in premises]


def test_evaluate_reports_both_c_score_forms(trained, records):
    config, workdir = trained
    predictor = predict.load_predictor(config, workdir)
    nli = _DirectionNLI({s for r in records for s in r.persona})
    ev = evaluate.evaluate(predictor, records, nli=nli)
    # Madotto et al.: premise = reply -> -1 for each persona sentence, summed; PAL's code: premise = persona
    # sentence -> +1, max over the sentences
    want = -np.mean([len(r.persona) for r in records])
    assert ev.results["c_score"] == pytest.approx(want) and ev.results["c_score_max"] == 1.0
    np.testing.assert_allclose(ev.stats["c_score"].rows[:, 0], [-len(r.persona) for r in records])
    table = open(evaluate.write_report(str(trained[1] + "/nli_report"), {"m": ev.results}, {"n": 10})["markdown"]
                 ).read()
    assert "| C-score, Madotto et al. (sum over persona) ↑ |" in table
    assert "| C-score, PAL's code (max over persona) ↑ | 1.0000 |" in table


def test_calibration_fits_on_the_corpus_the_checkpoint_was_trained_on(trained):
    """predict / chat run with other data settings than training (here another synthetic seed) still fit the
    'none' bias on the training corpus's dev split: the checkpoint's saved data config."""
    config, workdir = trained
    other = tiny_config(predict__batch_size=8, predict__max_new_tokens=8, data__synthetic_seed=999)
    p = predict.load_predictor(other, workdir)
    assert p.calibration["key"]["data"] == f"synthetic(n=60, seed={config.data.synthetic_seed})"
    assert p.none_bias == predict.load_predictor(config, workdir).none_bias


def test_long_last_message_reaches_the_model_and_cuts_are_logged(trained, caplog):
    """A ~300-word user message over the prompt budget: the select and generate prompts keep its latest words
    (not the older history), and predict logs how many prompts were cut and how."""
    import logging
    config, workdir = trained
    config = tiny_config(train__steps=6, predict__batch_size=8, predict__max_new_tokens=8, predict__select_by="sum")
    predictor = predict.load_predictor(config, workdir)
    message = " ".join(f"word{k}" for k in range(300)) + " so what do you do ?"
    rec = convai2.PromptRecord(persona=("i am a nurse.", "i like dogs."), history=("hi", "hello there", message))
    with caplog.at_level(logging.INFO):
        predictor.predict([rec])
    assert dict(predictor.cuts) == {"prompts": 2, "older_history": 2, "last_message": 2, "head": 0}
    assert "2 prompts (select and generate), cut to fit: 2 lost older history lines, 2 the start of the user's " \
           "last message, 0 the start of the persona block" in caplog.text
    assert "2 prompts kept only the end of the user's last message" in caplog.text
    budget = predictor.max_len - predictor.sampling_cfg.max_new_tokens
    text = predictor.tok.decode(predictor.generate_prompts([rec], [-1], budget)[0])
    assert "so what do you do ?" in text and text.startswith("persona:\n1. i am a nurse.") and "hello there" not in text
