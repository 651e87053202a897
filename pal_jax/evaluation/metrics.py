"""Text metrics for persona dialogue evaluation (pure Python + numpy; no jax).

Every function is small and composable; corpus-level aggregation is explicit.

Tokenisation conventions (stated once here, repeated in each docstring):
- F1, persona coverage, persona F1: ParlAI's ``normalize_answer`` then whitespace split.
- BLEU, ROUGE-L, Dist-n, Entropy-n, repetition: lowercase, then whitespace split (ConvAI2 text is already
  tokenised, with spaces around punctuation, so punctuation tokens count as tokens like the references' do).

Definitions and their sources:
- F1: ParlAI ``F1Metric`` (unigram overlap after ``normalize_answer``, max over references).
- BLEU: Papineni et al. 2002, corpus level (clipped n-gram counts summed over the corpus, uniform weights,
  brevity penalty from the closest reference length per hypothesis; ties go to the shorter reference).
  Smoothing: none by default -> 0.0 when any clipped n-gram count is 0; optional ``epsilon`` (Chen & Cherry
  2014 method 1: a zero numerator is replaced by ``epsilon``).
- ROUGE-L: Lin 2004, LCS-based F-measure with ``beta`` = 1.2 by default (the coco-caption / nlg-eval value);
  corpus value = mean over pairs.
- Dist-n: Li et al. 2016, distinct n-grams / total n-grams over the whole corpus.
- Entropy-n: Zhang et al. 2018, entropy (natural log) of the corpus n-gram frequency distribution.
- Repetition rate: share of replies that contain some n-gram (trigram by default) at least twice.
- C-score: Madotto et al. 2019 (NLI entail +1 / neutral 0 / contradict -1, summed over persona sentences,
  averaged over responses); PAL's released-code form takes the max over persona sentences instead of the sum.
- Persona coverage: after Song et al. 2019 (persona coverage of a response); persona F1: unigram F1 between
  response and persona on content words (the knowledge/persona F1 of Lian et al. 2019 and later persona
  dialogue work). Exact definitions are in the docstrings.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "STOPWORDS",
    "normalize_answer",
    "f1",
    "corpus_f1",
    "bleu",
    "bleu_scores",
    "bleu_stats",
    "bleu_from_stats",
    "rouge_l",
    "corpus_rouge_l",
    "distinct_n",
    "ngram_counts",
    "entropy_from_counts",
    "entropy_n",
    "repeats_ngram",
    "repetition_rate",
    "perplexity",
    "hits_at_1",
    "persona_selection_accuracy",
    "content_words",
    "persona_coverage",
    "persona_f1",
    "c_score",
    "c_score_rows",
    "c_score_max",
    "c_score_max_rows",
]

# ---------------------------------------------------------------------------------------------------------
# Normalisation and tokenisation

# ParlAI's punctuation set (string.punctuation without '-'), each replaced by a space.
_PUNCT_RE = re.compile(r"[!\"#$%&()*+,./:;<=>?@\[\]\\^`{|}~_']")
_ARTICLE_RE = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """ParlAI answer normalisation: lowercase, punctuation -> space, drop articles a/an/the, collapse whitespace.

    Order as in ParlAI: lower, punctuation, articles, whitespace. Hyphens are kept (ParlAI's set omits '-').
    Example: ``"The cat's hat, a DOG!"`` -> ``"cat s hat dog"``.
    """
    s = s.lower()
    s = _PUNCT_RE.sub(" ", s)
    s = _ARTICLE_RE.sub(" ", s)
    return " ".join(s.split())


def _lower_tokens(s: str) -> list[str]:
    """BLEU / ROUGE-L / Dist / Entropy / repetition tokenisation: lowercase, split on whitespace."""
    return s.lower().split()


def _check_str(x, what: str) -> str:
    if not isinstance(x, str):
        raise TypeError(f"pal_jax/evaluation/metrics.py: {what} is {type(x).__name__}; expected str")
    return x


def _check_str_list(xs, what: str) -> list[str]:
    if isinstance(xs, str) or not isinstance(xs, Sequence):
        raise TypeError(f"pal_jax/evaluation/metrics.py: {what} is {type(xs).__name__}; expected a list of str")
    for i, x in enumerate(xs):
        _check_str(x, f"{what}[{i}]")
    return list(xs)


# ---------------------------------------------------------------------------------------------------------
# F1 (ParlAI)


def _prf(pred: Sequence[str], gold: Sequence[str]) -> tuple[float, float, float]:
    """Precision, recall, F1 of bag-of-tokens overlap (multiset intersection)."""
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0, 0.0, 0.0
    p = same / len(pred)
    r = same / len(gold)
    return p, r, 2 * p * r / (p + r)


def f1(prediction: str, references: list[str]) -> float:
    """ParlAI unigram F1: ``normalize_answer`` both sides, multiset token overlap, max F1 over references.

    F1 = 2PR/(P+R) with P = overlap/len(pred tokens), R = overlap/len(ref tokens); 0 when there is no overlap
    (including an empty side).
    """
    _check_str(prediction, "f1 prediction")
    references = _check_str_list(references, "f1 references")
    if not references:
        raise ValueError("pal_jax/evaluation/metrics.py: f1 got no references; expected at least one reference string")
    pred = normalize_answer(prediction).split()
    return max(_prf(pred, normalize_answer(r).split())[2] for r in references)


def corpus_f1(predictions: list[str], references: list[list[str]]) -> float:
    """Mean of ``f1`` over (prediction, references) pairs."""
    predictions = _check_str_list(predictions, "corpus_f1 predictions")
    _check_same_len(predictions, references, "corpus_f1", "predictions", "references")
    if not predictions:
        raise ValueError("pal_jax/evaluation/metrics.py: corpus_f1 got 0 predictions; expected at least one")
    return float(np.mean([f1(p, r) for p, r in zip(predictions, references)]))


def _check_same_len(a, b, fn: str, an: str, bn: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"pal_jax/evaluation/metrics.py: {fn} got {len(a)} {an} and {len(b)} {bn}; expected equal lengths")


# ---------------------------------------------------------------------------------------------------------
# BLEU (corpus level)


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def ngram_counts(text: str, n: int) -> collections.Counter:
    """The n-gram counts of one text as Dist-n and Entropy-n count them (lowercase + whitespace split)."""
    return _ngrams(_lower_tokens(_check_str(text, "ngram_counts text")), n)


def _check_bleu_inputs(hypotheses, references) -> tuple[list[str], list[list[str]]]:
    # Type checks catch swapped arguments: hypotheses are list[str], references list[list[str]].
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise TypeError(f"pal_jax/evaluation/metrics.py: bleu hypotheses is {type(hypotheses).__name__}; expected list[str]")
    for i, h in enumerate(hypotheses):
        if not isinstance(h, str):
            raise TypeError(
                f"pal_jax/evaluation/metrics.py: bleu hypotheses[{i}] is {type(h).__name__}; expected str "
                "(were hypotheses and references swapped? references are list[list[str]])"
            )
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError(f"pal_jax/evaluation/metrics.py: bleu references is {type(references).__name__}; expected list[list[str]]")
    for i, rs in enumerate(references):
        if isinstance(rs, str) or not isinstance(rs, Sequence):
            raise TypeError(
                f"pal_jax/evaluation/metrics.py: bleu references[{i}] is {type(rs).__name__}; expected list[str] "
                "(one list of reference strings per hypothesis; wrap a single reference as [ref])"
            )
        if not rs:
            raise ValueError(f"pal_jax/evaluation/metrics.py: bleu references[{i}] is empty; expected at least one reference")
        for j, r in enumerate(rs):
            if not isinstance(r, str):
                raise TypeError(f"pal_jax/evaluation/metrics.py: bleu references[{i}][{j}] is {type(r).__name__}; expected str")
    _check_same_len(hypotheses, references, "bleu", "hypotheses", "reference lists")
    if not hypotheses:
        raise ValueError("pal_jax/evaluation/metrics.py: bleu got 0 hypotheses; expected at least one")
    return list(hypotheses), [list(rs) for rs in references]


def _bleu_stats(hypotheses: list[str], references: list[list[str]], max_n: int):
    """Corpus sums: clipped matches[n-1], hypothesis n-gram totals[n-1], hyp length c, effective ref length r."""
    matches = [0] * max_n
    totals = [0] * max_n
    c = r = 0
    for hyp, refs in zip(hypotheses, references):
        h = _lower_tokens(hyp)
        rt = [_lower_tokens(x) for x in refs]
        c += len(h)
        # Closest reference length; ties go to the shorter one.
        r += min((abs(len(x) - len(h)), len(x)) for x in rt)[1]
        for n in range(1, max_n + 1):
            hc = _ngrams(h, n)
            if not hc:
                continue
            maxref: collections.Counter = collections.Counter()
            for x in rt:
                maxref |= _ngrams(x, n)  # elementwise max count over references
            matches[n - 1] += sum(min(k, maxref[g]) for g, k in hc.items())
            totals[n - 1] += sum(hc.values())
    return matches, totals, c, r


def bleu(*, hypotheses: list[str], references: list[list[str]], max_n: int = 4, epsilon: float = 0.0) -> float:
    """Corpus-level BLEU-``max_n`` (Papineni et al. 2002). Keyword-only: ``bleu(hypotheses=..., references=...)``.

    hypotheses: one string per example. references: one list of reference strings per example.
    Tokens: lowercase + whitespace split. For n = 1..max_n, p_n = sum over the corpus of clipped n-gram matches
    (each hypothesis n-gram count clipped to its max count in any one reference) / sum of hypothesis n-gram counts.
    BLEU = BP * exp(mean_n log p_n) (uniform weights 1/max_n). BP = 1 if c > r else exp(1 - r/c), with c the
    total hypothesis length and r the sum of the per-hypothesis closest reference lengths (ties -> shorter).

    Smoothing: with ``epsilon`` = 0 (default, none) the score is 0.0 when any p_n has zero matches. With
    ``epsilon`` > 0 a zero match count is replaced by ``epsilon`` (Chen & Cherry 2014 method 1). If the corpus
    has no n-grams of some order (every hypothesis shorter than n), or c = 0, the score is 0.0.
    """
    if not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"pal_jax/evaluation/metrics.py: bleu max_n={max_n!r}; expected an int >= 1")
    if epsilon < 0:
        raise ValueError(f"pal_jax/evaluation/metrics.py: bleu epsilon={epsilon!r}; expected >= 0")
    hypotheses, references = _check_bleu_inputs(hypotheses, references)
    matches, totals, c, r = _bleu_stats(hypotheses, references, max_n)
    return bleu_from_stats(matches, totals, c, r, epsilon)


def bleu_stats(hypothesis: str, references: list[str], max_n: int = 4) -> np.ndarray:
    """One hypothesis' BLEU sums as a row [matches_1..max_n, totals_1..max_n, c, r] (see ``bleu``): rows add up
    over a corpus, and ``bleu_from_stats`` of their sum is the corpus BLEU (so a bootstrap can resample rows)."""
    matches, totals, c, r = _bleu_stats(*_check_bleu_inputs([hypothesis], [references]), max_n)
    return np.array(matches + totals + [c, r], np.float64)


def bleu_from_stats(matches, totals, c, r, epsilon: float = 0.0) -> float:
    """BLEU from corpus sums (``bleu``'s formula): clipped matches and hypothesis n-gram totals per order n =
    1..len(matches), hypothesis length c, effective reference length r."""
    if c == 0 or any(t == 0 for t in totals):
        return 0.0
    log_p = 0.0
    for m, t in zip(matches, totals):
        if m == 0:
            if epsilon == 0:
                return 0.0
            m = epsilon
        log_p += math.log(m / t)
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return float(bp * math.exp(log_p / len(matches)))


def bleu_scores(*, hypotheses: list[str], references: list[list[str]], epsilon: float = 0.0) -> dict[str, float]:
    """{"bleu1", "bleu2", "bleu4"}: corpus ``bleu`` with max_n = 1, 2, 4 (keyword-only arguments)."""
    return {
        f"bleu{n}": bleu(hypotheses=hypotheses, references=references, max_n=n, epsilon=epsilon) for n in (1, 2, 4)
    }


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(hyp: str, ref: str, *, beta: float = 1.2) -> float:
    """ROUGE-L F-measure (Lin 2004) of one hypothesis against one reference.

    Tokens: lowercase + whitespace split. L = LCS length, P = L/len(hyp), R = L/len(ref),
    F = (1 + beta^2) P R / (R + beta^2 P); beta = 1.2 by default (coco-caption / nlg-eval), beta = 1 gives the
    harmonic mean. 0.0 when L = 0 (including an empty side).
    """
    h = _lower_tokens(_check_str(hyp, "rouge_l hyp"))
    r = _lower_tokens(_check_str(ref, "rouge_l ref"))
    lcs = _lcs_len(h, r) if h and r else 0
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    b2 = beta * beta
    return (1 + b2) * p * rec / (rec + b2 * p)


def corpus_rouge_l(hyps: list[str], refs: list[str], *, beta: float = 1.2) -> float:
    """Mean ``rouge_l`` over (hyp, ref) pairs."""
    hyps = _check_str_list(hyps, "corpus_rouge_l hyps")
    refs = _check_str_list(refs, "corpus_rouge_l refs")
    _check_same_len(hyps, refs, "corpus_rouge_l", "hyps", "refs")
    if not hyps:
        raise ValueError("pal_jax/evaluation/metrics.py: corpus_rouge_l got 0 hyps; expected at least one")
    return float(np.mean([rouge_l(h, r, beta=beta) for h, r in zip(hyps, refs)]))


# ---------------------------------------------------------------------------------------------------------
# Diversity, perplexity, ranking, selection


def distinct_n(hyps: list[str], n: int) -> float:
    """Dist-n (Li et al. 2016), corpus level: |distinct n-grams over all hyps| / total n-grams over all hyps.

    Tokens: lowercase + whitespace split; n-grams do not cross hypothesis boundaries. 0.0 when there are no
    n-grams at all.
    """
    hyps = _check_str_list(hyps, "distinct_n hyps")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"pal_jax/evaluation/metrics.py: distinct_n n={n!r}; expected an int >= 1")
    seen: set = set()
    total = 0
    for h in hyps:
        g = _ngrams(_lower_tokens(h), n)
        seen.update(g)
        total += sum(g.values())
    return len(seen) / total if total else 0.0


def _check_n(n, fn: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"pal_jax/evaluation/metrics.py: {fn} n={n!r}; expected an int >= 1")
    return int(n)


def entropy_from_counts(counts) -> float:
    """Shannon entropy, natural log, of the distribution given by ``counts``: H = -sum_i p_i ln p_i with
    p_i = c_i / sum_j c_j. The formula of ``entropy_n``, for callers that aggregate n-gram counts themselves
    (a bootstrap over replies, a streamed corpus).

    counts: a 1-D array-like of non-negative finite numbers (one per distinct n-gram; the order is irrelevant),
    or a mapping n-gram -> count (its values are used). Zero counts contribute nothing (0 ln 0 = 0); only the
    proportions matter, so [2, 1, 1] and [4, 2, 2] give the same value. 0.0 when the counts are empty or all zero.
    """
    if isinstance(counts, Mapping):
        counts = list(counts.values())
    try:
        c = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"pal_jax/evaluation/metrics.py: entropy_from_counts counts of type {type(counts).__name__} is not numeric ({e}); "
            "expected a 1-D array of non-negative counts"
        ) from None
    if c.ndim != 1:
        raise ValueError(f"pal_jax/evaluation/metrics.py: entropy_from_counts counts shape {c.shape}; expected a 1-D array")
    if not np.isfinite(c).all() or (c < 0).any():
        bad = c[~np.isfinite(c) | (c < 0)][0]
        raise ValueError(f"pal_jax/evaluation/metrics.py: entropy_from_counts got count {float(bad)!r}; expected finite counts >= 0")
    total = c.sum()
    if total == 0:
        return 0.0
    p = c[c > 0] / total
    return max(0.0, float(-np.sum(p * np.log(p))))  # max: a single n-gram gives 0.0, not -0.0


def entropy_n(hyps: list[str], n: int) -> float:
    """Entropy-n (Zhang et al. 2018, "Generating informative and diverse conversational responses via
    adversarial information maximization", NeurIPS), corpus level.

    Tokens: lowercase + whitespace split; n-grams do not cross hypothesis boundaries. With F(w) the count of
    n-gram w over all hyps and p(w) = F(w) / sum_v F(v): Entropy-n = -sum_w p(w) ln p(w) (natural log), computed
    by ``entropy_from_counts``. Example: unigram counts {a: 2, b: 1, c: 1} -> -(0.5 ln 0.5 + 2 * 0.25 ln 0.25)
    = 1.5 ln 2. 0.0 when there are no n-grams at all.
    """
    hyps = _check_str_list(hyps, "entropy_n hyps")
    n = _check_n(n, "entropy_n")
    counts: collections.Counter = collections.Counter()
    for h in hyps:
        counts.update(_ngrams(_lower_tokens(h), n))
    return entropy_from_counts(list(counts.values()))


def repeats_ngram(hyp: str, n: int = 3) -> bool:
    """Whether the reply contains some n-gram at least twice (occurrences may overlap: "a a a a" repeats the
    trigram "a a a"). Tokens: lowercase + whitespace split. False for a reply shorter than n + 1 tokens.
    """
    _check_str(hyp, "repeats_ngram hyp")
    n = _check_n(n, "repeats_ngram")
    return any(k >= 2 for k in _ngrams(_lower_tokens(hyp), n).values())


def repetition_rate(hyps: list[str], n: int = 3) -> float:
    """Share of replies for which ``repeats_ngram(reply, n)`` is true (default n = 3: a repeated trigram, the
    degenerate "i like dogs and i like dogs" loop of an over-optimised generator)."""
    hyps = _check_str_list(hyps, "repetition_rate hyps")
    n = _check_n(n, "repetition_rate")
    if not hyps:
        raise ValueError("pal_jax/evaluation/metrics.py: repetition_rate got 0 hyps; expected at least one")
    return sum(repeats_ngram(h, n) for h in hyps) / len(hyps)


def perplexity(total_nll: float, total_tokens: float) -> float:
    """exp(total_nll / total_tokens), with total_nll the summed natural-log negative log-likelihood.

    Returns inf when the exponent overflows.
    """
    if not total_tokens > 0:
        raise ValueError(f"pal_jax/evaluation/metrics.py: perplexity total_tokens={total_tokens!r}; expected > 0")
    if not math.isfinite(total_nll):
        raise ValueError(f"pal_jax/evaluation/metrics.py: perplexity total_nll={total_nll!r}; expected a finite number")
    try:
        return math.exp(total_nll / total_tokens)
    except OverflowError:
        return math.inf


def hits_at_1(scores, gold_index) -> float:
    """Fraction of rows whose gold candidate scores strictly higher than every other candidate.

    scores: [N, K] (K = 20 for ConvAI2), higher = better. gold_index: an int for all rows (ConvAI2: 19, the gold
    is last) or an int array [N]. Ties with the gold count as misses (so constant scores give 0, not 1).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"pal_jax/evaluation/metrics.py: hits_at_1 scores shape {s.shape}; expected [N, K] with N, K >= 1")
    if np.isnan(s).any():
        raise ValueError("pal_jax/evaluation/metrics.py: hits_at_1 scores contain NaN; expected finite scores")
    g = np.broadcast_to(np.asarray(gold_index), (s.shape[0],))
    if not np.issubdtype(g.dtype, np.integer) or (g < 0).any() or (g >= s.shape[1]).any():
        raise ValueError(
            f"pal_jax/evaluation/metrics.py: hits_at_1 gold_index {gold_index!r}; expected ints in [0, {s.shape[1]})"
        )
    rows = np.arange(s.shape[0])
    gold = s[rows, g]
    others = s.copy()
    others[rows, g] = -np.inf
    return float(np.mean(gold > others.max(axis=1)))


def persona_selection_accuracy(predicted: list[int], labels: list[int]) -> float:
    """Fraction of turns whose predicted persona index equals the label; -1 ("none") is a class like any other.

    Labels must be known (no None): filter unknown-label turns out before calling.
    """
    _check_same_len(predicted, labels, "persona_selection_accuracy", "predictions", "labels")
    if not labels:
        raise ValueError("pal_jax/evaluation/metrics.py: persona_selection_accuracy got 0 labels; expected at least one")
    for what, xs in (("predicted", predicted), ("labels", labels)):
        for i, x in enumerate(xs):
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < -1:
                raise ValueError(
                    f"pal_jax/evaluation/metrics.py: persona_selection_accuracy {what}[{i}]={x!r}; expected an int >= -1"
                )
    return sum(int(p) == int(l) for p, l in zip(predicted, labels)) / len(labels)


# ---------------------------------------------------------------------------------------------------------
# Persona overlap

# Small fixed English function-word list (pronouns, determiners, auxiliaries, prepositions, conjunctions,
# contraction pieces left by normalize_answer such as "m" from "i'm"). Content words are everything else. The
# persona labeler (data/labels.py) has its own, longer list on purpose: see the note there.
STOPWORDS = frozenset(
    """
    i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her
    hers herself it its itself they them their theirs themselves this that these those who whom whose which what
    a an the and but or nor so if then than because as until while of at by for with about against between into
    through during before after above below to from up down in out on off over under again further once here
    there when where why how all any both each few more most other some such no not only own same too very just
    am is are was were be been being have has had having do does did doing can could will would shall should may
    might must s t m d ll re ve don doesn didn isn aren wasn weren haven hasn hadn wouldn shouldn couldn cant
    dont im ive also yes yeah oh ok okay well really lot
    """.split()
)


def content_words(s: str) -> list[str]:
    """``normalize_answer(s).split()`` with STOPWORDS removed (order and repeats kept)."""
    return [w for w in normalize_answer(_check_str(s, "content_words text")).split() if w not in STOPWORDS]


def persona_coverage(response: str, persona: list[str]) -> float:
    """Persona coverage of a response (after Song et al. 2019, "Exploiting persona information for diverse
    generation of conversational responses", IJCAI; unweighted here, they weight words by IDF).

    For each persona sentence p with content-word set W_p (``content_words``, as a set) and response content-word
    set W_y: cov(p) = |W_p & W_y| / |W_p|. Coverage = max over persona sentences with W_p non-empty; 0.0 when the
    persona is empty or has no content words.
    """
    persona = _check_str_list(persona, "persona_coverage persona")
    wy = set(content_words(response))
    best = 0.0
    for p in persona:
        wp = set(content_words(p))
        if wp:
            best = max(best, len(wp & wy) / len(wp))
    return best


def copies_persona(response: str, persona: list[str]) -> float:
    """1.0 when the response contains a whole persona sentence word for word (both ``normalize_answer``-ed, the
    sentence's words contiguous in the response's), else 0.0. Persona coverage and the consistency proxy reward
    such copies ("i play with my friends on the playground." as the answer to "do you have a dog ?"); people in
    ConvAI2 almost never make them, so a rate far above the gold replies' says a gain in those metrics is copying.
    """
    persona = _check_str_list(persona, "copies_persona persona")
    wy = f" {normalize_answer(_check_str(response, 'copies_persona response'))} "
    return float(any(p and f" {p} " in wy for p in (normalize_answer(x) for x in persona)))


def persona_f1(response: str, persona: list[str]) -> float:
    """Persona F1: max over persona sentences of unigram F1 between the response's and the sentence's content
    words (``content_words``, multiset overlap as in ParlAI F1). Idea: knowledge/persona F1 (Lian et al. 2019,
    "Learning to select knowledge for response generation in dialog systems"), here per sentence.
    0.0 when the persona is empty or nothing overlaps.
    """
    persona = _check_str_list(persona, "persona_f1 persona")
    wy = content_words(response)
    return max((_prf(wy, content_words(p))[2] for p in persona), default=0.0)


# ---------------------------------------------------------------------------------------------------------
# C-score

_NLI_VALUES: Mapping[str, int] = {
    "entail": 1,
    "entailment": 1,
    "neutral": 0,
    "contradict": -1,
    "contradiction": -1,
}


def _nli_value(x, where: str, fn: str = "c_score") -> int:
    if isinstance(x, str):
        v = _NLI_VALUES.get(x.lower())
        if v is None:
            raise ValueError(
                f"pal_jax/evaluation/metrics.py: {fn} label {where}={x!r}; expected one of {sorted(_NLI_VALUES)} or +1/0/-1"
            )
        return v
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or int(x) not in (-1, 0, 1):
        raise ValueError(f"pal_jax/evaluation/metrics.py: {fn} label {where}={x!r}; expected +1, 0 or -1 (or a label name)")
    return int(x)


def _label_rows(nli_labels, fn: str) -> list[list[int]]:
    """Rows of NLI labels -> rows of +1/0/-1 ints; errors name ``fn`` and the [response][sentence] position."""
    if isinstance(nli_labels, str) or not isinstance(nli_labels, Iterable):
        raise TypeError(
            f"pal_jax/evaluation/metrics.py: {fn} nli_labels is {type(nli_labels).__name__}; expected one row of labels per "
            "response (a list of lists or a 2-D int array)"
        )
    rows = []
    for i, row in enumerate(nli_labels):
        if isinstance(row, str) or not isinstance(row, Iterable):
            raise TypeError(
                f"pal_jax/evaluation/metrics.py: {fn} nli_labels[{i}] is {type(row).__name__}; expected a row of labels "
                "(one per persona sentence; wrap a single label as [label])"
            )
        rows.append([_nli_value(x, f"[{i}][{j}]", fn) for j, x in enumerate(row)])
    return rows


def c_score_rows(nli_labels: Iterable[Iterable]) -> np.ndarray:
    """Per-response C-score of Madotto et al. 2019: float64 array [N], entry i = the SUM over response i's
    persona sentences of the NLI value (0.0 for an empty row).

    In pal_jax/evaluation/nli.py's ``c_score_nli`` the labels come from NLI(premise = response, hypothesis = persona
    sentence). nli_labels: one row per response, one label per persona sentence; labels are ints (+1 entail,
    0 neutral, -1 contradict) or names ("entail"/"entailment", "neutral", "contradict"/"contradiction", any case).
    Rows may differ in length (a 2-D int array also works). No rows -> an empty array.
    """
    rows = _label_rows(nli_labels, "c_score_rows")
    return np.array([sum(r) for r in rows], dtype=np.float64)


def c_score_max_rows(nli_labels: Iterable[Iterable]) -> np.ndarray:
    """Per-response C-score in PAL's released-code form: float64 array [N], entry i = the MAX over response i's
    persona sentences of the NLI value, so one entailed sentence gives +1 whatever the others say.

    PAL's code labels each pair with NLI(premise = persona sentence, hypothesis = reply), value in {-1, 0, 1}
    (the opposite direction to ``c_score_rows`` in pal_jax/evaluation/nli.py). Labels and rows as in ``c_score_rows``.
    An empty row (a response with no persona sentences) gives 0.0: nothing entailed, nothing contradicted.
    No rows -> an empty array.
    """
    rows = _label_rows(nli_labels, "c_score_max_rows")
    return np.array([max(r, default=0) for r in rows], dtype=np.float64)


def c_score(nli_labels: Iterable[Iterable]) -> float:
    """C-score (Madotto et al. 2019, "Personalizing dialogue agents via meta-learning").

    nli_labels: one row per response, holding the NLI label of (response, persona sentence j) for each persona
    sentence (pal_jax/evaluation/nli.py's ``c_score_nli``: premise = response, hypothesis = persona sentence); labels are
    ints (+1 entail, 0 neutral, -1 contradict) or names ("entail"/"entailment", "neutral",
    "contradict"/"contradiction"). Rows may differ in length (a 2-D int array also works).
    C = mean over responses of the sum over that response's persona sentences (``c_score_rows``).
    """
    sums = c_score_rows(nli_labels)
    if sums.size == 0:
        raise ValueError("pal_jax/evaluation/metrics.py: c_score got 0 responses; expected at least one row of labels")
    return float(np.mean(sums))


def c_score_max(nli_labels: Iterable[Iterable]) -> float:
    """C-score as PAL's released code computes it: mean over responses of the MAX over that response's persona
    sentences of NLI(premise = persona sentence, hypothesis = reply) in {-1, 0, 1} (``c_score_max_rows``).

    Differs from Madotto et al.'s ``c_score`` (sum over sentences, premise = response): the row [1, -1, 0] gives
    a sum of 0 but a max of 1. Its range is [-1, 1] whatever the persona size. Labels as in ``c_score``.
    """
    maxes = c_score_max_rows(nli_labels)
    if maxes.size == 0:
        raise ValueError("pal_jax/evaluation/metrics.py: c_score_max got 0 responses; expected at least one row of labels")
    return float(np.mean(maxes))
