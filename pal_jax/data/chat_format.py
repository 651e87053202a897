"""Chat-format prompts for instruct base models, in the model's own chat template (ChatML: SmolLM2, Qwen; Llama-3; ...).

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
`chat_template`). `ChatPrompts` builds the prompts from any function that renders a message list the way a chat
template does: the module-level prompts use `render` (ChatML written out, no jinja2 needed), and the predictor
passes the model's own template rendered by transformers' apply_chat_template (inference/predictor.py
`chat_prompts`), so a Llama-3 template gives

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n...<|eot_id|><|start_header_id|>user...

A prompt is rendered whole (the template sees the whole conversation, as it would in the model's training) and
cut into PromptParts after each message's end-of-turn text (`<|im_end|>\n`, `<|eot_id|>`: what the template
writes after an assistant message's content, `ChatPrompts.end_text`; the reply ends there too). A template that
does not write each message's content verbatim followed by that text cannot be cut so: ChatPrompts refuses it
with a TemplateError, and the predictor falls back to the plain format. `is_chatml` checks that a template is
ChatML (with jinja2, by rendering it).
"""
from __future__ import annotations

from typing import Callable, Sequence

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


class ChatPrompts:
    """The select, generate and persona-free prompts as PromptParts in a chat format given by `render(messages,
    add_generation_prompt) -> text` (module doc); `source` names the template in errors. The constructor renders
    probe conversations (both parities of history) and raises TemplateError when the template fails to render or
    cannot be cut into messages."""

    def __init__(self, render_fn: Callable[[list[dict], bool], str], source: str):
        self.render, self.source = render_fn, source
        closed = self._render([{"role": SYSTEM, "content": "pal probe persona"}, {"role": USER, "content": "hi"},
                               {"role": ASSISTANT, "content": "pal probe reply"}], False)
        cut = closed.rfind("pal probe reply")
        self.end_text = closed[cut + len("pal probe reply"):].strip() if cut >= 0 else ""
        if not self.end_text:
            raise TemplateError(f"{self.source}: the chat template writes nothing after an assistant message's "
                                f"content ({closed[-80:]!r}); expected an end-of-turn token there (e.g. <|im_end|>, "
                                f"<|eot_id|>), where a reply ends")
        for history in (PROBE[1:], PROBE[2:]):
            self.parts([PROBE[0], *history])

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.render(messages, add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - jinja2 errors, raise_exception in the template, jinja2 missing
            raise TemplateError(f"{self.source}: the chat template does not render a system/user/assistant "
                                f"conversation ({type(e).__name__}: {e})") from None

    def parts(self, messages: list[dict]) -> PromptParts:
        """The rendered conversation (with the generation prompt) cut after each message's end-of-turn text (and
        the newlines after it): head = up to the first message's end, one history part per further message, tail
        = the generation prompt."""
        text = self._render(messages, True)
        bounds, at = [], 0
        for m in messages:
            i = text.find(m["content"] + self.end_text, at)
            if i < 0:
                raise TemplateError(f"{self.source}: the chat template does not write a {m['role']} message's "
                                    f"content followed by {self.end_text!r} ({text[at:at + 120]!r}...); expected "
                                    f"each message verbatim, then the end-of-turn text")
            at = i + len(m["content"]) + len(self.end_text)
            while text.startswith("\n", at):
                at += 1
            bounds.append(at)
        return PromptParts(head=text[:bounds[0]], history=[text[a:b] for a, b in zip(bounds, bounds[1:])],
                           tail=text[bounds[-1]:])

    def generate_prompt(self, persona, history, selected: str | None) -> PromptParts:
        """The persona and the highlighted sentence (or none) in the system message, then the turns."""
        use = USE_NONE if selected is None else USE_SENTENCE + templates._clean(selected)
        return self.parts([{"role": SYSTEM, "content": f"{PERSONA_INTRO}\n{_persona_list(persona)}\n{use}\n{STYLE}"},
                           *history_roles(history)])

    def persona_free_prompt(self, history) -> PromptParts:
        return self.parts([{"role": SYSTEM, "content": f"{FREE_INTRO}\n{STYLE}"}, *history_roles(history)])

    def select_prompt(self, persona, history) -> PromptParts:
        """The numbered persona and the select instruction in the system message, then the turns; the assistant's
        message is the select target ('k.<sentence>' or NONE_PERSONA)."""
        return self.parts([{"role": SYSTEM, "content": f"{PERSONA_INTRO}\n{_persona_list(persona)}\n{SELECT_ASK}"},
                           *history_roles(history)])


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


def history_roles(history) -> list[dict]:
    """The history as {"role", "content"} messages, oldest first: the last utterance is the partner's (user)."""
    n = len(history)
    return [{"role": USER if (n - 1 - i) % 2 == 0 else ASSISTANT, "content": templates._clean(u)}
            for i, u in enumerate(history)]


def history_messages(history) -> list[str]:
    """The history as ChatML messages, oldest first: the last utterance is the partner's (user)."""
    return [message(m["role"], m["content"]) for m in history_roles(history)]


CHATML = ChatPrompts(render, "ChatML")  # the prompts below; equal to a ChatML template rendered by jinja2


def generate_prompt(persona, history, selected: str | None) -> PromptParts:
    return CHATML.generate_prompt(persona, history, selected)


def persona_free_prompt(history) -> PromptParts:
    return CHATML.persona_free_prompt(history)


def select_prompt(persona, history) -> PromptParts:
    return CHATML.select_prompt(persona, history)
