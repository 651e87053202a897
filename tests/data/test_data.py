"""pal_jax.data: ConvAI2/JSONL readers, the synthetic corpus, labels, templates and the batch pipeline."""
import collections
import json

import numpy as np
import pytest

from pal_jax.model import tokenizer as T
from pal_jax.data import convai2, labels, pipeline, synthetic, templates
from pal_jax.data.convai2 import DataError, Dialogue, Turn


def write(tmp_path, text, name="d.txt", binary=False):
    p = tmp_path / name
    if binary:
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------------ ConvAI2 reader
GOOD = (
    "1 your persona: i like to ski.\n"
    "2 your persona: i have two dogs.\n"
    "3 partner's persona: i am a nurse.\n"
    "4 hi , how are you ?\tgood , just back from skiing .\t\tno thanks|good , just back from skiing .\n"
    "5 do you have pets ?\tyes , two dogs .\t\tsure|yes , two dogs .\n"
    "1 your persona: i am a chef.\n"
    "2 hello\thi there , i cook for a living .\n"
)


def test_read_small_file_both_personas_with_and_without_candidates(tmp_path):
    ds = convai2.read_convai2(write(tmp_path, GOOD))
    assert len(ds) == 2
    a, b = ds
    assert a.persona == ["i like to ski.", "i have two dogs."]
    assert a.partner_persona == ["i am a nurse."]
    assert a.turns[0] == Turn("hi , how are you ?", "good , just back from skiing .",
                              ["no thanks", "good , just back from skiing ."], None)
    assert a.source.endswith("d.txt:1") and b.source.endswith("d.txt:6")
    assert (a.dialogue_id, b.dialogue_id) == (0, 1)
    assert b.turns == [Turn("hello", "hi there , i cook for a living .", None, None)]
    assert a.history(1) == ["hi , how are you ?", "good , just back from skiing .", "do you have pets ?"]


def test_crlf_and_trailing_blank_lines(tmp_path):
    ds = convai2.read_convai2(write(tmp_path, GOOD.replace("\n", "\r\n") + "\r\n\r\n"))
    assert [len(d.turns) for d in ds] == [2, 1] and ds[1].turns[0].response == "hi there , i cook for a living ."


@pytest.mark.parametrize("text, line, message", [
    ("", 1, "file is empty; expected a ConvAI2 text file"),
    ("1 your persona: a.\nno number here\tx\n", 2, "does not start with a line number"),
    ("1 your persona: a.\n2 hello there\n", 2, "no tab between utterance and response"),
    ("1 your persona: a.\n3 hi\tho\n", 2, "line number 3 out of sequence (previous line number 1); expected 2"),
    ("2 your persona: a.\n", 1, "line number 2 out of sequence (previous line number 0)"),
    ("1 your persona: a.\n2 hi\tho\n3 your persona: b.\n", 3, "persona line after the dialogue's first turn"),
    ("1 your persona: a.\n2 hi\t \n", 2, "empty response"),
    ("1 your persona: a.\n2 hi\tho\tx\n", 2, "content after the response in the wrong place"),
])
def test_malformed_lines_name_file_and_line(tmp_path, text, line, message):
    p = write(tmp_path, text)
    with pytest.raises(DataError) as e:
        convai2.read_convai2(p)
    assert str(e.value).startswith(f"{p}:{line}: ")
    assert message in str(e.value)


def test_dialogue_without_persona_and_without_turns(tmp_path):
    p = write(tmp_path, "1 your persona: a.\n2 hi\tho\n1 hello\tthere\n2 bye\tbye\n")
    with pytest.raises(DataError, match=rf"{p}:3: dialogue 1 has no 'your persona:' line; expected at least one"):
        convai2.read_convai2(p)
    p = write(tmp_path, "1 your persona: a.\n1 your persona: b.\n2 hi\tho\n", name="e.txt")
    with pytest.raises(DataError, match=rf"{p}:1: dialogue 0 has no turns"):
        convai2.read_convai2(p)


def test_missing_path_and_bad_bytes(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.txt:0: no such file; expected a ConvAI2 text file"):
        convai2.read_convai2(tmp_path / "nope.txt")
    with pytest.raises(DataError):
        convai2.read_convai2(tmp_path / "nope.txt")
    p = write(tmp_path, b"1 your persona: a.\n2 hi\tho\n3 caf\xe9\tx\n", binary=True)
    with pytest.raises(DataError) as e:
        convai2.read_convai2(p)
    assert str(e.value) == f"{p}:3: bytes b'\\xe9\\tx' at column 6 are not UTF-8; expected UTF-8 text"


def test_real_convai2(convai2_dir):
    plain = convai2.read_convai2(convai2_dir / "valid_self_original_no_cands.txt")
    cands = convai2.read_convai2(convai2_dir / "valid_self_original.txt")
    assert len(plain) == len(cands) == 1000
    assert sum(len(d.turns) for d in plain) == 7801
    assert collections.Counter(len(d.turns) for d in plain) == {7: 233, 8: 745, 9: 15, 10: 5, 12: 1, 13: 1}
    assert collections.Counter(len(d.persona) for d in plain) == {4: 517, 5: 483}
    assert all(not d.partner_persona for d in plain)
    assert plain[0].persona[0] == "i read twenty books a year."
    assert plain[0].turns[0].partner == "hello what are doing today ?"
    for a, b in zip(plain, cands):
        assert a.persona == b.persona
        for x, y in zip(a.turns, b.turns):
            assert x.candidates is None and (x.partner, x.response) == (y.partner, y.response)
            assert len(y.candidates) == 20 and y.candidates[-1] == y.response
    assert plain[999].source.endswith("valid_self_original_no_cands.txt:" + str(sum(
        len(d.persona) + len(d.turns) for d in plain[:999]) + 1))


# ------------------------------------------------------------------------------------------------ JSONL
def test_cr_only_line_endings_named(tmp_path):
    p = write(tmp_path, GOOD.replace("\n", "\r"))
    with pytest.raises(DataError) as e:
        convai2.read_convai2(p)
    assert str(e.value).startswith(f"{p}:1: the line endings are CR only (old Mac style: 7 CR, no LF); expected ")
    assert "with LF or CRLF line endings" in str(e.value)


def test_overlong_line_refused_naming_its_line(tmp_path):
    p = write(tmp_path, "1 your persona: a.\n2 hi\t" + "x" * (convai2.MAX_LINE_BYTES + 1) + "\n")
    with pytest.raises(DataError, match=rf"{p}:2: line of 100,006 bytes; expected a ConvAI2 .*lines of at most "
                                        r"100,000 bytes"):
        convai2.read_convai2(p)
    line = json.dumps({"persona": ["a."], "history": ["y" * convai2.MAX_LINE_BYTES]})
    q = write(tmp_path, line + "\n", name="q.jsonl")
    with pytest.raises(DataError, match=rf"{q}:1: line of {len(line):,} bytes; expected a JSONL file"):
        convai2.read_jsonl(q)


def test_prediction_input_format_told_by_content(tmp_path):
    """A JSONL file named .json or .JSONL is read as JSONL; ConvAI2 text named .jsonl as ConvAI2."""
    from helpers import tiny_config

    from pal_jax.data import records as records_lib
    line = json.dumps({"persona": ["i am a nurse."], "history": ["hi", "hello", "what do you do ?"]}) + "\n"
    for name in ("in.json", "in.JSONL", "in.jsonl"):
        p = write(tmp_path, "\ufeff" + line + line, name=name)
        assert convai2.looks_like_jsonl(p)
        records, origin = records_lib.load_records(tiny_config(predict__input=str(p)))
        assert origin == str(p) and len(records) == 2 and records[0].history[-1] == "what do you do ?"
    p = write(tmp_path, GOOD, name="convai2.jsonl")
    assert not convai2.looks_like_jsonl(p) and not convai2.looks_like_jsonl(tmp_path / "missing")
    records, _ = records_lib.load_records(tiny_config(predict__input=str(p)))
    assert len(records) == 3 and records[0].persona == ("i like to ski.", "i have two dogs.")


def test_corpus_too_small_to_split_is_a_data_error():
    from pal_jax.data import corpus
    with pytest.raises(DataError, match=r"data split 'dev' is empty: 10 dialogues with dev_fraction=0.04"):
        corpus.split_dialogues(list(range(10)), 0.04, 0.0, 0)


def test_cli_data_errors_are_one_line_with_exit_2(tmp_path):
    """Data errors reach the user as 'error: <file:line: message>' and exit 2, without a traceback unless
    --traceback is given."""
    import subprocess

    from helpers import REPO, main_cmd, run_main
    bad = write(tmp_path, "1 your persona: a.\n2 hi\tho\nthree\tx\n", name="bad.txt")
    r = run_main(tmp_path / "w1", {"data.source": "convai2", "data.path": str(bad)})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (f"error: {bad}:3: line does not start with a line number: "
                                                 "'three\\tx'; expected 'N your persona: ...' or 'N <partner "
                                                 "utterance><TAB><own response>[<TAB><TAB>cand1|cand2|...]'")
    assert "Traceback" not in r.stderr
    jl = write(tmp_path, json.dumps({"persona": ["a."], "history": "hi"}) + "\n", name="in.json")
    r = run_main(tmp_path / "w2", {"predict.input": str(jl)}, config="configs/predict.py:tiny")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {jl}:1: key 'history' is str")
    assert "Traceback" not in r.stderr
    cmd, env = main_cmd(tmp_path / "w3", {"data.synthetic_dialogues": 10, "data.dev_fraction": 0.04})
    r = subprocess.run(cmd + ["--traceback"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: data split 'dev' is empty: 10 dialogues")
    assert "Traceback (most recent call last)" in r.stderr and "split_dialogues" in r.stderr


def test_jsonl_round_trip_and_errors(tmp_path):
    d = synthetic.generate_corpus(3, 5)
    recs = convai2.records_from_dialogues(d)
    p = tmp_path / "r.jsonl"
    convai2.write_jsonl(recs, p)
    back = convai2.read_jsonl(p)
    assert len(back) == sum(len(x.turns) for x in d)
    assert [(r.persona, r.history, r.response, r.persona_label, r.id) for r in back] == \
        [(r.persona, r.history, r.response, r.persona_label, r.id) for r in recs]
    assert back[1].source == f"{p}:2" and back[1].history[-1] == d[0].turns[1].partner

    good = json.dumps({"persona": ["i am a nurse."], "history": ["hi"]})
    cases = [
        (good + "\n{oops\n", 2, "invalid JSON at column 2"),
        ("[1, 2]\n", 1, "a JSON list; expected a JSON object"),
        (json.dumps({"persona": ["a."]}) + "\n", 1, "missing key 'history'"),
        (json.dumps({"persona": [], "history": ["x"]}) + "\n", 1, "key 'persona' is an empty list"),
        (json.dumps({"persona": ["a."], "history": "hi"}) + "\n", 1, "key 'history' is str"),
        (json.dumps({"persona": ["a."], "history": ["hi"], "persona_label": 1}) + "\n", 1,
         "key 'persona_label' is 1; expected null or an integer in [-1, 0]"),
        (json.dumps({"persona": ["a."], "history": ["hi"], "labels": 1}) + "\n", 1, "unknown key 'labels'"),
        ("\n\n", 1, "file is empty"),
    ]
    for text, line, msg in cases:
        q = write(tmp_path, text, name="bad.jsonl")
        with pytest.raises(DataError) as e:
            convai2.read_jsonl(q)
        assert str(e.value).startswith(f"{q}:{line}: ") and msg in str(e.value), str(e.value)
    q = write(tmp_path, (good + "\n").encode() + b'{"persona": ["\xff"]}\n', name="b.jsonl", binary=True)
    with pytest.raises(DataError, match=rf"{q}:2: bytes b'\\xff.*are not UTF-8"):
        convai2.read_jsonl(q)


# ------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_deterministic_and_seeded():
    a = synthetic.generate_corpus(40, 7)
    assert a == synthetic.generate_corpus(40, 7)
    assert synthetic.generate_corpus(10, 7) == a[:10]
    assert a != synthetic.generate_corpus(40, 8)


def test_synthetic_facts_and_keywords():
    facts = synthetic.FACTS
    assert len({f.sentence for f in facts}) == len(facts) == 219
    assert len(synthetic.ATTRIBUTES) == 16 and min(len(v) for v in synthetic.FACTS_BY_ATTRIBUTE.values()) >= 12
    generic = [g for a in synthetic.ATTRIBUTES for g in a.generic] + [r for _, r in synthetic.CHITCHAT]
    for f in facts:
        for core in f.cores:  # every paraphrase names its fact ...
            assert all(synthetic.mentions(core, k) for k in f.keywords), (f, core)
        for g in facts:  # ... and no other fact
            if g is not f:
                assert not any(synthetic.mentions(t, k) for k in g.keywords for t in (f.sentence,) + f.cores)
        assert not any(synthetic.mentions(t, k) for k in f.keywords for t in generic)
    # each question names exactly one attribute
    owner = collections.Counter(q for a in synthetic.ATTRIBUTES for q in a.questions)
    assert max(owner.values()) == 1


def test_synthetic_dialogues_and_labels():
    ds = synthetic.generate_corpus(300, 1)
    q_attr = {q: a.name for a in synthetic.ATTRIBUTES for q in a.questions}
    n_persona = n_turns = 0
    for d in ds:
        facts = [synthetic.FACT_BY_SENTENCE[s] for s in d.persona]
        assert 3 <= len(facts) <= 5 and len({f.attribute for f in facts}) == len(facts)  # no conflicts
        assert 4 <= len(d.turns) <= 8
        for t in d.turns:
            n_turns += 1
            question = next((q for q in q_attr if t.partner.endswith(q)), None)
            if t.persona_label >= 0:
                n_persona += 1
                f = facts[t.persona_label]
                assert all(synthetic.mentions(t.response, k) for k in f.keywords), (f, t)
                assert q_attr[question] == f.attribute  # the question names the labelled fact's attribute
                others = [g for g in facts if g is not f]
            else:
                assert t.persona_label == -1
                others = facts
                if question is not None:  # off-persona question: the persona has no fact of that attribute
                    assert q_attr[question] not in {f.attribute for f in facts}
            assert not any(synthetic.mentions(t.response, k) for g in others for k in g.keywords), t
    assert 0.55 <= n_persona / n_turns <= 0.67


# ------------------------------------------------------------------------------------------------ labels
def test_content_words():
    assert labels.content_words("I'm a Stunt-double, and I LOVE my dogs!") == {"stunt", "double", "dog"}
    assert labels.content_words("the stories of glasses") == {"story", "glass"}


def test_overlap_labeler_hand_cases():
    persona = ["i have two dogs.", "i like to ski in the alps.", "i work as a nurse."]
    lab = labels.OverlapLabeler()
    assert lab(persona, "my dogs are the best !") == 0
    assert lab(persona, "i went to ski last week in the alps") == 1
    assert lab(persona, "i am a nurse at the hospital .") == 2
    assert lab(persona, "hello , how are you today ?") == -1
    assert lab(persona, "i work a lot , i like it .") == -1  # 'work' and 'like' are not content words
    assert lab([], "anything") == -1
    assert labels.OverlapLabeler(2)(persona, "my dogs are the best !") == -1
    assert labels.OverlapLabeler(2)(persona, "skiing ? i ski in the alps every winter") == 1
    # ties: the larger share of the sentence covered wins, then the lower index
    assert lab(["i love the beach and surfing and sun.", "i love the beach."], "the beach is nice") == 1
    assert lab(["i have a dog.", "my dog is old."], "dog") == 0


def test_registry_and_label_dialogues():
    assert isinstance(labels.get_labeler("overlap"), labels.OverlapLabeler)
    assert labels.get_labeler("overlap:3").threshold == 3
    with pytest.raises(ValueError, match=r"labeler 'nli': unknown name 'nli'; expected one of \['overlap'"):
        labels.get_labeler("nli")
    with pytest.raises(ValueError, match=r"argument 'x' is not an integer"):
        labels.get_labeler("overlap:x")
    d = Dialogue(["i have two dogs.", "i ski."], [], [Turn("hi", "my dogs are great", None, None),
                                                      Turn("ok", "my dogs are great", None, 1)], "x:1", 0)
    assert labels.label_dialogues([d], labels.OverlapLabeler()) == 1
    assert [t.persona_label for t in d.turns] == [0, 1]  # a set label is kept
    labels.register_labeler("always0", lambda: (lambda persona, response: 0))
    d.turns[0].persona_label = None
    labels.label_dialogues([d], labels.get_labeler("always0"))
    assert d.turns[0].persona_label == 0
    d.turns[0].persona_label = None
    with pytest.raises(ValueError, match=r"x:1: labeler .* returned 7 for turn 0; expected -1 or an index in \[0, 1\]"):
        labels.label_dialogues([d], lambda p, r: 7)


def test_label_distribution_on_real_convai2(convai2_dir):
    ds = convai2.read_convai2(convai2_dir / "valid_self_original_no_cands.txt")
    labels.label_dialogues(ds, labels.get_labeler("overlap"))
    assert labels.label_counts(ds) == {"persona": 3723, "none": 4078, "unknown": 0}
    assert collections.Counter(t.persona_label for d in ds for t in d.turns) == \
        {-1: 4078, 0: 885, 1: 852, 2: 825, 3: 782, 4: 379}
    # dialogue 0: "... i have two jobs ." <- "i'm a stunt double as my second job." (1); "i've read about 20 books
    # this year" <- "i read twenty books a year." (0); "i only have one parent ..." <- "... single parent household."
    assert [t.persona_label for t in ds[0].turns] == [1, 0, -1, -1, 1, 3, 3, -1]
    again = convai2.read_convai2(convai2_dir / "valid_self_original_no_cands.txt")
    labels.label_dialogues(again, labels.get_labeler("overlap:2"))
    assert labels.label_counts(again)["persona"] == 1590


# ------------------------------------------------------------------------------------------------ templates
def test_templates_text_and_parse():
    persona = ["i am a nurse.", "i have a dog."]
    history = ["hi , what do you do ?", "i am a nurse .", "do you have pets ?"]
    p = templates.select_prompt(persona, history)
    assert p.text() == ("persona:\n1. i am a nurse.\n2. i have a dog.\ndialogue:\n"
                        "user: hi , what do you do ?\nbot: i am a nurse .\nuser: do you have pets ?\n"
                        "persona sentence for the bot's next reply:\n")
    assert templates.history_lines(["a", "b"]) == ["bot: a\n", "user: b\n"]  # tagged from the end
    g = templates.generate_prompt(persona, history, persona[1])
    assert g.head == p.head and g.history == p.history
    assert g.tail == "persona to use: i have a dog.\nbot's reply:\n"
    assert templates.generate_prompt(persona, history, None).tail == \
        f"persona to use: {templates.NONE_PERSONA}\nbot's reply:\n"
    f = templates.persona_free_prompt(history)
    assert "persona" not in f.text() and f.text().endswith("user: do you have pets ?\nbot's reply:\n")
    assert templates.select_target(persona, 1) == "2.i have a dog."
    assert templates.select_target(persona, -1) == "No personal description."
    for k in (-1, 0, 1):
        assert templates.parse_select_target(templates.select_target(persona, k), persona) == k
    assert templates.parse_select_target(" 2. i have a dog.", persona) == 1
    assert templates.parse_select_target("i am a nurse.", persona) == 0
    assert templates.parse_select_target("3.something", persona) == -1
    assert templates.parse_select_target("gibberish", persona) == -1
    with pytest.raises(ValueError, match="persona label 2 out of range"):
        templates.select_target(persona, 2)


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def corpus():
    return synthetic.generate_corpus(120, 3)


@pytest.fixture(scope="module")
def tok(corpus):
    texts = [s for d in corpus for s in d.persona] + [u for d in corpus for t in d.turns for u in (t.partner,
                                                                                                  t.response)]
    return T.train_tokenizer(texts + list(templates.FIXED_TEXTS) * 20, 700)


@pytest.fixture(scope="module")
def encoded(corpus, tok):
    return pipeline.encode_examples(pipeline.stage1_examples(corpus), tok, 256)


def test_stage1_examples(corpus):
    ex = pipeline.stage1_examples(corpus[:2])
    assert len(ex) == 2 * sum(len(d.turns) for d in corpus[:2])
    d, t = corpus[0], corpus[0].turns[0]
    sel, gen = ex[0], ex[1]
    assert (sel.task, gen.task) == ("select", "generate")
    assert sel.target == templates.select_target(d.persona, t.persona_label)
    assert gen.target == t.response
    assert sel.meta == {"dialogue_id": 0, "turn": 0, "label": t.persona_label}
    bad = Dialogue(["a."], [], [Turn("hi", "ho", None, None)], "f:1", 0)
    with pytest.raises(ValueError, match="f:1: turn 0 of dialogue 0 has persona_label None"):
        pipeline.stage1_examples([bad])


def test_weights_exactly_on_target_tokens(corpus, tok, encoded):
    ex = pipeline.stage1_examples(corpus)
    src = pipeline.BatchSource(encoded, 8, (64, 128, 192, 256), seed=0)
    plan = src.epoch_batches(0)
    b = src.batch(0)
    for r, i in enumerate(plan[0]):
        w = b["weights"][r]
        on = np.flatnonzero(w)
        n = len(encoded.ids[i])
        assert set(np.unique(w)) <= {0.0, 1.0}
        assert on[0] == encoded.prompt_len[i] - 1 and on[-1] == n - 2 and len(on) == n - encoded.prompt_len[i]
        assert b["targets"][r, on[-1]] == tok.eos_id
        assert tok.decode(b["targets"][r, on]) == ex[encoded.index[i]].target
        assert tok.decode(b["inputs"][r, :on[0] + 1]) == ex[encoded.index[i]].prompt.text()
        assert (b["inputs"][r, n - 1:] == tok.pad_id).all()
        np.testing.assert_array_equal(b["targets"][r, :n - 2], b["inputs"][r, 1:n - 1])
    assert b["inputs"].dtype == np.int32 and b["weights"].dtype == np.float32 and b["task"].dtype == np.int32
    np.testing.assert_array_equal(b["positions"][3], np.arange(b["inputs"].shape[1]))
    np.testing.assert_array_equal(b["task"], encoded.task[plan[0]])
    # the loss window holds exactly the weighted positions, in order
    W = b["win_idx"].shape[1]
    assert W == src.window and W % 16 == 0 and W >= max(len(x) - p for x, p in zip(encoded.ids, encoded.prompt_len))
    for r in range(len(plan[0])):
        on = np.flatnonzero(b["weights"][r])
        won = np.flatnonzero(b["win_weights"][r])
        np.testing.assert_array_equal(b["win_idx"][r, won], on)
        np.testing.assert_array_equal(b["win_targets"][r, won], b["targets"][r, on])


def test_window_loss_equals_full_loss(encoded, tok):
    """Stage 1 loss with the LM head on the target window only equals the loss over every position."""
    import jax
    from flax import nnx
    from pal_jax.training import stage1
    from pal_jax.model.transformer import ModelConfig, Transformer
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      d_ff=64, max_len=256)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    b = pipeline.BatchSource(encoded, 8, (64, 128, 192, 256), seed=0).batch(1)
    full = {k: v for k, v in b.items() if not k.startswith("win_")}
    win = jax.jit(lambda m, x: stage1.sft_loss_fn(m, x, None))
    (n1, d1, m1), (n2, d2, m2) = win(model, b), win(model, full)
    assert float(d1) == float(d2) > 0
    assert abs(float(n1) - float(n2)) < 1e-4 * float(n2)
    for k in m1:
        assert abs(float(m1[k]) - float(m2[k])) < 1e-4 * max(1.0, abs(float(m2[k])))


def test_truncation_cuts_oldest_history_keeps_target(tok):
    persona = ["i am a nurse.", "i have a pet dog."]
    history = [f"line {k} : do you have any pets ? i want to know ." for k in range(12)]
    long_target = "yes , i have a dog named max ."
    ex = pipeline.Example("generate", templates.generate_prompt(persona, history, persona[1]), long_target, {})
    parts = ex.prompt
    head, tail = tok.encode(parts.head), tok.encode(parts.tail)
    lines = [tok.encode(h) for h in parts.history]
    target = tok.encode(long_target) + [tok.eos_id]
    full = len(head) + sum(map(len, lines)) + len(tail) + len(target)
    keep3 = len(head) + sum(map(len, lines[-3:])) + len(tail) + len(target)
    enc = pipeline.encode_examples([ex], tok, keep3)
    assert (enc.n_truncated, enc.n_dropped) == (1, 0)
    ids = enc.ids[0]
    assert list(ids) == head + lines[-3][:] + lines[-2] + lines[-1] + tail + target  # the 9 oldest lines went
    assert enc.prompt_len[0] == len(ids) - len(target)
    assert pipeline.encode_examples([ex], tok, full).n_truncated == 0
    # no history fits: the older lines go, the last line keeps its end, cut before the head; the tail and target
    # stay whole
    small = len(tail) + len(target) + 10
    enc = pipeline.encode_examples([ex], tok, small)
    assert len(lines[-1]) > 10 and enc.n_truncated == 1 and list(enc.ids[0]) == lines[-1][-10:] + tail + target
    # the target alone (plus a minimal prompt) does not fit: dropped, never cut
    enc = pipeline.encode_examples([ex, ex], tok, len(target) + pipeline.MIN_PROMPT - 1)
    assert (len(enc.ids), enc.n_dropped) == (0, 2)
    # encode_prompt (used by prediction) builds the same prompt ids
    assert pipeline.encode_prompt(parts, tok, keep3 - len(target)) == list(ids[:-len(target)])


def test_long_last_message_keeps_its_latest_words(tok):
    """A ~300-word last message over the budget: the older history goes first, then the start of the message;
    the persona block, the message's latest words and the cue stay, and every cut is counted."""
    persona = ["i am a nurse.", "i have a pet dog."]
    message = " ".join(f"word{k}" for k in range(300)) + " so what do you think about that ?"
    history = ["hi , how are you ?", "good , and you ?", message]
    parts = templates.generate_prompt(persona, history, persona[1])
    head, tail = tok.encode(parts.head), tok.encode(parts.tail)
    last = tok.encode(parts.history[-1])
    budget = 200
    assert len(head) + len(tail) + 40 < budget < len(last)
    ids, cuts = pipeline.encode_prompt_cuts(parts, tok, budget)
    room = budget - len(head) - len(tail)
    assert ids == head + last[-room:] + tail and len(ids) == budget
    assert (cuts.history_lines, cuts.last_line_tokens, cuts.head_tokens) == (2, len(last) - room, 0)
    assert tok.decode(ids).rstrip().endswith("word299 so what do you think about that ?\n" + parts.tail.strip())
    assert pipeline.encode_prompt(parts, tok, budget) == ids
    # a budget that leaves less than MIN_LAST_LINE tokens beside head and tail: the head's start is cut instead
    ids, cuts = pipeline.encode_prompt_cuts(parts, tok, len(head) + len(tail) + 4)
    assert ids[-len(tail) - pipeline.MIN_LAST_LINE:] == last[-pipeline.MIN_LAST_LINE:] + tail
    assert cuts.head_tokens == pipeline.MIN_LAST_LINE - 4 and ids[:len(head) - cuts.head_tokens] == \
        head[cuts.head_tokens:]
    # a prompt that fits is not cut
    ids, cuts = pipeline.encode_prompt_cuts(parts, tok, 10_000)
    assert not cuts and ids == head + sum((tok.encode(h) for h in parts.history), []) + tail


def test_batches_are_pure_and_resumable(encoded):
    a = pipeline.BatchSource(encoded, 16, (64, 128, 192, 256), seed=11, select_ratio=0.5)
    b = pipeline.BatchSource(encoded, 16, (64, 128, 192, 256), seed=11, select_ratio=0.5)
    spe = a.steps_per_epoch
    steps = [spe + 3, 0, 5, 2 * spe + 1, spe - 1, 5]
    for s in steps:  # any order: a fresh source gives the same batch for the same step
        x, y = a.batch(s), b.batch(s)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = pipeline.BatchSource(encoded, 16, (64, 128, 192, 256), seed=12, select_ratio=0.5)
    assert not np.array_equal(a.batch(0)["inputs"], c.batch(0)["inputs"]) or \
        a.batch(0)["inputs"].shape != c.batch(0)["inputs"].shape
    assert not all(np.array_equal(a.epoch_batches(0)[k], a.epoch_batches(1)[k]) for k in range(spe))


def test_epoch_covers_examples_without_repeats_and_buckets(encoded):
    B, buckets = 16, (64, 128, 192, 256)
    src = pipeline.BatchSource(encoded, B, buckets, seed=0)
    n = len(encoded.ids)
    assert src.steps_per_epoch == n // B
    rows = np.concatenate(src.epoch_batches(0))
    assert len(rows) == len(set(rows.tolist())) == src.steps_per_epoch * B  # no repeats; n % B left out
    lengths = np.array([len(x) - 1 for x in encoded.ids])
    shapes = set()
    for s in range(src.steps_per_epoch):
        b = src.batch(s)
        L = b["inputs"].shape[1]
        shapes.add(L)
        longest = lengths[src.epoch_batches(0)[s]].max()
        assert L in buckets and longest <= L and (L == buckets[0] or longest > buckets[buckets.index(L) - 1])
        assert b["inputs"].shape == (B, L)
    assert len(shapes) >= 2  # several buckets in use
    # the next epoch is a new permutation of the same examples
    assert set(np.concatenate(src.epoch_batches(1)).tolist()) != set(rows.tolist()) or n % B == 0


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_select_ratio(encoded, ratio):
    src = pipeline.BatchSource(encoded, 16, (64, 128, 192, 256), seed=4, select_ratio=ratio)
    for epoch in (0, 1):
        task = np.concatenate([src.batch(epoch * src.steps_per_epoch + s)["task"]
                               for s in range(src.steps_per_epoch)])
        assert abs(np.mean(task == 0) - ratio) < 0.02
    natural = pipeline.BatchSource(encoded, 16, (64, 128, 192, 256), seed=4)
    assert natural.epoch_size == len(encoded.ids)
    with pytest.raises(ValueError, match=r"select_ratio = 1.5; expected None or a fraction in \[0, 1\]"):
        pipeline.BatchSource(encoded, 16, (256,), seed=0, select_ratio=1.5)


def test_eval_batches_cover_every_example_once(encoded):
    src = pipeline.BatchSource(encoded, 16, (64, 128, 192, 256), seed=0)
    plan = src.eval_plan()
    rows = np.concatenate(plan)
    real = rows[rows >= 0]
    assert sorted(real.tolist()) == list(range(len(encoded.ids)))
    assert len(rows) - len(real) == (-len(encoded.ids)) % 16  # only the last batch is padded
    assert (plan[-1] < 0).sum() == len(rows) - len(real)
    batches = list(src.eval_batches())
    assert len(batches) == len(plan)
    total = sum(float(b["weights"].sum()) for b in batches)
    assert total == sum(len(x) - p for x, p in zip(encoded.ids, encoded.prompt_len))
    last = batches[-1]
    pad = plan[-1] < 0
    assert pad.any() and (last["weights"][pad] == 0).all() and (last["inputs"][pad] == encoded.pad_id).all()
    again = list(src.eval_batches())
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(batches, again))


def test_bucket_errors(encoded):
    with pytest.raises(ValueError, match=r"longer than the largest bucket 64; expected encode_examples with max_len"):
        pipeline.BatchSource(encoded, 8, (32, 64), seed=0)
    with pytest.raises(ValueError, match=r"buckets = \(128, 64\); expected strictly increasing"):
        pipeline.BatchSource(encoded, 8, (128, 64), seed=0)


def test_tiny_set_still_gives_a_batch(corpus, tok):
    enc = pipeline.encode_examples(pipeline.stage1_examples(corpus[:1])[:3], tok, 256)
    src = pipeline.BatchSource(enc, 8, (256,), seed=0)
    assert src.steps_per_epoch == 1 and src.batch(0)["inputs"].shape == (8, 256)
    empty = pipeline.BatchSource(pipeline.encode_examples([], tok, 256), 8, (256,), seed=0)
    assert list(empty.eval_batches()) == []
    with pytest.raises(ValueError, match="no examples for a training batch"):
        empty.batch(0)


def test_real_convai2_pipeline(convai2_dir):
    ds = convai2.read_convai2(convai2_dir / "valid_self_original_no_cands.txt")
    labels.label_dialogues(ds, labels.get_labeler("overlap"))
    texts = [s for d in ds for s in d.persona] + [u for d in ds for t in d.turns for u in (t.partner, t.response)]
    tok = T.train_tokenizer(texts + list(templates.FIXED_TEXTS) * 20, 2048)
    ex = pipeline.stage1_examples(ds)
    assert len(ex) == 2 * 7801
    full = pipeline.encode_examples(ex, tok, 4096)
    lengths = np.array([len(x) for x in full.ids])
    assert full.n_truncated == 0 and 180 < np.median(lengths) < 260 and lengths.max() < 600
    enc = pipeline.encode_examples(ex, tok, 256)
    assert enc.n_dropped == 0 and 0.3 < enc.n_truncated / len(ex) < 0.6
    assert max(len(x) for x in enc.ids) == 256


def test_persona_weight_on_the_highlighted_persona_words(corpus, tok):
    """data.persona_weight: the reply tokens that spell the highlighted sentence's content words get the weight,
    every other target token (and every select target) 1; the held-out default (1) is the plain NLL."""
    persona = ["i live in portland.", "i play the guitar."]
    d = Dialogue(persona, [], [Turn("where do you live ?", "i live in portland , i love it there .", None, 0),
                               Turn("hi , how are you today ?", "i am doing well , thanks for asking .", None, -1)],
                 "t:1", 0)
    ex = pipeline.stage1_examples([d])
    assert ex[1].meta["highlight"] == "i live in portland." and ex[3].meta["highlight"] is None
    plain = pipeline.encode_examples(ex, tok, 256)
    assert plain.target_weights is None and plain.n_persona_tokens == 0
    enc = pipeline.encode_examples(ex, tok, 256, persona_weight=4.0)
    portland = set(tok.encode(" portland")) | set(tok.encode("portland"))
    for i, e in enumerate(ex):
        target = enc.ids[i][enc.prompt_len[i]:]
        w = enc.target_weights[i]
        assert len(w) == len(target)
        heavy = {int(t) for t, x in zip(target, w) if x == 4.0}
        if i == 1:  # 'live' and 'in' are stopwords (labels.STOPWORDS): only the place is weighted
            assert heavy == portland & set(int(t) for t in target) and heavy
            assert set(np.unique(w)) == {1.0, 4.0}
        else:  # select targets and the persona-free turn: plain
            assert not heavy and (w == 1.0).all()
    assert enc.n_persona_tokens == sum(int((w == 4.0).sum()) for w in enc.target_weights)
    b = pipeline.BatchSource(enc, 4, (64, 128, 192, 256), seed=0).make_batch(np.arange(4))
    on = b["weights"][1][b["weights"][1] > 0]
    np.testing.assert_array_equal(on, enc.target_weights[1])
    with pytest.raises(ValueError, match="persona_weight = 0.0; expected a finite number > 0"):
        pipeline.encode_examples(ex, tok, 256, persona_weight=0.0)
