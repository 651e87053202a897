"""Bring your own data: Stage 1 from JSONL (data.source=jsonl) and Stage 2 from preference JSONL (stage2.pairs) in
the persona form or TRL's conversational form; every malformed line named by file, line and key."""
from __future__ import annotations

import json

import pytest

from helpers import tiny_config
from pal_jax.training import make_pairs as pairs_lib
from pal_jax.training import stage2
from pal_jax.model import tokenizer as tok_lib
from pal_jax.core.errors import ConfigError
from pal_jax.config import validate
from pal_jax.data import chat_format, convai2, corpus, labels, pipeline, preferences, synthetic, templates
from pal_jax.data.convai2 import DataError

PERSONAS = [["i am a nurse.", "i have two dogs."], ["i love hiking.", "i drive a red car."],
            ["i play the violin.", "i live in paris."], ["i am a chef.", "i hate rain."]]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _jsonl(tmp_path, rows, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(p)


def _raises(fn, path, line, *words):
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    for w in words:
        assert w in msg, msg
    return msg


# -- Stage 1 from JSONL ---------------------------------------------------------------------------------------------

def _stage1_rows(with_id=True):
    rows = []
    for d, persona in enumerate(PERSONAS * 3):  # 12 dialogues of 2 turns
        for t in range(2):
            row = {"persona": persona, "history": ["hi !", "hello .", f"what do you do ? ({t})"][t:],
                   "response": f"well , {persona[t][2:]}"}
            if with_id:
                row["dialogue_id"] = f"d{d}"
            if t == 0:
                row["persona_label"] = 0  # given: kept
            elif d % 2:
                row["persona_label"] = -1  # none: kept; else absent: the labeler fills it
            rows.append(row)
    return rows


def test_stage1_jsonl_splits_by_dialogue_id_and_labels_the_rest(tmp_path):
    path = _jsonl(tmp_path, _stage1_rows())
    c = tiny_config(data__source="jsonl", data__path=path, data__dev_fraction=0.25, data__test_fraction=0.25)
    validate(c)
    splits = corpus.load_corpus(c.data)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "dev": 3, "test": 3}
    every = [d for v in splits.values() for d in v]
    assert sum(len(d.turns) for d in every) == 24 and all(len(d.turns) == 2 for d in every)
    assert len({d.source for d in every}) == 12  # no dialogue split across parts
    d = every[0]
    line = int(d.source.rsplit(":", 1)[1])
    want = _stage1_rows()[line - 1: line + 1]
    assert d.persona == want[0]["persona"]
    assert [d.history(i) for i in range(2)] == [w["history"] for w in want]  # each row keeps its own history
    assert [t.response for t in d.turns] == [w["response"] for w in want]
    labelled = {(tuple(d.persona), t.response): t.persona_label for d in every for t in d.turns}
    for r in _stage1_rows():
        got = labelled[(tuple(r["persona"]), r["response"])]
        want_label = r.get("persona_label", labels.OverlapLabeler()(r["persona"], r["response"]))
        assert got == want_label
    assert sorted({t.persona_label for d in every for t in d.turns}) == [-1, 0, 1]  # 1: from the labeler
    ex = pipeline.stage1_examples(splits["train"][:1])
    assert "user: hi !\n" in ex[0].prompt.text() and ex[1].target == splits["train"][0].turns[0].response


def test_stage1_jsonl_without_dialogue_id_groups_rows_by_persona(tmp_path):
    path = _jsonl(tmp_path, _stage1_rows(with_id=False))
    dialogues = convai2.read_jsonl_dialogues(path)
    assert len(dialogues) == 4 and all(len(d.turns) == 6 for d in dialogues)  # one dialogue per persona
    # the project's own records round-trip: write_jsonl(records) is a Stage 1 source with the same dialogues
    syn = synthetic.generate_corpus(5, 1)
    p2 = str(tmp_path / "syn.jsonl")
    convai2.write_jsonl(convai2.records_from_dialogues(syn), p2)
    back = convai2.read_jsonl_dialogues(p2)
    assert [(d.persona, [d.history(i) for i in range(len(d.turns))], [(t.response, t.persona_label) for t in d.turns])
            for d in back] == [(d.persona, [d.history(i) for i in range(len(d.turns))],
                                [(t.response, t.persona_label) for t in d.turns]) for d in syn]


def test_stage1_jsonl_errors_name_file_line_and_key(tmp_path):
    good = {"persona": ["i am a nurse."], "history": ["hi"], "response": "i am a nurse .", "dialogue_id": 1}
    cases = [
        ([good, {k: v for k, v in good.items() if k != "response"}], 2, "missing key 'response'"),
        ([good, dict(good, response="  ")], 2, "key 'response' is '  '", "non-empty string"),
        ([good, dict(good, persona_label=3)], 2, "key 'persona_label' is 3", "[-1, 0]"),
        ([good, {k: v for k, v in good.items() if k != "dialogue_id"}], 2, "missing key 'dialogue_id'",
         f"as {tmp_path / 'bad.jsonl'}:1 has one"),
        ([good, dict(good, persona=["i am a chef."])], 2, "key 'persona' differs", "'dialogue_id' 1"),
        ([good, dict(good, dialogue_id=[1])], 2, "key 'dialogue_id' is list"),
        ([good, dict(good, label=0)], 2, "unknown key 'label'"),
        ([good, '{"persona": '], 2, "invalid JSON"),
    ]
    for rows, line, *words in cases:
        path = _jsonl(tmp_path, rows, "bad.jsonl")
        _raises(lambda: convai2.read_jsonl_dialogues(path), path, line, *words)
    with pytest.raises(ConfigError, match=r"config\.data\.path = '': expected the path of a JSONL file"):
        validate(tiny_config(data__source="jsonl"))


# -- Stage 2 from preference JSONL ----------------------------------------------------------------------------------

def test_persona_form_pairs_are_validated_labelled_and_keep_make_pairs_ids(tmp_path):
    rows = [{"persona": PERSONAS[0], "history": ["what do you do ?"], "chosen": "i am a nurse .",
             "rejected": "i like pizza ."},  # no label: the labeler finds sentence 0
            {"persona": PERSONAS[0], "history": ["hi"], "chosen": "hello .", "rejected": "go away .",
             "persona_label": -1, "dialogue_id": 17},
            {"id": "7:2", "persona": PERSONAS[1], "history": ["hi"], "persona_label": 1, "kind": "select",
             "chosen": templates.select_target(PERSONAS[1], 1), "rejected": templates.NONE_PERSONA}]
    path = _jsonl(tmp_path, rows)
    got = pairs_lib.read_pairs(path, labeler=labels.get_labeler("overlap"))
    assert len(got) == 3
    assert [r["persona_label"] for r in got] == [0, -1, 1] and [r["kind"] for r in got] == ["generate",
                                                                                         "generate", "select"]
    assert got[0]["persona"] == PERSONAS[0] and got[0]["history"] == ["what do you do ?"]
    assert (got[0]["chosen"], got[0]["rejected"]) == ("i am a nurse .", "i like pizza .")
    # ids for the held-out split: make_pairs' own id kept, a dialogue_id as it is, else a hash of the persona
    assert got[2]["id"] == "7:2" and got[1]["id"] == "17:2" and got[0]["id"].endswith(":1")
    assert got[0]["id"].split(":")[0].isdigit() and got[0]["id"] != got[1]["id"]
    assert preferences.prompt_parts(got[0]).text() == templates.generate_prompt(
        PERSONAS[0], ["what do you do ?"], PERSONAS[0][0]).text()
    assert preferences.prompt_parts(got[2]).text() == templates.select_prompt(PERSONAS[1], ["hi"]).text()


def _conversation(persona, turns, chosen, rejected, **extra):
    system = [{"role": "system", "content": "\n".join(f"{k}. {s}" for k, s in enumerate(persona, 1))}]
    msgs = [{"role": "user" if (len(turns) - 1 - i) % 2 == 0 else "assistant", "content": u}
            for i, u in enumerate(turns)]
    return {"prompt": system + msgs, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **extra}


def test_conversational_pairs_without_a_chat_template_become_persona_pairs(tmp_path):
    rows = [_conversation(PERSONAS[0], ["hi !", "hello .", "do you have pets ?"], "yes , two dogs .", "no ."),
            _conversation(PERSONAS[1], ["hi"], "hi , i just came back from hiking .", "hello .")]
    path = _jsonl(tmp_path, rows)
    asked = []
    got = pairs_lib.read_pairs(path, labeler=labels.get_labeler("overlap"),
                               chat_template=lambda: asked.append(1))  # the tiny model: no template (None)
    assert asked == [1]  # looked up once, at the first conversational line
    assert [r["persona"] for r in got] == PERSONAS[:2]  # the system message, numbering dropped
    assert got[0]["history"] == ["hi !", "hello .", "do you have pets ?"]
    assert [r["persona_label"] for r in got] == [1, 0] and got[0]["chosen"] == "yes , two dogs ."
    assert preferences.prompt_parts(got[0]).text() == templates.generate_prompt(
        PERSONAS[0], got[0]["history"], PERSONAS[0][1]).text()
    # a persona-form file never asks for the template
    p2 = _jsonl(tmp_path, [{"persona": ["a."], "history": ["b"], "chosen": "c", "rejected": "d"}], "p.jsonl")
    pairs_lib.read_pairs(p2, chat_template=lambda: pytest.fail("template read for a persona-form file"))


def test_conversational_pairs_render_with_a_chatml_template(tmp_path):
    row = _conversation(PERSONAS[0], ["hi !", "hello .", "do you have pets ?"], "yes , two dogs .", "no .")
    row["prompt"][0]["content"] = "You are a nurse.\nYou have two dogs."
    path = _jsonl(tmp_path, [row])
    got = pairs_lib.read_pairs(path, labeler=labels.get_labeler("overlap"), chat_template=CHATML)
    assert got[0]["format"] == "chat" and got[0]["messages"] == row["prompt"]
    parts = preferences.prompt_parts(got[0])
    assert parts.text() == chat_format.render(row["prompt"])  # verbatim, with the assistant header at the end
    assert parts.head == chat_format.message("system", "You are a nurse.\nYou have two dogs.")
    texts = [parts.text(), "yes , two dogs .", "no ."] * 5 + list(templates.FIXED_TEXTS)
    tok = tok_lib.train_tokenizer(texts, 300)
    with pytest.raises(DataError, match=rf"{path}:1: .*no single <\|im_end\|> token"):
        stage2.encode_pairs(got, tok, 512)
    tok.tok.add_special_tokens([chat_format.IM_START, chat_format.IM_END])
    enc = stage2.encode_pairs(got, tok, 512)
    im_end = tok.tok.token_to_id(chat_format.IM_END)
    assert tok.decode(enc.prompt[0]) == parts.text()
    assert enc.chosen[0] == tok.encode("yes , two dogs .") + [im_end]  # the reply ends where chat decoding stops
    assert enc.rejected[0][-1] == im_end and enc.head_len[0] == len(tok.encode(parts.head))


def test_malformed_pair_lines_name_file_line_and_key(tmp_path):
    good = {"persona": ["i am a nurse."], "history": ["hi"], "chosen": "a", "rejected": "b"}
    conv = _conversation(["i am a nurse."], ["hi"], "a", "b")
    bad_role = json.loads(json.dumps(conv))
    bad_role["prompt"][1]["role"] = "assistant"
    no_content = json.loads(json.dumps(conv))
    del no_content["prompt"][1]["content"]
    cases = [
        ({"history": ["hi"], "chosen": "a", "rejected": "b"}, None, "matching neither preference form",
         "'history'"),
        (dict(good, prompt=conv["prompt"]), None, "both keys 'persona' and 'prompt'"),
        ({k: v for k, v in good.items() if k != "rejected"}, None, "missing key 'rejected'"),
        (dict(good, chosen=[{"role": "assistant", "content": "a"}]), None, "key 'chosen' is list",
         "the conversational form"),
        (dict(good, kind="select"), None, "missing key 'persona_label' in a select pair"),
        (dict(good, kind="judge"), None, "key 'kind' is 'judge'"),
        (dict(good, score=1), None, "unknown key 'score'"),
        (dict(conv, chosen="a"), None, "key 'chosen' is a string in a conversational pair"),
        (dict(conv, rejected=conv["rejected"] * 2), None, "key 'rejected' holds 2 message(s)"),
        (bad_role, None, "key 'prompt': message 2 has role 'assistant' where 'user' belongs"),
        (no_content, None, "key 'prompt': message 2 is"),
        (dict(conv, prompt=conv["prompt"][1:]), None, "key 'prompt' has no system message holding a persona"),
        (dict(conv, prompt="hi"), None, "key 'prompt' is str", "TRL's standard form"),
        (conv, "{% for m in messages %}[INST] {{ m['content'] }}{% endfor %}", "not ChatML",
         "the persona form"),
    ]
    for obj, template, *words in cases:
        path = _jsonl(tmp_path, [good, obj], "bad.jsonl")
        _raises(lambda: pairs_lib.read_pairs(path, chat_template=template), path, 2, *words)


def test_empty_and_too_long_replies_are_dropped_and_counted(tmp_path):
    base = {"persona": PERSONAS[0], "history": ["what do you do ?"], "persona_label": 0}
    rows = [dict(base, chosen="i am a nurse .", rejected="i like pizza ."),
            dict(base, chosen="", rejected="i like pizza ."),
            dict(base, chosen="i am a nurse .", rejected="   "),
            dict(base, chosen="i am a nurse . " * 40, rejected="no ."),
            dict(base, chosen="i have two dogs .", rejected="hello .")]
    got = pairs_lib.read_pairs(_jsonl(tmp_path, rows))
    tok = tok_lib.train_tokenizer([r["chosen"] + " " + r["rejected"] for r in rows] * 3
                                  + list(templates.FIXED_TEXTS) * 5 + PERSONAS[0], 300)
    enc = stage2.encode_pairs(got, tok, 64)
    assert (enc.n_dropped, enc.n_empty) == (3, 2) and len(enc.prompt) == 2
    assert [tok.decode(c) for c in enc.chosen] == ["i am a nurse .", "i have two dogs ."]
    assert all(len(p) + max(len(c), len(j)) <= 64 for p, c, j in zip(enc.prompt, enc.chosen, enc.rejected))
