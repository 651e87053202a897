"""The Select step's rules (pal_jax/inference/selection.py) on hand-made token log-probs, and the dev-split calibration."""
import math

import numpy as np
import pytest

from pal_jax.inference import selection

# Three candidates of one record: two persona targets "1.<...>", "2.<...>" (4 and 3 tokens) and "none" (2 tokens).
CANDS = [[11, 50, 60, 70], [12, 50, 61], [13, 80]]
LPS = [np.array([-0.5, -0.1, -1.0, -1.0]), np.array([-1.5, -0.2, -0.2]), np.array([-0.6, -0.1])]


def test_decision_lengths_stop_at_the_first_distinguishing_token():
    assert selection.decision_lengths(CANDS) == [1, 1, 1]
    # a shared first token: the decision needs the second one; a candidate that is a prefix of another is whole
    assert selection.decision_lengths([[5, 1, 9], [5, 2], [7]]) == [2, 2, 1]
    assert selection.decision_lengths([[5], [5, 3]]) == [1, 2]
    assert selection.decision_lengths([[4, 4]]) == [1]  # a lone candidate: its first token


def test_features_and_every_rule_by_hand():
    f = selection.features(LPS, CANDS)
    np.testing.assert_allclose(f["sum"], [-2.6, -1.9, -0.7])
    np.testing.assert_allclose(f["mean"], [-0.65, -1.9 / 3, -0.35])
    np.testing.assert_allclose(f["decision"], [-0.5, -1.5, -0.6])
    assert selection.pick(selection.rule_scores(f, "sum")) == -1  # the short "none" wins on the sum
    assert selection.pick(selection.rule_scores(f, "mean")) == -1
    assert selection.pick(selection.rule_scores(f, "decision")) == 0  # the first tokens: 1 beats No beats 2
    # lse: none (-0.7) against logsumexp(-2.6, -1.9) = -1.5023: none wins
    lse = math.log(math.exp(-2.6) + math.exp(-1.9))
    s = selection.rule_scores(f, "lse")
    assert s[-1] == pytest.approx(-1.9 + (-0.7 - lse)) and selection.pick(s) == -1
    # marginal: P(first token No) = e^-0.6 = 0.549 against e^-0.5 + e^-1.5 = 0.830: a persona sentence wins,
    # and among the sentences the best by summed log-prob (sentence 2, -1.9), not by the first token
    m = selection.rule_scores(f, "marginal")
    assert m[-1] == pytest.approx(-1.9 + (-0.6 - math.log(math.exp(-0.5) + math.exp(-1.5))))
    assert selection.pick(m) == 1
    # calibrated: the sum with a bias on "none"; -1.3 brings none to -2.0 < -1.9
    assert selection.pick(selection.rule_scores(f, "calibrated", none_bias=-1.1)) == -1  # -1.8 > -1.9
    assert selection.pick(selection.rule_scores(f, "calibrated", none_bias=-1.3)) == 1
    with pytest.raises(ValueError, match="predict.select_by = 'best'"):
        selection.rule_scores(f, "best")


def test_ties_go_to_the_first_candidate():
    f = {"sum": np.array([-1.0, -1.0, -1.0]), "mean": np.zeros(3), "decision": np.zeros(3)}
    assert selection.pick(selection.rule_scores(f, "sum")) == 0
    # lse: none == logsumexp? here none -1.0 < logsumexp(-1, -1) = -0.307: a sentence
    assert selection.pick(selection.rule_scores(f, "lse")) == 0


def test_calibrated_bias_maximises_dev_accuracy():
    # margins (best sentence - none) per turn: 3, 1, 5, -1; labels: none, none, 0, 1 (turn 3's best sentence is 1)
    sums = [np.array([2.0, 0.0, -1.0]), np.array([1.0, 0.5, 0.0]), np.array([5.0, 1.0, 0.0]),
            np.array([0.0, 1.0, 2.0])]
    labels = [-1, -1, 0, 1]
    bias, acc, acc0 = selection.calibrate_none_bias(sums, labels)
    # no bias: none only on turn 3 (wrong) -> turn 2 right (label 0, best 0) -> 1/4. A bias in (3, 5) picks none
    # on turns 0, 1, 3 and the sentence on turn 2: 3/4; more than 5 makes turn 2 wrong.
    assert acc0 == 0.25 and acc == 0.75
    assert 3 < bias < 5 and bias == pytest.approx(4.0)  # midway between the two thresholds
    picks = [selection.pick(selection.rule_scores({"sum": s}, "calibrated", bias)) for s in sums]
    assert picks == [-1, -1, 0, -1]


def test_calibration_prefers_the_smallest_bias_among_the_best():
    # every bias in (-inf, 2) gives the same accuracy (all right): 0 is kept
    sums = [np.array([3.0, 1.0]), np.array([4.0, 2.0])]
    assert selection.calibrate_none_bias(sums, [0, 0])[0] == 0.0
    with pytest.raises(ValueError, match="expected equal, non-zero counts"):
        selection.calibrate_none_bias([], [])


def test_config_names_the_rules_and_needs_a_dev_split_for_calibration():
    from helpers import tiny_config
    from pal_jax.core.errors import ConfigError
    from pal_jax.config import validate
    c = tiny_config(predict__select_by="longest")
    with pytest.raises(ConfigError, match=r"config.predict.select_by = 'longest': expected one of \('calibrated'"):
        validate(c)
    c = tiny_config(data__dev_fraction=0.0)
    c.mode = "evaluate"
    with pytest.raises(ConfigError, match=r"config.data.dev_fraction = 0.0: expected > 0 with "
                                          r"predict.select_by='calibrated'"):
        validate(c)
    c.predict.select_by = "marginal"  # a rule without calibration needs no dev split
    validate(c)
    with pytest.raises(ConfigError, match="config.predict.split = 'train'"):
        validate(tiny_config(predict__split="train"))


def test_config_copies_of_the_allowed_values_match_their_owners():
    """config.py validates before jax is imported, so it keeps copies of these tuples (the loss types it imports from
    the jax-free loss_spec, their one home): they must not drift."""
    from pal_jax import config
    from pal_jax.training import losses
    from pal_jax.training import make_pairs as pairs
    assert config.SELECT_RULES == selection.RULES
    assert config.DPO_LOSS_TYPES == losses.DPO_LOSS_TYPES
    assert config.REJECTED_FROM == pairs.REJECTED_FROM
