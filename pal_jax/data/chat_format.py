"""Chat-format prompts for instruct base models whose chat template is ChatML (SmolLM2, Qwen, ...).

Stage 1 trains on the plain-text templates (templates.py), so a pal_jax checkpoint is prompted in that format. An
instruct model that was *not* fine-tuned here only writes sensible replies in its own chat format: given the
plain prompt, SmolLM2-135M-Instruct continues the transcript ("user: hello there!" lines, repeated). This module
builds the same three prompts (select, generate, persona-free) as ChatML conversations:

    <|im_start|>system
    You are chatting with someone you just met. This is your persona:
    1. i read twenty books a year.
    2. i'm a stunt double as my second job.
    In your next reply, use this persona sentence: i read twenty books a year.
    Reply in one or two short, casual sentences.<|im_end|>
    <|im_start|>user
    hello what are doing today ?<|im_end|>
    <|im_start|>assistant
    i am good , i just got off work .<|im_end|>
    <|im_start|>user
    i just got done watching a horror movie<|im_end|>
    <|im_start|>assistant
                                              <- the reply follows, ended by <|im_end|>

The partner speaks as `user`, the persona's owner (the model) as `assistant`; the history is tagged from its end
(the last utterance is the partner's), as in templates.history_lines. Each message is one PromptParts history
line, so over-long prompts drop their oldest turns first, exactly as the plain prompts do.

The template itself is the model's (GGUF `tokenizer.chat_template`, or a Hugging Face tokenizer_config.json's
`chat_template`): `is_chatml` checks that it is ChatML, and, when jinja2 is importable, that rendering it gives
exactly what `render` gives for a probe conversation. jinja2 is not a dependency of pal_jax (only torch, a
test-only package, brings it), so rendering never needs it. Other template families stop with an error naming
what was found (`predict.prompt_format=plain` is the way out).
"""
from __future__ import annotations

from typing import Sequence

from pal_jax.data import templates
from pal_jax.data.templates import PromptParts

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SYSTEM, USER, ASSISTANT = "system", "user", "assistant"

PERSONA_INTRO = "You are chatting with someone you just met. This is your persona:"
STYLE = "Reply in one or two short, casual sentences."
USE_SENTENCE = "In your next reply, use this persona sentence: "
USE_NONE = "Your next reply does not need to mention your persona."
SELECT_ASK = ("Before each reply, answer with the number and text of the persona sentence that the reply will use, "
              f"written like 2.i have a dog. (no space after the number), or \"{templates.NONE_PERSONA}\" when none "
              "fits.")
FREE_INTRO = "You are chatting with someone you just met."


def message(role: str, content: str) -> str:
    """One ChatML message: `<|im_start|>role\\ncontent<|im_end|>\\n`."""
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def header(role: str = ASSISTANT) -> str:
    """The start of a message whose content the model writes (add_generation_prompt)."""
    return f"{IM_START}{role}\n"


def render(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """A list of {"role", "content"} messages as ChatML text (what a ChatML chat template renders)."""
    return "".join(message(m["role"], m["content"]) for m in messages) + (header() if add_generation_prompt else "")


PROBE = ({"role": SYSTEM, "content": "persona:\n1. a"}, {"role": USER, "content": "hi ?"},
         {"role": ASSISTANT, "content": "hello ."}, {"role": USER, "content": "bye"})


class TemplateError(ValueError):
    pass


def is_chatml(template: str | None) -> bool:
    """Whether a chat template renders system/user/assistant messages as ChatML (see the module doc)."""
    if not template or not all(s in template for s in (IM_START, IM_END, "add_generation_prompt")):
        return False
    try:
        import jinja2
    except ImportError:
        return True  # the markers are there; rendering it needs jinja2, which is optional
    try:
        rendered = jinja2.Environment().from_string(template).render(messages=list(PROBE),
                                                                     add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that does not render is not ChatML as far as we can tell
        return False
    return rendered == render(PROBE)


def check_chatml(template: str | None, source: str) -> None:
    if not template:
        raise TemplateError(f"{source}: no chat template (tokenizer.chat_template); expected a ChatML template for "
                            f"predict.prompt_format='chat', or use predict.prompt_format='plain'")
    if not is_chatml(template):
        raise TemplateError(f"{source}: the chat template is not ChatML (<|im_start|>role ... <|im_end|>): "
                            f"{template[:120]!r}...; pal_jax formats ChatML only: use predict.prompt_format='plain'")


def _persona_list(persona) -> str:
    return "\n".join(f"{k}. {templates._clean(s)}" for k, s in enumerate(persona, start=1))


def history_messages(history) -> list[str]:
    """The history as ChatML messages, oldest first: the last utterance is the partner's (user)."""
    n = len(history)
    return [message(USER if (n - 1 - i) % 2 == 0 else ASSISTANT, templates._clean(u)) for i, u in enumerate(history)]


def generate_prompt(persona, history, selected: str | None) -> PromptParts:
    """The persona and the highlighted sentence (or none) in the system message, then the turns."""
    use = USE_NONE if selected is None else USE_SENTENCE + templates._clean(selected)
    system = f"{PERSONA_INTRO}\n{_persona_list(persona)}\n{use}\n{STYLE}"
    return PromptParts(head=message(SYSTEM, system), history=history_messages(history), tail=header())


def persona_free_prompt(history) -> PromptParts:
    return PromptParts(head=message(SYSTEM, f"{FREE_INTRO}\n{STYLE}"), history=history_messages(history),
                       tail=header())


def select_prompt(persona, history) -> PromptParts:
    """The numbered persona and the select instruction in the system message, then the turns; the assistant's
    message is the select target ('k.<sentence>' or NONE_PERSONA)."""
    system = f"{PERSONA_INTRO}\n{_persona_list(persona)}\n{SELECT_ASK}"
    return PromptParts(head=message(SYSTEM, system), history=history_messages(history), tail=header())
