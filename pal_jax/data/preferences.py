"""Stage 2 preference pairs from JSONL (config.stage2.pairs, or the workdir's pairs.jsonl written by make_pairs).

One reader for make_pairs' own pairs and the user's, two forms told apart line by line by their keys (a line
may be in either form; one with neither key, or both, is refused):

- persona form (`persona` key; make_pairs writes it):

      {"persona": ["i am a nurse.", ...], "history": ["hi , what do you do ?"], "chosen": "i am a nurse .",
       "rejected": "i like pizza .", "persona_label": 0, "kind": "generate", "id": "3:0", "dialogue_id": 3}

  `persona_label`, `kind` ("generate", the default, or "select"), `id` and `dialogue_id` are optional. Rendered
  with pal_jax's own templates (templates.py, the format Stage 1 trains on): a generate pair's prompt is the
  generate prompt with the labelled persona sentence highlighted (none for -1); a select pair's the select
  prompt. A missing or null `persona_label` of a generate pair is filled by the configured labeler
  (data.labeler) from the chosen reply, as Stage 1 labels its turns; a select pair needs one.

- conversational form (`prompt` key; TRL's conversational preference datasets):

      {"prompt": [{"role": "system", "content": "i am a nurse.\\ni have two dogs."},
                  {"role": "user", "content": "hi , what do you do ?"}],
       "chosen": [{"role": "assistant", "content": "i am a nurse ."}],
       "rejected": [{"role": "assistant", "content": "i like pizza ."}], "dialogue_id": 3}

  System messages (optional) come first; then user and assistant messages in turn, the last the user's (the
  partner's); chosen and rejected are one assistant message each. Rendered with the Stage 1 model's chat template
  (pretrained.chat_template: the GGUF's or the Hugging Face dir's the model started from): a ChatML template
  renders the messages as they are (chat_format.render, add_generation_prompt; the reply ends with <|im_end|>), as
  TRL's trainer does, except that a template's default system message for a prompt without one (SmolLM2 adds "You
  are a helpful AI assistant named SmolLM...") is not added: rendering never needs jinja2. A model without a chat
  template (the tiny preset, which reads only its plain template) gets the persona form: the system message holds
  the persona, one sentence a line (a leading "your persona:" or "1." numbering is dropped), and the other
  messages are the history; such a line needs a system message.
  Another template family is refused (pal_jax renders ChatML only): give those pairs in the persona form.

Held-out pairs (stage2.dev_fraction) are drawn by dialogue (stage2._is_dev hashes the dialogue part of each
pair's id "DIALOGUE:TURN"): a pair's dialogue is its `dialogue_id`; else its id's dialogue part when the id has
make_pairs' form "N:M"; else its persona (the system messages of a conversational pair, or its whole prompt
without one), so pairs of one persona stay on one side. The reader sets `id` to "DIALOGUE:LINE" where it has to.

Every error is a convai2.DataError "<path>:<line>: <what, naming the key>; expected <what>".
"""
from __future__ import annotations

import json
import logging
import os
import re
import zlib

from pal_jax.data import chat_format, templates
from pal_jax.data.convai2 import DataError, err, json_objects, read_id, read_persona_label, str_list
from pal_jax.data.templates import PromptParts

PERSONA_KEYS = ("persona", "history", "chosen", "rejected", "persona_label", "kind", "id", "dialogue_id")
CONVERSATION_KEYS = ("prompt", "chosen", "rejected", "dialogue_id")
KINDS = ("generate", "select")
ROLES = (chat_format.SYSTEM, chat_format.USER, chat_format.ASSISTANT)
PERSONA_FORM = ('{"persona": [str, ...], "history": [str, ...], "chosen": str, "rejected": str, '
                '"persona_label": int (optional)}')
CONVERSATION_FORM = ('{"prompt": [{"role": ..., "content": ...}, ...], "chosen": [{"role": "assistant", '
                     '"content": ...}], "rejected": [{"role": "assistant", "content": ...}]}')
KIND = f"a JSONL file of preference pairs, one a line: {PERSONA_FORM} or {CONVERSATION_FORM}"
CHAT, PLAIN = "chat", "plain"

_PAIR_ID = re.compile(r"\d+:.*\Z", re.S)  # make_pairs' ids "DIALOGUE:TURN"
_NUMBERING = re.compile(r"\s*(?:your persona:\s*)?(?:\d+\s*[.)]\s*)?", re.I)


def _group(value) -> int:
    """A dialogue key as the non-negative integer stage2._is_dev hashes: a non-negative integer (or its digits)
    as it is, anything else by CRC-32 of its text."""
    if isinstance(value, int) and value >= 0:
        return value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    return int(text) if text.isdigit() else zlib.crc32(text.encode("utf-8"))


def _split_id(obj, n: int, dialogue, fallback) -> str:
    """The pair's id as stage2._is_dev reads it ("DIALOGUE:..."): see the module doc."""
    rid = obj.get("id")
    if dialogue is not None:
        return f"{_group(dialogue)}:{n}"
    if isinstance(rid, str) and _PAIR_ID.match(rid):
        return rid
    return f"{_group(fallback)}:{n}"


def _check_keys(obj, path, n, allowed, form: str) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise err(path, n, f"unknown key {unknown[0]!r} in a {form} pair", f"only the keys {', '.join(allowed)}")


def _label(labeler, persona, reply: str, path, n) -> int:
    label = labeler(list(persona), reply)
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(persona):
        raise ValueError(f"{path}:{n}: labeler {labeler!r} returned {label!r}; expected -1 or an index in "
                         f"[0, {len(persona) - 1}]")
    return label


def _persona_row(obj, path, n, labeler) -> dict:
    _check_keys(obj, path, n, PERSONA_KEYS, "persona-form")
    for key in ("persona", "history", "chosen", "rejected"):
        if key not in obj:
            raise err(path, n, f"missing key {key!r}", f"a persona-form pair {PERSONA_FORM}")
    persona = str_list(obj["persona"], path, n, "persona", allow_empty=False)
    history = str_list(obj["history"], path, n, "history", allow_empty=False)
    for key in ("chosen", "rejected"):
        if not isinstance(obj[key], str):
            raise err(path, n, f"key {key!r} is {type(obj[key]).__name__} {str(obj[key])[:60]}",
                      "a string (the reply)" + ("; a list of messages needs 'prompt' instead of 'persona' and "
                                                "'history' (the conversational form)" if isinstance(obj[key], list)
                                                else ""))
    kind = obj.get("kind", "generate")
    if kind not in KINDS:
        raise err(path, n, f"key 'kind' is {kind!r}", f"one of {KINDS} (default 'generate')")
    label = read_persona_label(obj, path, n, len(persona))
    if label is None and kind == "select":
        raise err(path, n, "missing key 'persona_label' in a select pair",
                  "the labelled persona index (-1 = none) that the chosen select target names")
    chosen, rejected = obj["chosen"], obj["rejected"]  # as they are (an empty one is dropped when encoded)
    if label is None and labeler is not None:
        label = _label(labeler, persona, chosen, path, n)
    read_id(obj, path, n, "id")  # checked; _split_id reads it
    dialogue = read_id(obj, path, n, "dialogue_id")
    return {"id": _split_id(obj, n, dialogue, list(persona)), "persona": list(persona), "history": list(history),
            "persona_label": label, "kind": kind, "chosen": chosen, "rejected": rejected, "source": f"{path}:{n}"}


def _messages(v, path, n, key: str) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise err(path, n, f"key {key!r} is {type(v).__name__} {str(v)[:60]}",
                  'a non-empty list of messages {"role": ..., "content": ...}'
                  + (" (a string prompt without persona, TRL's standard form, is not supported: give the "
                     "persona in a system message, or use the persona form)" if key == "prompt" else ""))
    out = []
    for i, m in enumerate(v, start=1):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise err(path, n, f"key {key!r}: message {i} is {str(m)[:60]}",
                      'a message {"role": ..., "content": ...} with exactly these two keys')
        if m["role"] not in ROLES:
            raise err(path, n, f"key {key!r}: message {i} has role {m['role']!r}", f"one of {ROLES}")
        if not isinstance(m["content"], str):
            raise err(path, n, f"key {key!r}: message {i} has content of type {type(m['content']).__name__}",
                      "a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _reply(v, path, n, key: str) -> str:
    if isinstance(v, str):
        raise err(path, n, f"key {key!r} is a string in a conversational pair",
                  '[{"role": "assistant", "content": ...}] (one assistant message)')
    msgs = _messages(v, path, n, key)
    if len(msgs) != 1 or msgs[0]["role"] != chat_format.ASSISTANT:
        raise err(path, n, f"key {key!r} holds {len(msgs)} message(s) with roles {[m['role'] for m in msgs]}",
                  '[{"role": "assistant", "content": ...}] (one assistant message)')
    return msgs[0]["content"]


def _conversation(obj, path, n) -> tuple[list[dict], list[dict]]:
    """(system messages, the other messages) of the prompt, checked: see the module doc."""
    msgs = _messages(obj["prompt"], path, n, "prompt")
    k = 0
    while k < len(msgs) and msgs[k]["role"] == chat_format.SYSTEM:
        k += 1
    system, turns = msgs[:k], msgs[k:]
    expected = "after the system messages, user and assistant messages in turn, the last one the user's"
    if not turns:
        raise err(path, n, "key 'prompt' has no user message", expected)
    for i, m in enumerate(turns):
        want = chat_format.USER if (len(turns) - 1 - i) % 2 == 0 else chat_format.ASSISTANT
        if m["role"] != want:
            raise err(path, n, f"key 'prompt': message {k + i + 1} has role {m['role']!r} where {want!r} belongs",
                      expected)
    return system, turns


def persona_of_system(system: list[dict]) -> list[str]:
    """The persona sentences a conversational prompt's system messages hold (see the module doc)."""
    out = []
    for m in system:
        for line in m["content"].splitlines():
            s = line[_NUMBERING.match(line).end():].strip()
            if s:
                out.append(s)
    return out


def _conversation_row(obj, path, n, labeler, render: str) -> dict:
    _check_keys(obj, path, n, CONVERSATION_KEYS, "conversational")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise err(path, n, f"missing key {key!r}", f"a conversational pair {CONVERSATION_FORM}")
    system, turns = _conversation(obj, path, n)
    chosen, rejected = _reply(obj["chosen"], path, n, "chosen"), _reply(obj["rejected"], path, n, "rejected")
    dialogue = read_id(obj, path, n, "dialogue_id")
    if render == CHAT:
        group = system or turns  # the persona (system) when there is one, else the whole prompt
        return {"id": _split_id(obj, n, dialogue, group), "format": CHAT, "messages": system + turns,
                "persona": [], "history": [m["content"] for m in turns], "persona_label": None,
                "kind": "generate", "chosen": chosen, "rejected": rejected, "source": f"{path}:{n}"}
    persona = persona_of_system(system)
    if not persona:
        raise err(path, n, "key 'prompt' has no system message holding a persona",
                  "a first message {\"role\": \"system\", \"content\": <the persona, one sentence a line>}: the "
                  "Stage 1 model has no chat template, so the pair is rendered with pal_jax's plain template, "
                  "which needs the persona (or give the pair in the persona form)")
    history = [" ".join(m["content"].split()) for m in turns]
    label = _label(labeler, persona, chosen, path, n) if labeler is not None else None
    return {"id": _split_id(obj, n, dialogue, persona), "persona": persona, "history": history,
            "persona_label": label, "kind": "generate", "chosen": chosen, "rejected": rejected,
            "source": f"{path}:{n}"}


def _chat_render(chat_template, path, n) -> str:
    """CHAT or PLAIN for conversational pairs, from the Stage 1 model's chat template (module doc)."""
    template = chat_template() if callable(chat_template) else chat_template
    if not template:
        return PLAIN
    if chat_format.is_chatml(template):
        return CHAT
    raise err(path, n, f"key 'prompt' holds a conversation, and the Stage 1 model's chat template is not ChatML "
                       f"({template[:80]!r}...; pal_jax renders ChatML only)",
              f"the pair in the persona form {PERSONA_FORM}")


def read_preferences(path, labeler=None, chat_template=None) -> list[dict]:
    """The pairs of a preference JSONL file (module doc), each a dict with id, persona, history, persona_label,
    kind, chosen, rejected, source ("path:line"), and, for a conversational pair rendered with a ChatML template,
    format "chat" and messages (the prompt). labeler: data.labeler's labeler for generate pairs without a
    persona_label (None: left None, i.e. no persona highlighted). chat_template: the Stage 1 model's chat template
    text, None, or a function returning it (called once, at the first conversational pair)."""
    path = os.fspath(path)
    rows: list[dict] = []
    render = None
    counts = {"persona": 0, "conversational": 0}
    for n, obj in json_objects(path, KIND):
        if "persona" in obj and "prompt" in obj:
            raise err(path, n, "both keys 'persona' and 'prompt'", f"one form: {PERSONA_FORM} or {CONVERSATION_FORM}")
        if "prompt" in obj:
            if render is None:
                render = _chat_render(chat_template, path, n)
            rows.append(_conversation_row(obj, path, n, labeler, render))
            counts["conversational"] += 1
        elif "persona" in obj:
            rows.append(_persona_row(obj, path, n, labeler))
            counts["persona"] += 1
        else:
            keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
            raise err(path, n, f"a JSON object matching neither preference form (keys: {keys})",
                      f"the persona form {PERSONA_FORM} or the conversational form {CONVERSATION_FORM}")
    if not rows:
        raise err(path, 1, "no pairs found", KIND)
    if counts["conversational"]:
        how = ("the model's ChatML chat template" if render == CHAT else
               "pal_jax's plain template, the system message as the persona (the model has no chat template)")
        logging.info("pairs: %s: %d persona-form pairs, %d conversational pairs rendered with %s", path,
                     counts["persona"], counts["conversational"], how)
    return rows


def prompt_parts(row: dict) -> PromptParts:
    """The prompt of a pair read by read_preferences, in parts (the oldest history goes first when too long)."""
    if row.get("format") == CHAT:
        msgs = row["messages"]
        k = next((i for i, m in enumerate(msgs) if m["role"] != chat_format.SYSTEM), len(msgs))
        return PromptParts(head="".join(chat_format.message(m["role"], m["content"]) for m in msgs[:k]),
                           history=[chat_format.message(m["role"], m["content"]) for m in msgs[k:]],
                           tail=chat_format.header())
    persona, history, label = row["persona"], row["history"], row["persona_label"]
    if row.get("kind", "generate") == "select":
        return templates.select_prompt(persona, history)
    return templates.generate_prompt(persona, history, persona[label] if label is not None and label >= 0 else None)


def reply_end(row: dict, tokenizer) -> list[int]:
    """The token that ends a reply: <|im_end|> for a pair rendered as ChatML (where decoding in the chat format
    stops), the tokenizer's eos otherwise."""
    if row.get("format") != CHAT:
        return [tokenizer.eos_id]
    i = tokenizer.tok.token_to_id(chat_format.IM_END)
    if i is None:
        raise DataError(f"{row.get('source', '')}: a conversational pair rendered as ChatML, but the tokenizer "
                        f"({tokenizer.source or 'given'}) has no single {chat_format.IM_END} token; expected the "
                        f"tokenizer of the model whose chat template it is, or the pair in the persona form")
    return [int(i)]
