"""pal_jax.nli vs PyTorch transformers on tiny random BERT / RoBERTa sequence classifiers."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from pal_jax import metrics, nli  # noqa: E402

ID2LABEL = {0: "contradiction", 1: "neutral", 2: "entailment"}
WORDS = ("i like my dog cat red blue car have love hate am a teacher student live in city farm do not "
         "the play guitar piano eat meat vegan").split()


def _save(tmp_path, kind):
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  num_labels=3, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()},
                  initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        model = transformers.BertForSequenceClassification(
            transformers.BertConfig(max_position_embeddings=300, pad_token_id=0, **common))
    else:
        model = transformers.RobertaForSequenceClassification(
            transformers.RobertaConfig(max_position_embeddings=300, pad_token_id=1, type_vocab_size=1, **common))
    model.eval()
    d = str(tmp_path / kind)
    model.save_pretrained(d, safe_serialization=True)
    return model, d


def _batch(pad_id, rows=((5, 7, 9, 11, 3), (5, 8, 3), (5, 20, 30, 40, 50, 60, 70, 3))):
    T = max(map(len, rows))
    ids = np.full((len(rows), T), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    types = np.zeros_like(ids)
    types[0, 3:5] = 1  # a second segment in the BERT row
    return ids, mask, types


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_logits_match_torch(tmp_path, kind):
    model, d = _save(tmp_path, kind)
    from safetensors.numpy import load_file

    with open(os.path.join(d, "config.json")) as f:
        cfg = nli.NLIConfig.from_json(json.load(f))
    params = nli.load_params(load_file(os.path.join(d, "model.safetensors")), cfg)
    ids, mask, types = _batch(cfg.pad_id)
    if kind == "roberta":
        types[:] = 0
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types)).logits.numpy()
    got = np.asarray(nli.forward(params, ids.astype(np.int32), mask.astype(np.int32), types.astype(np.int32), cfg=cfg))
    diff = float(np.abs(got - ref).max())
    print(f"{kind}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4, diff
    assert np.abs(ref).max() > 1e-2  # non-trivial logits


def test_errors(tmp_path):
    _, d = _save(tmp_path, "bert")
    from safetensors.numpy import load_file

    with open(os.path.join(d, "config.json")) as f:
        raw = json.load(f)
    with pytest.raises(ValueError, match="gpt2"):
        nli.NLIConfig.from_json({**raw, "model_type": "gpt2"})
    tensors = load_file(os.path.join(d, "model.safetensors"))
    del tensors["bert.pooler.dense.weight"]
    with pytest.raises(ValueError, match="bert.pooler.dense.weight"):
        nli.load_params(tensors, nli.NLIConfig.from_json(raw))
    with pytest.raises(ValueError, match="foo"):
        nli._label_values({"0": "foo", "1": "neutral", "2": "entailment"})


def _write_tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(os.path.join(d, "tokenizer.json"))
    return tok


def test_predict_and_c_score(tmp_path):
    model, d = _save(tmp_path, "bert")
    tok = _write_tokenizer(d)
    rng = np.random.default_rng(0)

    def sent():
        return " ".join(rng.choice(WORDS, size=rng.integers(2, 12)))

    responses = [sent() for _ in range(7)]
    personas = [[sent() for _ in range(rng.integers(1, 5))] for _ in responses]
    prem = [r for r, ps in zip(responses, personas) for _ in ps]
    hyp = [p for ps in personas for p in ps]

    def torch_logits():  # unpadded, one pair at a time
        out = []
        for p, h in zip(prem, hyp):
            e = tok.encode(p, h)
            with torch.no_grad():
                out.append(model(input_ids=torch.tensor([e.ids]), token_type_ids=torch.tensor([e.type_ids])).logits[0])
        return torch.stack(out)

    with torch.no_grad():  # centre the classes over these pairs so the random model predicts all three labels
        model.classifier.bias -= torch_logits().mean(0)
    model.save_pretrained(d, safe_serialization=True)
    value = {"entailment": 1, "neutral": 0, "contradiction": -1}
    expected = [value[ID2LABEL[int(i)]] for i in torch_logits().argmax(-1)]

    m = nli.NLIModel.from_dir(d)
    got = m.predict(prem, hyp, batch_size=4)  # several batches incl. a ragged last one
    assert got == expected
    assert len(set(expected)) > 1, expected  # the random model should not be constant

    rows, k = [], 0
    for ps in personas:
        rows.append(expected[k:k + len(ps)])
        k += len(ps)
    assert nli.c_score_nli(m, responses, personas, batch_size=4) == pytest.approx(metrics.c_score(rows))
