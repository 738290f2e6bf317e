"""Prompt styles: how an instruction (and an optional input) becomes the text the model continues.

A style has two templates, one for records with an input and one without, and knows how to find
the response in generated text. The same style must be used to prepare the data, to finetune and
to generate, or the model sees prompts it was never trained on.

    alpaca  Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py), word for word. The
            response follows "### Response:" directly, with no newline or space in between, as in
            Alpaca's training data (sources + targets are concatenated as they are).
    plain   The instruction, then a blank line and the input when there is one, then a newline:
            "{instruction}\\n" or "{instruction}\\n\\n{input}\\n". For base models and quick tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PromptStyle:
    name: str
    template_with_input: str  # uses {instruction} and {input}
    template_no_input: str  # uses {instruction}
    # Text that ends every prompt of this style, used to find the response when the exact prompt
    # is not known (None: the style has no such marker).
    response_marker: str | None = None

    def format(self, instruction: str, input: str = "") -> str:
        """The prompt for one record; an empty `input` selects the template without input."""
        if input:
            return self.template_with_input.format(instruction=instruction, input=input)
        return self.template_no_input.format(instruction=instruction)

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


PROMPT_STYLES: dict[str, PromptStyle] = {
    "alpaca": PromptStyle(
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
    "plain": PromptStyle(
        name="plain",
        template_with_input="{instruction}\n\n{input}\n",
        template_no_input="{instruction}\n",
    ),
}

# The registered names, for scripts' `--prompt_style` choices (a test checks it matches PROMPT_STYLES).
PromptStyleName = Literal["alpaca", "plain"]


def get_prompt_style(name: str | PromptStyle) -> PromptStyle:
    """The registered style called `name` (a PromptStyle is returned as is)."""
    if isinstance(name, PromptStyle):
        return name
    if name not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {name!r}; choose one of: {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]
