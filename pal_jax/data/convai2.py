"""Persona dialogue records and readers: the ParlAI ConvAI2 text format and a JSONL prompt format.

ConvAI2 text format (ParlAI), one line per persona sentence or turn, each starting with its 1-based line number
inside the dialogue; a line numbered 1 starts a new dialogue:

    1 your persona: i read twenty books a year.
    2 partner's persona: i like to ski.                     (only in the "both" files)
    3 hello what are doing today ?<TAB>i am good , i just got off work .<TAB><TAB>cand1|cand2|...|cand20

The candidates part is optional (the "no_cands" files). All four ParlAI variants are read the same way:
self/both (with or without "partner's persona:" lines) and original/revised (the sentences differ, not the format).

JSONL format (one JSON object a line), used for prediction input and, with data.source="jsonl", as Stage 1 training
data (read_jsonl_dialogues):

    {"persona": ["i am a nurse.", ...], "history": ["hi , what do you do ?"], "response": "...", "persona_label": 0}

`response`, `persona_label`, `candidates`, `id` and `dialogue_id` are optional (training needs `response`; a
missing or null `persona_label` is filled by the configured labeler, -1 = no persona sentence). History is oldest
first and ends with the partner. The JSONL reading (`json_objects`, `str_list`) is shared with the Stage 2
preference files (pal_jax/data/preferences.py).

Every error is a DataError (a ValueError) whose message is "<path>:<line>: <what is wrong>; expected <what>".
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

YOUR_PERSONA = "your persona:"
PARTNER_PERSONA = "partner's persona:"
MAX_LINE_BYTES = 100_000  # a longer line is refused (a 10 MB line without spaces stalls tokenizer training)
TURN_FORMAT = "'N <partner utterance><TAB><own response>[<TAB><TAB>cand1|cand2|...]'"


# the ConvAI2 variants (data.tfds_config): whose persona the dialogues show, original or revised wording
TFDS_VARIANTS = ("self_original", "self_revised", "both_original", "both_revised")


class DataError(ValueError):
    """A data file that cannot be read: the message names the file, the line and what was expected."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """The data path does not exist (also a FileNotFoundError)."""


@dataclasses.dataclass
class Turn:
    partner: str  # the partner's utterance this turn answers
    response: str  # gold own response
    candidates: list[str] | None  # ConvAI2 candidates (the last is the gold response) or None
    persona_label: int | None  # index into Dialogue.persona of the sentence the response uses, -1 none, None unknown
    # the whole history this response answers (oldest first, ending with `partner`) when a file gives it per turn
    # (JSONL rows); None: built from the dialogue's earlier turns (Dialogue.history)
    history: tuple[str, ...] | None = None


@dataclasses.dataclass
class Dialogue:
    persona: list[str]  # own persona sentences ("your persona:")
    partner_persona: list[str]  # "partner's persona:" sentences (may be empty)
    turns: list[Turn]
    source: str  # "path:line" where the dialogue starts
    dialogue_id: int

    def history(self, i: int) -> list[str]:
        """[partner, response, ..., turns[i].partner]: the history that turn i's response answers, oldest first (the
        turn's own history when the file gave one, JSONL)."""
        if self.turns[i].history is not None:
            return list(self.turns[i].history)
        out: list[str] = []
        for t in self.turns[:i]:
            out += [t.partner, t.response]
        out.append(self.turns[i].partner)
        return out


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One JSONL record: what a prediction may see (persona, history) and optional gold facts."""
    persona: tuple[str, ...]
    history: tuple[str, ...]
    response: str | None = None
    persona_label: int | None = None
    candidates: tuple[str, ...] | None = None
    id: str | int | None = None
    source: str = ""  # "path:line"
    dialogue_id: str | int | None = None  # rows with the same one are one dialogue (data.source="jsonl")


def err(path, line: int, what: str, expected: str) -> DataError:
    """The DataError "<path>:<line>: <what>; expected <expected>" every reader of this package raises."""
    return DataError(f"{path}:{line}: {what}; expected {expected}")


def _read_lines(path, kind: str) -> list[str]:
    """The file's lines, decoded as UTF-8 line by line (so a bad byte is reported with its line). `path` may be an
    etils.epath URL (gs://...)."""
    path = os.fspath(path)
    if "://" in path:
        from etils import epath
        p = epath.Path(path)
        exists, is_dir, read = p.exists, p.is_dir, p.read_bytes
    else:
        exists, is_dir = (lambda: os.path.exists(path)), (lambda: os.path.isdir(path))

        def read():
            with open(path, "rb") as f:
                return f.read()
    if not exists():
        raise DataFileNotFoundError(f"{path}:0: no such file; expected {kind}")
    if is_dir():
        raise err(path, 0, "is a directory", kind)
    raw = read()
    if not raw.strip():
        raise err(path, 1, "file is empty", kind)
    if b"\r" in raw and b"\n" not in raw:
        n_cr = raw.count(b"\r")
        raise err(path, 1, f"the line endings are CR only (old Mac style: {n_cr} CR, no LF)",
                   f"{kind}, with LF or CRLF line endings (convert with: tr '\\r' '\\n' < IN > OUT)")
    lines = []
    for n, b in enumerate(raw.split(b"\n"), start=1):
        if len(b) > MAX_LINE_BYTES:
            raise err(path, n, f"line of {len(b):,} bytes", f"{kind}, lines of at most {MAX_LINE_BYTES:,} bytes")
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise err(path, n, f"bytes {b[e.start:e.start + 4]!r} at column {e.start + 1} are not UTF-8",
                       "UTF-8 text") from None
        lines.append(s[:-1] if s.endswith("\r") else s)
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    return lines


_NUM = re.compile(r"(\d+) (.*)\Z", re.S)


def read_convai2(path) -> list[Dialogue]:
    """Read a ParlAI ConvAI2 text file (self/both, original/revised, with or without candidates)."""
    kind = "a ConvAI2 text file (ParlAI format: numbered 'your persona:' lines, then turns " + TURN_FORMAT + ")"
    lines = _read_lines(path, kind)
    path = os.fspath(path)
    dialogues: list[Dialogue] = []
    cur: Dialogue | None = None
    prev_num = 0

    def finish(d: Dialogue | None):
        if d is None:
            return
        if not d.persona:
            raise DataError(f"{d.source}: dialogue {d.dialogue_id} has no 'your persona:' line; expected at least "
                            f"one own persona sentence before its first turn")
        if not d.turns:
            raise DataError(f"{d.source}: dialogue {d.dialogue_id} has no turns; expected at least one line "
                            f"{TURN_FORMAT} after its persona")
        dialogues.append(d)

    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry nothing
        m = _NUM.match(line)
        if m is None:
            raise err(path, n, f"line does not start with a line number: {line[:60]!r}",
                       "'N your persona: ...' or " + TURN_FORMAT)
        num, rest = int(m.group(1)), m.group(2)
        if num == 1:
            finish(cur)
            cur = Dialogue(persona=[], partner_persona=[], turns=[], source=f"{path}:{n}",
                           dialogue_id=len(dialogues))
        elif cur is None or num != prev_num + 1:
            raise err(path, n, f"line number {num} out of sequence (previous line number {prev_num})",
                       f"{prev_num + 1} (continuing the dialogue) or 1 (starting a new one)")
        prev_num = num
        if rest.startswith(YOUR_PERSONA) or rest.startswith(PARTNER_PERSONA):
            own = rest.startswith(YOUR_PERSONA)
            if cur.turns:
                raise err(path, n, "persona line after the dialogue's first turn",
                           "all persona lines of a dialogue before its turns")
            sentence = rest[len(YOUR_PERSONA if own else PARTNER_PERSONA):].strip()
            if not sentence:
                raise err(path, n, "empty persona sentence", "'your persona: <sentence>'")
            (cur.persona if own else cur.partner_persona).append(sentence)
            continue
        fields = rest.split("\t")
        if len(fields) < 2:
            raise err(path, n, f"turn line has no tab between utterance and response: {rest[:60]!r}", TURN_FORMAT)
        partner, response = fields[0].strip(), fields[1].strip()
        extra = fields[2:]
        candidates = None
        if len(extra) == 2 and extra[1].strip():  # ParlAI: text, labels, reward (empty), label_candidates
            candidates = [c.strip() for c in extra[1].split("|")]
        elif any(x.strip() for x in extra):
            raise err(path, n, f"turn line has {len(fields)} tab-separated fields with content after the "
                                f"response in the wrong place", TURN_FORMAT)
        if not response:
            raise err(path, n, "empty response", TURN_FORMAT)
        cur.turns.append(Turn(partner=partner, response=response, candidates=candidates, persona_label=None))
    finish(cur)
    if not dialogues:
        raise err(path, 1, "no dialogues found", kind)
    return dialogues


JSONL_KEYS = ("persona", "history", "response", "persona_label", "candidates", "id", "dialogue_id")


def str_list(v, path, n, key, allow_empty: bool) -> tuple[str, ...]:
    """v as a tuple of stripped strings, or the DataError naming path:n and the key."""
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise err(path, n, f"key {key!r} is {type(v).__name__} {str(v)[:60]}", "a list of strings")
    if not allow_empty and not v:
        raise err(path, n, f"key {key!r} is an empty list", "at least one string")
    return tuple(x.strip() for x in v)


def json_objects(path, kind: str):
    """(1-based line number, JSON object) for every non-blank line of a JSONL file; a line that is not a JSON
    object, a bad byte, an over-long line or an empty file stops with a DataError naming the file and line. kind:
    what the file should hold (for the messages). `path` may be a gs:// URL."""
    lines = _read_lines(path, kind)
    path = os.fspath(path)
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise err(path, n, f"invalid JSON at column {e.colno}: {e.msg}", "one JSON object a line") from None
        if not isinstance(obj, dict):
            raise err(path, n, f"a JSON {type(obj).__name__}", "a JSON object")
        yield n, obj


def read_persona_label(obj, path, n, n_persona: int) -> int | None:
    """obj's optional 'persona_label' (None when absent or null: the labeler fills it), checked against the persona."""
    label = obj.get("persona_label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < n_persona):
        raise err(path, n, f"key 'persona_label' is {label!r}",
                   f"null or an integer in [-1, {n_persona - 1}] (-1 = no persona sentence)")
    return label


def read_id(obj, path, n, key: str):
    """obj's optional id under `key` ('id', 'dialogue_id': a string or an integer), or None."""
    v = obj.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int))):
        raise err(path, n, f"key {key!r} is {type(v).__name__}", "a string, an integer or null")
    return v


def looks_like_jsonl(path) -> bool:
    """Whether a prediction input file holds JSONL (its first non-blank line starts with '{') rather than ConvAI2
    text (lines start with a number), whatever its name. False for a path that cannot be read (the reader says why)."""
    try:
        with open(os.fspath(path), "rb") as f:
            for line in f:
                line = line.lstrip(b"\xef\xbb\xbf").strip()
                if line:
                    return line.startswith(b"{")
    except OSError:
        pass
    return False


JSONL_KIND = ('a JSONL file, one object a line: {"persona": [...], "history": [...], "response": optional, '
              '"persona_label": optional}')


def read_jsonl(path, need_response: bool = False) -> list[PromptRecord]:
    """Read persona-dialogue JSONL: one JSON object a line with persona, history and optional response/label
    (prediction input; need_response: training data, where every line needs a non-empty response)."""
    kind = JSONL_KIND
    path = os.fspath(path)
    out: list[PromptRecord] = []
    for n, obj in json_objects(path, kind):
        unknown = [k for k in obj if k not in JSONL_KEYS]
        if unknown:
            raise err(path, n, f"unknown key {unknown[0]!r}", f"only the keys {', '.join(JSONL_KEYS)}")
        for key in ("persona", "history") + (("response",) if need_response else ()):
            if key not in obj:
                raise err(path, n, f"missing key {key!r}",
                           "'response': the gold reply (a non-empty string)" if key == "response"
                           else f"{key!r}: a list of strings")
        persona = str_list(obj["persona"], path, n, "persona", allow_empty=False)
        history = str_list(obj["history"], path, n, "history", allow_empty=False)
        response = obj.get("response")
        if response is not None and not isinstance(response, str):
            raise err(path, n, f"key 'response' is {type(response).__name__}", "a string or null")
        if need_response and not (response or "").strip():
            raise err(path, n, f"key 'response' is {response!r}", "the gold reply, a non-empty string")
        label = read_persona_label(obj, path, n, len(persona))
        cands = obj.get("candidates")
        if cands is not None:
            cands = str_list(cands, path, n, "candidates", allow_empty=False)
        rid = read_id(obj, path, n, "id")
        out.append(PromptRecord(persona=persona, history=history,
                                response=response.strip() if response is not None else None,
                                persona_label=label, candidates=cands, id=rid, source=f"{path}:{n}",
                                dialogue_id=read_id(obj, path, n, "dialogue_id")))
    if not out:
        raise err(path, 1, "no records found", kind)
    return out


def persona_key(persona) -> tuple[str, ...]:
    """The persona as compared to group rows into dialogues: each sentence with its whitespace collapsed."""
    return tuple(" ".join(s.split()) for s in persona)


def read_jsonl_dialogues(path) -> list[Dialogue]:
    """Stage 1 training data (data.source="jsonl"): read_jsonl with a response on every line, grouped into
    dialogues for the train/dev/test split (corpus.split_dialogues): rows with the same `dialogue_id` are one
    dialogue when the rows carry one (then every row must, and the rows of one dialogue must share their persona);
    without it, rows with the same persona are one dialogue. Each row is one turn, in file order, with its own
    history; a missing or null persona_label is left None for the configured labeler."""
    records = read_jsonl(path, need_response=True)
    path = os.fspath(path)
    first = next((r for r in records if r.dialogue_id is not None), None)
    groups: dict = {}
    for r in records:
        line = int(r.source.rsplit(":", 1)[1])
        if first is not None:
            if r.dialogue_id is None:
                raise err(path, line, "missing key 'dialogue_id'",
                           f"a 'dialogue_id' on every line, as {first.source} has one (rows are grouped into "
                           f"dialogues by it for the train/dev/test split)")
            key = ("id", str(r.dialogue_id))
        else:
            key = ("persona", persona_key(r.persona))
        d = groups.get(key)
        if d is None:
            d = groups[key] = Dialogue(persona=list(r.persona), partner_persona=[], turns=[], source=r.source,
                                       dialogue_id=len(groups))
        elif persona_key(d.persona) != persona_key(r.persona):
            raise err(path, line, f"key 'persona' differs from that of {d.source}, which has the same "
                                   f"'dialogue_id' {r.dialogue_id!r}",
                       "the same persona on every line of a dialogue")
        d.turns.append(Turn(partner=r.history[-1], response=r.response, candidates=
                            list(r.candidates) if r.candidates is not None else None,
                            persona_label=r.persona_label, history=tuple(r.history)))
    return list(groups.values())


def write_jsonl(records, path) -> None:
    """Write PromptRecords (or Dialogues' turns, via records_from_dialogues) as JSONL readable by read_jsonl."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            obj = {"persona": list(r.persona), "history": list(r.history)}
            if r.response is not None:
                obj["response"] = r.response
            if r.persona_label is not None:
                obj["persona_label"] = r.persona_label
            if r.candidates is not None:
                obj["candidates"] = list(r.candidates)
            if r.id is not None:
                obj["id"] = r.id
            if r.dialogue_id is not None:
                obj["dialogue_id"] = r.dialogue_id
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def records_from_dialogues(dialogues) -> list[PromptRecord]:
    """One PromptRecord per turn (persona, history up to the partner's utterance, gold response and label)."""
    out = []
    for d in dialogues:
        for i, t in enumerate(d.turns):
            out.append(PromptRecord(persona=tuple(d.persona), history=tuple(d.history(i)), response=t.response,
                                    persona_label=t.persona_label,
                                    candidates=tuple(t.candidates) if t.candidates is not None else None,
                                    id=f"{d.dialogue_id}:{i}", source=d.source, dialogue_id=d.dialogue_id))
    return out
