"""Prompt styles: how an instruction (and an optional input), or a whole conversation, becomes the
text the model continues.

The same style must be used to prepare the data, to finetune and to generate, or the model sees
prompts it was never trained on. The adapter records the style of its data (meta.prompt_style), so
generate/lora.py and generate/chat.py use it without being told.

Instruction styles (one template with an input and one without):

    alpaca  Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py), word for word. The
            response follows "### Response:" directly, with no newline or space in between, as in
            Alpaca's training data (sources + targets are concatenated as they are).
    plain   The instruction, then a blank line and the input when there is one, then a newline:
            "{instruction}\\n" or "{instruction}\\n\\n{input}\\n". For base models and quick tests.

Chat styles (a conversation of {"role", "content"} messages; an instruction record is one user
turn, its instruction then a blank line and the input, and the output is the assistant's turn):

    chatml         "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message, then
                   "<|im_start|>assistant\\n" (SmolLM2, Qwen, ... as their templates write it when
                   a system message is given). A turn ends with <|im_end|>.
    llama3         "<|begin_of_text|>", then "<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>"
                   per message, content stripped, then "<|start_header_id|>assistant<|end_header_id|>\\n\\n"
                   (Meta Llama 3 Instruct's template, BOS written as text as the template writes it).
    chat_template  The checkpoint's own Jinja template (tokenizer_config.json's chat_template or
                   chat_template.jinja, lit_llama/chat_template.py), rendered as transformers'
                   apply_chat_template renders it; the text carries its own BOS. Needs the tokenizer:
                   get_prompt_style("chat_template", tokenizer).

A chat style knows the token that ends an assistant turn (`end_token`); generation stops there too
(`style.stop_ids(tokenizer)`), and data preparation trains it as the answer's last token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from lit_llama.chat_template import render_chat_template

if TYPE_CHECKING:  # the tokenizer only appears in annotations here
    from lit_llama.tokenizer import Tokenizer

Message = Mapping[str, str]


def user_content(instruction: str, input: str = "") -> str:
    """An instruction record's user turn in a chat style: the instruction, then a blank line and the input."""
    return f"{instruction}\n\n{input}" if input else instruction


class PromptStyle:
    """What every style offers; `InstructionStyle`, `ChatStyle` and `TemplateStyle` fill it in."""

    name: str
    # Whether the rendered text is encoded with the tokenizer's BOS in front (False: the text has its own).
    bos: bool = True
    # The text of the token that ends an assistant turn (None: the style has none; EOS ends a response).
    end_token: str | None = None
    # Text that ends every prompt of this style, used to find the response when the exact prompt
    # is not known (None: the style has no such marker).
    response_marker: str | None = None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        raise NotImplementedError

    def format(self, instruction: str, input: str = "") -> str:
        """The prompt for one record; an empty `input` selects the template without input."""
        return self.render([{"role": "user", "content": user_content(instruction, input)}])

    def encode(
        self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The token ids of the rendered conversation, BOS as this style needs it."""
        return tokenizer.encode(self.render(messages, add_generation_prompt), bos=self.bos, device=device)

    def end_id(self, tokenizer: Tokenizer) -> int | None:
        """The id of `end_token` when the tokenizer has it as one token, else None."""
        return tokenizer.added_tokens.get(self.end_token) if self.end_token is not None else None

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        """Where generation stops: the tokenizer's stop ids (every EOS its files name) and the end token."""
        end = self.end_id(tokenizer)
        return tuple(dict.fromkeys([*tokenizer.stop_ids, *([end] if end is not None else [])]))

    def extract_response(self, text: str, prompt: str | None = None) -> str:
        """The response in `text` (prompt + generated continuation), without surrounding whitespace.

        With `prompt`, the text after it. Otherwise, or if `text` does not start with `prompt`
        (a decoded prompt can differ in whitespace), the text after the first response marker;
        failing both, `text` itself.
        """
        if prompt is not None and text.startswith(prompt):
            return text[len(prompt):].strip()
        if self.response_marker is not None and self.response_marker in text:
            return text.split(self.response_marker, 1)[1].strip()
        return text.strip()


@dataclass(frozen=True)
class InstructionStyle(PromptStyle):
    """A template for one instruction. A conversation has no roles here: a system message comes
    first, each user turn is formatted as an instruction, each assistant turn follows its prompt,
    then a blank line."""

    name: str
    template_with_input: str  # uses {instruction} and {input}
    template_no_input: str  # uses {instruction}
    response_marker: str | None = None

    def format(self, instruction: str, input: str = "") -> str:
        if input:
            return self.template_with_input.format(instruction=instruction, input=input)
        return self.template_no_input.format(instruction=instruction)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        parts = []
        for message in messages:
            role, content = message["role"], message.get("content") or ""
            if role == "user":
                parts.append(self.format(content))
            elif role == "assistant":
                parts.append(content + "\n\n")
            else:  # system (or any other role): its text, then a blank line
                parts.append(content + "\n\n")
        return "".join(parts)


@dataclass(frozen=True)
class ChatStyle(PromptStyle):
    """A conversation with roles, one fixed text pattern per message."""

    name: str
    turn: str  # uses {role} and {content}
    generation_prompt: str  # starts the assistant's reply
    end_token: str | None = None
    strip_content: bool = False  # strip each message's content, as Llama 3's template does
    prefix: str = ""  # text before the first message (Llama 3: its BOS, written as text)
    bos: bool = True  # False when `prefix` is the BOS

    @property
    def response_marker(self) -> str:
        return self.generation_prompt

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        text = self.prefix + "".join(self.turn.format(role=m["role"], content=(m.get("content") or "").strip() if self.strip_content
                                        else (m.get("content") or "")) for m in messages)
        return text + self.generation_prompt if add_generation_prompt else text


@dataclass(frozen=True)
class TemplateStyle(PromptStyle):
    """The checkpoint's own Jinja chat template (lit_llama/chat_template.py); build it with
    `TemplateStyle.from_tokenizer` or get_prompt_style("chat_template", tokenizer)."""

    template: str
    special_tokens: tuple[tuple[str, str], ...] = ()  # (("bos_token", "<|begin_of_text|>"), ...), the template's variables
    end_token: str | None = None
    name: str = "chat_template"
    bos = False  # the template writes BOS itself when the model wants one

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.template, messages, add_generation_prompt, dict(self.special_tokens))

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> TemplateStyle:
        if tokenizer.chat_template is None:
            raise ValueError("prompt style 'chat_template' needs a tokenizer with a chat template (tokenizer_config.json's "
                             "chat_template or chat_template.jinja); this checkpoint has none, choose one of: "
                             f"{', '.join(PROMPT_STYLES)}")
        names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
        special = tuple((key, tokenizer.decode([i])) for key, i in names.items() if i is not None)
        style = cls(tokenizer.chat_template, special)
        return cls(tokenizer.chat_template, special, _find_end_token(style, tokenizer))


def _find_end_token(style: TemplateStyle, tokenizer: Tokenizer) -> str | None:
    """The added token the template writes right after an assistant's content (<|im_end|>, <|eot_id|>,
    <end_of_turn>, ...; spaces before it are skipped), or None when there is none or the template refuses
    a two-message conversation."""
    answer = "lit_llama probe answer"
    try:
        text = style.render([{"role": "user", "content": "lit_llama probe question"},
                             {"role": "assistant", "content": answer}], add_generation_prompt=False)
    except ValueError:
        return None
    if answer not in text:
        return None
    after = text[text.rindex(answer) + len(answer):].lstrip(" ")
    matches = [token for token in tokenizer.added_tokens if token and after.startswith(token)]
    return max(matches, key=len) if matches else None


PROMPT_STYLES: dict[str, PromptStyle] = {
    "alpaca": InstructionStyle(
        name="alpaca",
        template_with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
        ),
        template_no_input=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:"
        ),
        response_marker="### Response:",
    ),
    "plain": InstructionStyle(
        name="plain",
        template_with_input="{instruction}\n\n{input}\n",
        template_no_input="{instruction}\n",
    ),
    "chatml": ChatStyle(
        name="chatml",
        turn="<|im_start|>{role}\n{content}<|im_end|>\n",
        generation_prompt="<|im_start|>assistant\n",
        end_token="<|im_end|>",
    ),
    "llama3": ChatStyle(
        name="llama3",
        turn="<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end_token="<|eot_id|>",
        strip_content=True,
        prefix="<|begin_of_text|>",
        bos=False,
    ),
}
TEMPLATE_STYLE_NAME = "chat_template"  # the checkpoint's own template; not in PROMPT_STYLES, it needs the tokenizer

# The names scripts accept for `--prompt_style` (a test checks it matches PROMPT_STYLES + chat_template).
PromptStyleName = Literal["alpaca", "plain", "chatml", "llama3", "chat_template"]


def describe_style(style: PromptStyle) -> str:
    """How scripts name a style on stderr: "chatml", or "chat_template (the checkpoint's own, ends turns with <|im_end|>)"."""
    if isinstance(style, TemplateStyle):
        return f"{style.name} (the checkpoint's own, ends turns with {style.end_token or 'EOS'})"
    return style.name


def get_prompt_style(name: str | PromptStyle, tokenizer: Tokenizer | None = None) -> PromptStyle:
    """The style called `name` (a PromptStyle is returned as is); "chat_template" is the template of
    `tokenizer`'s checkpoint."""
    if isinstance(name, PromptStyle):
        return name
    if name == TEMPLATE_STYLE_NAME:
        if tokenizer is None:
            raise ValueError("prompt style 'chat_template' is the checkpoint's own template; pass the tokenizer to read it")
        return TemplateStyle.from_tokenizer(tokenizer)
    if name not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {name!r}; choose one of: {', '.join([*PROMPT_STYLES, TEMPLATE_STYLE_NAME])}")
    return PROMPT_STYLES[name]
