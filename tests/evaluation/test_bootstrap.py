"""Paired bootstrap over dialogues (pal_jax/evaluation/bootstrap.py) and the per-turn metric rows behind the report."""
import types

import numpy as np
import pytest

from pal_jax.evaluation import bootstrap as bs
from pal_jax.evaluation import evaluate
from pal_jax.evaluation import metrics as M


def test_dialogue_weights_move_a_dialogue_s_turns_together():
    groups = ["a", "a", "a", "b", "c", "c"]
    w = bs.dialogue_weights(groups, n=200, seed=3)
    assert w.shape == (200, 6)
    np.testing.assert_array_equal(w[:, 0], w[:, 1])  # the turns of one dialogue share their weight
    np.testing.assert_array_equal(w[:, 4], w[:, 5])
    # each resample draws 3 dialogues: the weights of one turn per dialogue add up to 3
    np.testing.assert_array_equal(w[:, 0] + w[:, 3] + w[:, 4], 3)
    np.testing.assert_array_equal(bs.dialogue_weights(groups, n=200, seed=3), w)  # fixed seed, same draws


def test_mean_stat_and_its_resamples_by_hand():
    st = bs.mean_stat([1.0, 0.0, 1.0, 5.0], where=[1, 1, 1, 0])  # the 4th turn is left out
    assert st.value() == pytest.approx(2 / 3)
    assert st.value(mask=np.array([1, 1, 0, 0])) == pytest.approx(0.5)
    w = np.array([[2.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 9.0]])
    np.testing.assert_allclose(st.resampled(w), [1.0, 0.0])  # (2*1 + 1) / 3 and 0 / 1


def test_corpus_rows_reproduce_the_corpus_metrics():
    hyps = ["i like to hike in the hills", "i like dogs", "dogs dogs dogs dogs", "the hills are nice"]
    refs = ["i like hiking in the hills", "i have two dogs", "i like cats", "hills are nice"]
    records = [types.SimpleNamespace(response=r, persona=("i like hiking .",), persona_label=None) for r in refs]
    preds = [types.SimpleNamespace(response=h, selected=-1) for h in hyps]
    st = evaluate.turn_stats(records, preds)
    assert st["f1"].value() == pytest.approx(M.corpus_f1(hyps, [[x] for x in refs]))
    for n in (1, 2, 4):
        assert st[f"bleu{n}"].value() == pytest.approx(M.bleu(hypotheses=hyps, references=[[x] for x in refs],
                                                              max_n=n))
    for n in (1, 2):
        assert st[f"dist{n}"].value() == pytest.approx(M.distinct_n(hyps, n))
    for n in (1, 2, 3, 4):
        assert st[f"entropy{n}"].value() == pytest.approx(M.entropy_n(hyps, n))
    assert st["repetition_rate"].value() == pytest.approx(M.repetition_rate(hyps))  # 1 of 4
    assert st["repetition_rate"].value() == 0.25
    assert st["rouge_l"].value() == pytest.approx(M.corpus_rouge_l(hyps, refs))


def test_identical_checkpoints_differ_by_nothing_and_a_real_gap_is_significant():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 5)  # 40 dialogues of 5 turns
    a = rng.random(200)
    stats = {"a": {"m": bs.mean_stat(a)}, "same": {"m": bs.mean_stat(a)}, "better": {"m": bs.mean_stat(a + 0.3)},
             "noise": {"m": bs.mean_stat(a + rng.normal(0, 0.3, 200))}}
    out = bs.compare(stats, groups, [("a", "same"), ("a", "better"), ("a", "noise")])
    same = out["differences"]["same - a"]["m"]
    assert same == {"delta": 0.0, "lo": 0.0, "hi": 0.0, "significant": False}
    better = out["differences"]["better - a"]["m"]
    assert better["delta"] == pytest.approx(0.3) and better["significant"]
    assert better["lo"] == pytest.approx(0.3) and better["hi"] == pytest.approx(0.3)  # a constant shift
    noise = out["differences"]["noise - a"]["m"]
    assert noise["lo"] < noise["delta"] < noise["hi"] and not noise["significant"]
    lo, hi = out["intervals"]["a"]["m"]
    assert lo < out["values"]["a"]["m"] < hi and hi - lo < 0.25


def test_turns_not_dialogues_would_understate_the_interval():
    """Turns of one dialogue that agree (a dialogue-level effect): resampling dialogues gives the wider, honest
    interval; treating each turn as its own dialogue would be narrower."""
    rng = np.random.default_rng(1)
    per_dialogue = rng.normal(0, 1, 30)
    values = np.repeat(per_dialogue, 10) + rng.normal(0, 0.1, 300)
    stats = {"x": {"m": bs.mean_stat(values)}}
    by_dialogue = bs.compare(stats, np.repeat(np.arange(30), 10), [])["intervals"]["x"]["m"]
    by_turn = bs.compare(stats, np.arange(300), [])["intervals"]["x"]["m"]
    assert (by_dialogue[1] - by_dialogue[0]) > 2.5 * (by_turn[1] - by_turn[0])


def test_set_statistics_intervals_are_centred_on_the_estimate():
    """Dist-n drops under resampling with replacement (repeated dialogues add no new n-grams); the interval is
    re-centred so it holds the estimate."""
    hyps = [f"w{i} w{i + 1} w{i + 2}" for i in range(60)]
    records = [types.SimpleNamespace(response="x", persona=("y",), persona_label=None) for _ in hyps]
    preds = [types.SimpleNamespace(response=h, selected=-1) for h in hyps]
    st = {"m": {"dist1": evaluate.turn_stats(records, preds)["dist1"]}}
    out = bs.compare(st, np.arange(60), [])
    draws = st["m"]["dist1"].resampled(bs.dialogue_weights(np.arange(60)))
    point = out["values"]["m"]["dist1"]
    assert np.median(draws) < point  # biased low, as said
    lo, hi = out["intervals"]["m"]["dist1"]
    assert lo < point < hi
