"""Unit tests for pal_jax/evaluation/metrics.py; every expected number is computed by hand in the comment beside it."""

import math

import numpy as np
import pytest

from pal_jax.evaluation import metrics as M


# ----------------------------------------------------------------------------------------------- normalisation
def test_normalize_answer():
    # lower: "the cat's hat, a dog!" ; punctuation -> space: "the cat s hat  a dog "
    # articles -> space: "  cat s hat    dog " ; collapse: "cat s hat dog"
    assert M.normalize_answer("The cat's hat, a DOG!") == "cat s hat dog"
    # Hyphen is not in ParlAI's punctuation set; "an"/"the" only as whole words ("another", "theme" survive).
    assert M.normalize_answer("An X-ray of another theme.") == "x-ray of another theme"
    assert M.normalize_answer("  ") == ""


# ----------------------------------------------------------------------------------------------------------- F1
def test_f1_hand_computed():
    # pred "the cat sat on the mat" -> [cat, sat, on, mat]; ref "a cat is on a mat" -> [cat, is, on, mat]
    # overlap {cat, on, mat} = 3; P = 3/4, R = 3/4, F1 = 0.75. Second reference "dog" gives 0; max = 0.75.
    assert M.f1("the cat sat on the mat", ["a cat is on a mat", "dog"]) == pytest.approx(0.75)
    # Multiset overlap: pred [yes, yes, no], ref [yes, no, no]: common yes:1 + no:1 = 2; P = R = 2/3; F1 = 2/3.
    assert M.f1("yes yes no", ["yes no no"]) == pytest.approx(2 / 3)
    # Unequal lengths: pred [i, like, dogs] vs ref [i, like, big, dogs, too]: overlap 3; P = 1, R = 3/5;
    # F1 = 2 * 1 * 0.6 / 1.6 = 0.75.
    assert M.f1("I like dogs.", ["i like big dogs too"]) == pytest.approx(0.75)
    assert M.f1("", ["anything"]) == 0.0
    assert M.f1("The cat!", ["cat"]) == 1.0


def test_corpus_f1_is_mean():
    # pair 1: F1 = 1.0 (identical); pair 2: F1 = 0.75 (from above); mean = 0.875
    got = M.corpus_f1(["hello there", "i like dogs"], [["hello there"], ["i like big dogs too"]])
    assert got == pytest.approx(0.875)
    with pytest.raises(ValueError, match="expected equal lengths"):
        M.corpus_f1(["a"], [])


# --------------------------------------------------------------------------------------------------------- BLEU
HYP = "the cat sat on the mat"
REF = "the cat is on the mat"


def test_bleu_perfect_match():
    hyps = ["the cat sat on the mat", "i like green apples very much"]
    refs = [[h] for h in hyps]
    assert M.bleu(hypotheses=hyps, references=refs, max_n=4) == pytest.approx(1.0)
    assert M.bleu_scores(hypotheses=hyps, references=refs) == pytest.approx({"bleu1": 1.0, "bleu2": 1.0, "bleu4": 1.0})


def test_bleu_partial_hand_computed():
    # hyp unigrams: the x2, cat, sat, on, mat (6); ref counts the:2 cat is on mat -> clipped 2+1+0+1+1 = 5; p1 = 5/6
    # hyp bigrams: the-cat cat-sat sat-on on-the the-mat (5); in ref: the-cat on-the the-mat -> p2 = 3/5
    # trigrams: the-cat-sat cat-sat-on sat-on-the on-the-mat (4); in ref: on-the-mat -> p3 = 1/4
    # 4-grams: 3, none in ref -> p4 = 0/3.  c = r = 6 -> BP = 1.
    # BLEU-1 = 5/6; BLEU-2 = sqrt(5/6 * 3/5) = sqrt(1/2); BLEU-4 = 0 without smoothing.
    s = M.bleu_scores(hypotheses=[HYP], references=[[REF]])
    assert s["bleu1"] == pytest.approx(5 / 6)
    assert s["bleu2"] == pytest.approx(math.sqrt(0.5))
    assert s["bleu4"] == 0.0
    # epsilon = 0.1 replaces the zero 4-gram count: p4 = 0.1/3;
    # BLEU-4 = (5/6 * 3/5 * 1/4 * 0.1/3) ** (1/4) = (1/240) ** 0.25 = 0.254067...
    got = M.bleu(hypotheses=[HYP], references=[[REF]], max_n=4, epsilon=0.1)
    assert got == pytest.approx((1 / 240) ** 0.25)
    assert got == pytest.approx(0.2540663, abs=1e-6)


def test_bleu_is_corpus_level_not_sentence_mean():
    # ex1 "a b" vs "a b": unigrams 2/2, bigrams 1/1; ex2 "c d" vs "c e": unigrams 1/2, bigrams 0/1.
    # corpus: p1 = 3/4, p2 = 1/2, c = r = 4 -> BLEU-2 = sqrt(3/8) = 0.612372 (sentence mean would be 0.5).
    got = M.bleu(hypotheses=["a b", "c d"], references=[["a b"], ["c e"]], max_n=2)
    assert got == pytest.approx(math.sqrt(3 / 8))


def test_bleu_clipping_and_brevity_penalty():
    # Clipping: hyp "the the the the", ref "the cat": "the" clipped to 1 -> p1 = 1/4; c = 4 > r = 2 -> BP = 1.
    assert M.bleu(hypotheses=["the the the the"], references=[["the cat"]], max_n=1) == pytest.approx(0.25)
    # Closest reference: hyp "cat sat" (2), refs of length 3 and 5 -> r = 3; c = 2 -> BP = exp(1 - 3/2).
    # p1 = 2/2, p2 = 1/1 -> BLEU-2 = exp(-0.5) = 0.606531.
    got = M.bleu(hypotheses=["cat sat"], references=[["the cat sat", "the cat sat down here"]], max_n=2)
    assert got == pytest.approx(math.exp(-0.5))
    # Tie in closeness goes to the shorter reference: hyp length 4, refs length 3 and 5 -> r = 3, c > r, BP = 1;
    # clipping uses the max count over references, so a b c d all match -> BLEU-1 = 1 (not exp(1 - 5/4)).
    got = M.bleu(hypotheses=["a b c d"], references=[["a b c", "a b c d e"]], max_n=1)
    assert got == pytest.approx(1.0)
    # Lowercased before matching.
    assert M.bleu(hypotheses=["Hello World"], references=[["hello world"]], max_n=2) == pytest.approx(1.0)


def test_bleu_rejects_swapped_or_positional_arguments():
    with pytest.raises(TypeError):
        M.bleu(["a b"], [["a b"]])  # positional: keyword-only on purpose
    with pytest.raises(TypeError, match="swapped"):
        M.bleu(hypotheses=[["a b"]], references=["a b"])  # swapped by keyword
    with pytest.raises(TypeError, match="wrap a single reference"):
        M.bleu(hypotheses=["a b"], references=["a b"])
    with pytest.raises(ValueError, match="expected equal lengths"):
        M.bleu(hypotheses=["a b", "c"], references=[["a b"]])


def test_bleu_no_ngrams_of_order_gives_zero():
    # Every hypothesis shorter than 4 tokens: no 4-grams in the corpus -> BLEU-4 = 0.0 (not a division error).
    assert M.bleu(hypotheses=["a b c"], references=[["a b c"]], max_n=4) == 0.0


# ------------------------------------------------------------------------------------------------------ ROUGE-L
def test_rouge_l_hand_computed():
    # LCS(HYP, REF) = "the cat on the mat" = 5; P = R = 5/6 -> F = 5/6 for any beta.
    assert M.rouge_l(HYP, REF) == pytest.approx(5 / 6)
    # hyp "a b c d", ref "a c": LCS = 2; P = 2/4 = 0.5, R = 2/2 = 1.
    # beta = 1.2: F = (1 + 1.44) * 0.5 * 1 / (1 + 1.44 * 0.5) = 1.22 / 1.72 = 0.709302
    assert M.rouge_l("a b c d", "a c") == pytest.approx(1.22 / 1.72)
    # beta = 1: F = 2 * 0.5 * 1 / 1.5 = 2/3
    assert M.rouge_l("a b c d", "a c", beta=1.0) == pytest.approx(2 / 3)
    assert M.rouge_l("", "a c") == 0.0
    assert M.rouge_l("x y", "a c") == 0.0


def test_corpus_rouge_l_is_mean():
    # (5/6 + 1.0) / 2 = 11/12
    assert M.corpus_rouge_l([HYP, "x y"], [REF, "X Y"]) == pytest.approx(11 / 12)


# ------------------------------------------------------------------------------------------------- Dist-n
def test_distinct_n():
    hyps = ["i like cats", "I like dogs"]
    # unigrams: i like cats i like dogs -> 4 distinct / 6 = 2/3
    assert M.distinct_n(hyps, 1) == pytest.approx(2 / 3)
    # bigrams: i-like like-cats i-like like-dogs -> 3 distinct / 4 (no bigram crosses "cats"->"i")
    assert M.distinct_n(hyps, 2) == pytest.approx(3 / 4)
    assert M.distinct_n(["a"], 2) == 0.0


# ----------------------------------------------------------------------------------- perplexity, hits, selection
def test_perplexity():
    # total NLL 4 * ln 2 over 2 tokens -> exp(2 ln 2) = 4
    assert M.perplexity(4 * math.log(2), 2) == pytest.approx(4.0)
    assert M.perplexity(0.0, 10) == 1.0
    assert M.perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="expected > 0"):
        M.perplexity(1.0, 0)


def test_hits_at_1():
    scores = np.zeros((3, 20))
    scores[0, 19] = 5.0  # gold (last) strictly highest -> hit
    scores[1, 3] = 5.0  # another candidate highest -> miss
    scores[2, 19] = 1.0
    scores[2, 7] = 1.0  # tie with gold -> miss
    # hits = 1 of 3
    assert M.hits_at_1(scores, 19) == pytest.approx(1 / 3)
    # per-row gold indices: row 1's gold is 3 -> hit; rows 0 and 2 with gold 19 -> hit, miss => 2/3
    assert M.hits_at_1(scores, np.array([19, 3, 19])) == pytest.approx(2 / 3)
    assert M.hits_at_1(np.zeros((2, 20)), 19) == 0.0  # constant scores never count as hits
    with pytest.raises(ValueError, match="expected ints in"):
        M.hits_at_1(scores, 20)


def test_persona_selection_accuracy():
    # matches: 0==0 yes, -1==-1 yes ("none" is a class), 2!=-1 no, -1!=1 no -> 2/4
    assert M.persona_selection_accuracy([0, -1, 2, -1], [0, -1, -1, 1]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="labels\\[0\\]=None"):
        M.persona_selection_accuracy([0], [None])


# --------------------------------------------------------------------------------------------- persona overlap
PERSONA = ["I love hiking in the mountains.", "My dog is named Max."]


def test_content_words():
    # "i love hiking in the mountains." -> normalize: "i love hiking in mountains" -> drop i, in -> [love, hiking, mountains]
    assert M.content_words(PERSONA[0]) == ["love", "hiking", "mountains"]
    assert M.content_words("I'm so happy!") == ["happy"]  # "i m so happy": i, m, so are stopwords


def test_persona_coverage():
    # persona content sets: {love, hiking, mountains}, {dog, named, max}
    # response "i love hiking ." -> {love, hiking}: cov1 = 2/3, cov2 = 0/3 -> max 2/3
    assert M.persona_coverage("i love hiking .", PERSONA) == pytest.approx(2 / 3)
    # response "max is my dog , he loves the mountains" -> {max, dog, loves, mountains}
    # cov1 = |{mountains}|/3 = 1/3 ("loves" != "love"), cov2 = |{dog, max}|/3 = 2/3 -> max 2/3
    assert M.persona_coverage("max is my dog , he loves the mountains", PERSONA) == pytest.approx(2 / 3)
    assert M.persona_coverage("what is it ?", PERSONA) == 0.0
    assert M.persona_coverage("anything", []) == 0.0


def test_copies_persona_needs_a_whole_sentence_word_for_word():
    # after ParlAI normalisation (case, punctuation, articles): "I love hiking in THE mountains!" is sentence 1
    assert M.copies_persona("sure . I love hiking in THE mountains! you ?", PERSONA) == 1.0
    assert M.copies_persona("i love hiking .", PERSONA) == 0.0  # part of a sentence: coverage 2/3, no copy
    assert M.copies_persona("i love hiking in mountains today", PERSONA) == 1.0  # contiguous words, not a suffix
    assert M.copies_persona("i love hiking in the big mountains", PERSONA) == 0.0  # a word in between
    assert M.copies_persona("xi love hiking in the mountains", PERSONA) == 0.0  # whole words only
    assert M.copies_persona("anything", []) == 0.0


def test_persona_f1():
    # response "i love hiking ." -> [love, hiking]; sentence 1 -> [love, hiking, mountains]
    # overlap 2: P = 2/2, R = 2/3, F1 = 2 * 1 * (2/3) / (5/3) = 0.8; sentence 2 -> 0; max = 0.8
    assert M.persona_f1("i love hiking .", PERSONA) == pytest.approx(0.8)
    # response [max, dog, loves, mountains] vs sentence 2 [dog, named, max]: overlap 2, P = 2/4, R = 2/3,
    # F1 = 2 * 0.5 * (2/3) / (0.5 + 2/3) = (2/3) / (7/6) = 4/7; vs sentence 1: overlap 1, P = 1/4, R = 1/3,
    # F1 = 2 * (1/12) / (7/12) = 2/7 -> max 4/7
    assert M.persona_f1("max is my dog , he loves the mountains", PERSONA) == pytest.approx(4 / 7)
    assert M.persona_f1("anything", []) == 0.0


# ---------------------------------------------------------------------------------------------------- C-score
def test_c_score():
    # row sums: 1 + 0 - 1 + 1 = 1; entail + neutral = 1; contradiction = -1 -> mean (1 + 1 - 1) / 3 = 1/3
    labels = [[1, 0, -1, 1], ["entailment", "neutral"], ["contradiction"]]
    assert M.c_score(labels) == pytest.approx(1 / 3)
    # 2-D array: row sums 2 and -1 -> mean 0.5
    assert M.c_score(np.array([[1, 1, 0], [-1, 0, 0]])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="\\[0\\]\\[1\\]=2"):
        M.c_score([[1, 2]])


def test_c_score_max_vs_sum():
    # the row [1, -1, 0]: sum 1 - 1 + 0 = 0 (Madotto) but max 1 (PAL)
    assert M.c_score([[1, -1, 0]]) == 0.0
    assert M.c_score_max([[1, -1, 0]]) == 1.0
    # sums [0, 0 - 1, 1 + 1] = [0, -1, 2] -> mean 1/3; maxes [1, 0, 1] -> mean 2/3
    labels = [[1, -1, 0], ["neutral", "contradiction"], ["entail", "Entailment"]]
    rows = M.c_score_rows(labels)
    assert isinstance(rows, np.ndarray) and rows.dtype == np.float64
    np.testing.assert_array_equal(rows, [0.0, -1.0, 2.0])
    np.testing.assert_array_equal(M.c_score_max_rows(labels), [1.0, 0.0, 1.0])
    assert M.c_score(labels) == pytest.approx(1 / 3)
    assert M.c_score_max(labels) == pytest.approx(2 / 3)
    # all-contradict row: sum -2, max -1; 2-D array [[1, -1, 0], [-1, -1, 0]]: maxes [1, 0] -> 0.5, sums [0, -2] -> -1
    assert M.c_score_max([["contradict", "CONTRADICTION"]]) == -1.0
    arr = np.array([[1, -1, 0], [-1, -1, 0]])
    assert M.c_score_max(arr) == pytest.approx(0.5)
    assert M.c_score(arr) == pytest.approx(-1.0)
    # an empty row (no persona sentences): sum 0, max 0 by convention -> rows [0, 1], max mean 0.5
    np.testing.assert_array_equal(M.c_score_max_rows([[], [1]]), [0.0, 1.0])
    np.testing.assert_array_equal(M.c_score_rows([[], [1]]), [0.0, 1.0])
    assert M.c_score_rows([]).shape == (0,)


def test_c_score_forms_reject_bad_input():
    for fn in (M.c_score_max, M.c_score_max_rows, M.c_score_rows):
        with pytest.raises(ValueError, match=f"{fn.__name__}.*\\[0\\]\\[1\\]=2"):
            fn([[1, 2]])
        with pytest.raises(ValueError, match="\\[1\\]\\[0\\]='maybe'"):
            fn([[1], ["maybe"]])
        with pytest.raises(ValueError, match="True"):
            fn([[True]])  # a bool is not a label
        with pytest.raises(ValueError, match="1.0"):
            fn([[1.0]])  # nor a float
        with pytest.raises(TypeError, match="nli_labels\\[0\\] is str"):
            fn(["entail"])  # a row must be a list, not one label
        with pytest.raises(TypeError, match="nli_labels\\[0\\] is int"):
            fn(np.array([1, 0]))  # 1-D array: rows are scalars
    with pytest.raises(ValueError, match="c_score_max got 0 responses"):
        M.c_score_max([])
    with pytest.raises(ValueError, match="c_score got 0 responses"):
        M.c_score([])


# ------------------------------------------------------------------------------------------------ Entropy-n
ENT_HYPS = ["A b a b", "c a b"]


def test_entropy_n_hand_computed():
    # unigrams over "a b a b" + "c a b": a 3, b 3, c 1 of 7 -> -(2 * 3/7 ln 3/7 + 1/7 ln 1/7)
    assert M.entropy_n(ENT_HYPS, 1) == pytest.approx(-(2 * 3 / 7 * math.log(3 / 7) + 1 / 7 * math.log(1 / 7)))
    # bigrams: a-b, b-a, a-b | c-a, a-b -> a-b 3, b-a 1, c-a 1 of 5 (no b-c across the two hyps)
    assert M.entropy_n(ENT_HYPS, 2) == pytest.approx(-(3 / 5 * math.log(3 / 5) + 2 / 5 * math.log(1 / 5)))
    # trigrams: a-b-a, b-a-b | c-a-b -> 3 distinct, once each -> ln 3
    assert M.entropy_n(ENT_HYPS, 3) == pytest.approx(math.log(3))
    # 4-grams: only a-b-a-b -> one n-gram, probability 1 -> 0
    assert M.entropy_n(ENT_HYPS, 4) == 0.0
    # 5-grams: none (one would exist only across the hyps) -> 0
    assert M.entropy_n(ENT_HYPS, 5) == 0.0
    # {a: 2, b: 1, c: 1} -> -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.5 ln 2
    assert M.entropy_n(["a b a", "c"], 1) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert M.entropy_n(["a b a", "c"], 1) == pytest.approx(1.5 * math.log(2))


def test_entropy_n_empty_and_errors():
    assert M.entropy_n([], 1) == 0.0
    assert M.entropy_n(["", "  "], 1) == 0.0
    assert M.entropy_n(["a b"], 3) == 0.0
    with pytest.raises(ValueError, match="entropy_n n=0"):
        M.entropy_n(ENT_HYPS, 0)
    with pytest.raises(TypeError, match="entropy_n hyps"):
        M.entropy_n("a b a", 1)


def test_entropy_from_counts():
    # the same formula as entropy_n: bigram counts of ENT_HYPS are [3, 1, 1], unigram counts [3, 3, 1]
    assert M.entropy_from_counts([3, 1, 1]) == M.entropy_n(ENT_HYPS, 2)
    assert M.entropy_from_counts(np.array([1, 3, 3])) == pytest.approx(M.entropy_n(ENT_HYPS, 1))
    assert M.entropy_from_counts([2, 1, 1]) == pytest.approx(1.5 * math.log(2))
    # only proportions matter; zero counts contribute nothing; uniform over k -> ln k; a mapping uses its values
    assert M.entropy_from_counts([4, 0, 2, 2]) == pytest.approx(1.5 * math.log(2))
    assert M.entropy_from_counts([0.5, 0.5, 0.5, 0.5]) == pytest.approx(math.log(4))
    assert M.entropy_from_counts({("a",): 2, ("b",): 1, ("c",): 1}) == pytest.approx(1.5 * math.log(2))
    assert M.entropy_from_counts([]) == 0.0
    assert M.entropy_from_counts([0, 0]) == 0.0
    assert str(M.entropy_from_counts([5])) == "0.0"  # not -0.0
    with pytest.raises(ValueError, match="count -1.0;"):
        M.entropy_from_counts([2, -1])
    with pytest.raises(ValueError, match="nan"):
        M.entropy_from_counts([1, float("nan")])
    with pytest.raises(ValueError, match="1-D"):
        M.entropy_from_counts([[1, 2], [3, 4]])
    with pytest.raises(TypeError, match="entropy_from_counts"):
        M.entropy_from_counts(["a", "b"])


# ------------------------------------------------------------------------------------------------ repetition
def test_repeats_ngram():
    assert M.repeats_ngram("i like dogs and i like dogs")  # trigram "i like dogs" twice
    assert M.repeats_ngram("I like dogs , i LIKE dogs")  # case-insensitive
    assert not M.repeats_ngram("i like dogs and cats")  # every trigram once
    assert not M.repeats_ngram("hi hi")  # shorter than 3 tokens: no trigram at all
    assert M.repeats_ngram("a a a a")  # overlapping: a-a-a at positions 0 and 1
    assert not M.repeats_ngram("a a a")  # a-a-a once
    # n = 2: bigram "i like" twice; n = 3: "i like cats", "like cats i", "cats i like" once each
    assert M.repeats_ngram("i like cats i like", 2)
    assert not M.repeats_ngram("i like cats i like", 3)
    assert M.repeats_ngram("hi hi", 1)
    with pytest.raises(ValueError, match="repeats_ngram n=0"):
        M.repeats_ngram("a a", 0)
    with pytest.raises(TypeError, match="repeats_ngram hyp"):
        M.repeats_ngram(["a", "a"])


def test_repetition_rate():
    replies = ["i like dogs and i like dogs", "i like dogs and cats", "hi hi"]
    assert M.repetition_rate(replies) == pytest.approx(1 / 3)  # only the first repeats a trigram
    assert M.repetition_rate(replies, n=1) == pytest.approx(2 / 3)  # "i" in the first, "hi" in the last
    assert M.repetition_rate(replies, n=2) == pytest.approx(1 / 3)  # "i like dogs and cats": bigrams once each
    assert M.repetition_rate(["a b c"]) == 0.0
    with pytest.raises(ValueError, match="repetition_rate got 0 hyps"):
        M.repetition_rate([])
    with pytest.raises(ValueError, match="repetition_rate n=-1"):
        M.repetition_rate(replies, n=-1)
