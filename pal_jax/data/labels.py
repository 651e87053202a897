"""Persona relevance labels: which persona sentence a response draws on, or none (-1).

The PAL paper labels turns with an NLI model; offline, the default here is lexical overlap of content words. Any
callable `(persona: list[str], response: str) -> int` is a labeler; register one under a name with
`register_labeler` to select it from the config (`config.data.labeler`).
"""
from __future__ import annotations

import re
from typing import Callable, Protocol


class Labeler(Protocol):
    def __call__(self, persona: list[str], response: str) -> int:
        """Index into persona of the sentence the response uses, or -1 for none."""


# Function words and chat fillers that carry no persona content (lowercase, apostrophes removed). Not the list of
# evaluation.metrics.content_words, on purpose: this one decides WHICH persona sentence a turn draws on, so it also
# drops the frame words persona sentences share ("i like", "my favorite", "i work", "i live") that would tie every
# sentence, and stems plurals (dog/dogs). The metric's list is a small function-word list over ParlAI's
# normalisation, so persona coverage and persona F1 count every content word, as ParlAI-style F1 does, and keep
# their published meaning; changing either moves labels or metric values (and the golden curves).
STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren as at be because been before being below
between both but by can cannot cant could couldn did didn do does doesn doing don dont down during each few for
from further had hadn has hasn have haven having he her here hers herself him himself his how i id if ill im in
into is isn it its itself ive just let lets me more most much my myself no nor not now of off on once only or
other ought our ours ourselves out over own same she should shouldn so some such than that thats the their
theirs them themselves then there theres these they theyre this those through to too under until up upon very
was wasn we were weren what whats when where which while who whom why will with won would wouldn you youd youll
your youre yours yourself yourselves ve ll re s t d m u ur ok okay oh yes yeah yep no nope hi hello hey lol haha
wow well really like love likes loved get got go going gone goes good great nice cool fun thing things lot lots
sure think know want wanted make made say said tell see way day today time one two also always never ever still
even maybe yes pretty kind sort bit though something anything everything nothing someone anyone everyone
favorite favourite old year years live lives living work works working worked play plays playing played enjoy
enjoys enjoying use used using watch watching eat eating ate stop people person feel need try back come take
look many new big little best first last right better find give guy man thank thanks glad sorry true
""".split())

_WORD = re.compile(r"[a-z0-9]+")


def _stem(w: str) -> str:
    """A light plural stemmer: books -> book, stories -> story, glasses -> glass, watches -> watch (keeps 'ss'
    words)."""
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def content_words(text: str) -> set[str]:
    """Lowercased, punctuation-stripped, apostrophes joined (i'm -> im), stopwords removed, plurals stemmed."""
    words = _WORD.findall(text.lower().replace("'", "").replace("\u2019", ""))
    return {_stem(w) for w in words if w not in STOPWORDS and len(w) > 1}


class OverlapLabeler:
    """Label = the persona sentence sharing the most content words with the response, if it shares at least
    `threshold` of them; else -1. Ties go to the sentence whose content words are covered the most (fraction),
    then to the lower index."""

    def __init__(self, threshold: int = 1):
        if threshold < 1:
            raise ValueError(f"OverlapLabeler threshold = {threshold}: expected >= 1 shared content word")
        self.threshold = threshold

    def scores(self, persona: list[str], response: str) -> list[tuple[int, float]]:
        r = content_words(response)
        out = []
        for s in persona:
            p = content_words(s)
            n = len(p & r)
            out.append((n, n / len(p) if p else 0.0))
        return out

    def __call__(self, persona: list[str], response: str) -> int:
        scores = self.scores(persona, response)
        if not scores:
            return -1
        best = max(range(len(scores)), key=lambda k: (scores[k], -k))
        return best if scores[best][0] >= self.threshold else -1

    def __repr__(self) -> str:
        return f"OverlapLabeler(threshold={self.threshold})"


_REGISTRY: dict[str, Callable[..., Labeler]] = {"overlap": OverlapLabeler}


def register_labeler(name: str, factory: Callable[..., Labeler]) -> None:
    """Make `get_labeler(name)` (and `name:ARG`) build a labeler with `factory()` (or `factory(int(ARG))`)."""
    _REGISTRY[name] = factory


def get_labeler(name: str) -> Labeler:
    """A labeler by name: 'overlap' (default threshold) or 'overlap:N' (at least N shared content words)."""
    base, _, arg = name.partition(":")
    if base not in _REGISTRY:
        raise ValueError(f"labeler {name!r}: unknown name {base!r}; expected one of {sorted(_REGISTRY)} "
                         f"(optionally 'name:N')")
    if not arg:
        return _REGISTRY[base]()
    try:
        value = int(arg)
    except ValueError:
        raise ValueError(f"labeler {name!r}: argument {arg!r} is not an integer; expected e.g. '{base}:2'") from None
    return _REGISTRY[base](value)


def label_dialogues(dialogues, labeler: Labeler) -> int:
    """Fill persona_label of every turn whose label is None (labels already set are kept). Returns how many
    labels were filled."""
    filled = 0
    for d in dialogues:
        for i, t in enumerate(d.turns):
            if t.persona_label is not None:
                continue
            label = labeler(list(d.persona), t.response)
            if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(d.persona):
                raise ValueError(f"{d.source}: labeler {labeler!r} returned {label!r} for turn {i}; expected -1 or "
                                 f"an index in [0, {len(d.persona) - 1}]")
            t.persona_label = label
            filled += 1
    return filled


def label_counts(dialogues) -> dict[str, int]:
    """{'persona': turns labelled with a sentence, 'none': labelled -1, 'unknown': None} over the dialogues."""
    out = {"persona": 0, "none": 0, "unknown": 0}
    for d in dialogues:
        for t in d.turns:
            key = "unknown" if t.persona_label is None else ("none" if t.persona_label == -1 else "persona")
            out[key] += 1
    return out
