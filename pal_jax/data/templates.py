"""Plain-text prompt templates for the select, generate and persona-free tasks.

A prompt is built in parts (head, history lines, tail) so the pipeline can drop the oldest history lines when a
prompt is too long. Every part ends with a newline, so the joined text reads as:

    persona:
    1. i read twenty books a year.
    2. i'm a stunt double as my second job.
    dialogue:
    user: hello what are doing today ?
    bot: i am good , i just got off work .
    user: i just got done watching a horror movie
    persona sentence for the bot's next reply:
                                              <- the target follows: "1.i read twenty books a year."

The partner is "user", the persona's owner (the model) is "bot". History lines are tagged from the end: the last
line is always the partner's, so a history of either parity is tagged correctly.
"""
from __future__ import annotations

import dataclasses
import re

NONE_PERSONA = "No personal description."
USER, BOT = "user", "bot"
SELECT_CUE = "persona sentence for the bot's next reply:\n"
REPLY_CUE = "bot's reply:\n"
HIGHLIGHT = "persona to use: "
# The fixed strings of the templates: add them (a few dozen times) to a tokenizer's training texts so that
# they become a handful of tokens each.
FIXED_TEXTS = ("persona:\n1. ", "dialogue:\n", "user: ", "bot: ", SELECT_CUE, HIGHLIGHT + NONE_PERSONA + "\n",
               REPLY_CUE, NONE_PERSONA)


@dataclasses.dataclass
class PromptParts:
    head: str  # persona block (may be ""); ends with a newline when not empty
    history: list[str]  # formatted history lines, oldest first, each "user: ...\n" or "bot: ...\n"
    tail: str  # the cue (and the highlighted persona); the target follows it directly

    def text(self) -> str:
        return self.head + "".join(self.history) + self.tail


def _clean(s: str) -> str:
    return " ".join(s.split())  # one line: newlines/tabs inside an utterance would break the format


def persona_block(persona) -> str:
    lines = ["persona:"] + [f"{k}. {_clean(s)}" for k, s in enumerate(persona, start=1)]
    return "\n".join(lines) + "\n"


def history_lines(history) -> list[str]:
    """Tag each utterance: the last is the partner's (user), then alternating back to the oldest."""
    n = len(history)
    return [f"{USER if (n - 1 - i) % 2 == 0 else BOT}: {_clean(u)}\n" for i, u in enumerate(history)]


def select_prompt(persona, history) -> PromptParts:
    return PromptParts(head=persona_block(persona) + "dialogue:\n", history=history_lines(history), tail=SELECT_CUE)


def select_target(persona, label: int) -> str:
    """'k.<sentence>' for label k-1 (1-based k, no space), NONE_PERSONA for label -1."""
    if label == -1:
        return NONE_PERSONA
    if not 0 <= label < len(persona):
        raise ValueError(f"select_target: persona label {label} out of range; expected -1 or an index in "
                         f"[0, {len(persona) - 1}] of a persona of {len(persona)} sentences")
    return f"{label + 1}.{_clean(persona[label])}"


def generate_prompt(persona, history, selected: str | None) -> PromptParts:
    """The persona block, the history and the highlighted persona sentence (NONE_PERSONA when selected is None)."""
    chosen = NONE_PERSONA if selected is None else _clean(selected)
    return PromptParts(head=persona_block(persona) + "dialogue:\n", history=history_lines(history),
                       tail=f"{HIGHLIGHT}{chosen}\n{REPLY_CUE}")


def persona_free_prompt(history) -> PromptParts:
    return PromptParts(head="dialogue:\n", history=history_lines(history), tail=REPLY_CUE)


_TARGET = re.compile(r"\s*(\d+)\s*\.\s*(.*)\Z", re.S)


def parse_select_target(text: str, persona) -> int:
    """Inverse of select_target: the persona index named by 'k.<sentence>' (or by the sentence alone), -1 for
    NONE_PERSONA or anything that names no sentence of this persona (a number out of range, other text)."""
    t = _clean(text)
    if t == NONE_PERSONA:
        return -1
    m = _TARGET.match(t)
    if m:
        k = int(m.group(1))
        return k - 1 if 1 <= k <= len(persona) else -1
    cleaned = [_clean(s) for s in persona]
    return cleaned.index(t) if t in cleaned else -1
