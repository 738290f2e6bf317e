"""Prompt styles, compared with Stanford Alpaca's PROMPT_DICT written out here by hand."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from lit_llama.prompts import PROMPT_STYLES, PromptStyleName, get_prompt_style

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# tatsu-lab/stanford_alpaca train.py, PROMPT_DICT, copied into the test as the reference.
STANFORD_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
STANFORD_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def test_alpaca_style_matches_stanford_prompt_dict():
    style = get_prompt_style("alpaca")
    example = {"instruction": "Translate to French: {not a field}", "input": "Good morning, {name}!"}
    # Stanford picks the template by `example.get("input", "") != ""` and fills it with format_map
    assert style.format(example["instruction"], example["input"]) == STANFORD_PROMPT_INPUT.format_map(example)
    no_input = {"instruction": "Name three primary colors."}
    assert style.format(no_input["instruction"]) == STANFORD_PROMPT_NO_INPUT.format_map(no_input)
    assert style.format(no_input["instruction"], "") == STANFORD_PROMPT_NO_INPUT.format_map(no_input)


def test_plain_style_is_instruction_blank_line_input_newline():
    style = get_prompt_style("plain")
    assert style.format("Add 2 and 3.") == "Add 2 and 3.\n"
    assert style.format("Add the numbers.", "2, 3") == "Add the numbers.\n\n2, 3\n"


def test_unknown_style_error_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown prompt style 'vicuna'; choose one of: alpaca, plain"):
        get_prompt_style("vicuna")
    assert get_prompt_style(PROMPT_STYLES["plain"]) is PROMPT_STYLES["plain"]


def test_cli_choices_match_the_registry():
    assert set(get_args(PromptStyleName)) == set(PROMPT_STYLES)
    assert all(style.name == name for name, style in PROMPT_STYLES.items())


def test_extract_response_after_prompt_and_after_marker():
    style = get_prompt_style("alpaca")
    prompt = STANFORD_PROMPT_NO_INPUT.format(instruction="What is the capital of France?")
    assert style.extract_response(prompt + " Paris.\n", prompt) == "Paris."
    # no prompt given (or a prompt that differs in whitespace): split at the first "### Response:"
    assert style.extract_response(prompt + "Paris.") == "Paris."
    assert style.extract_response("  " + prompt + "Paris.", prompt) == "Paris."
    plain = get_prompt_style("plain")
    assert plain.extract_response("Say hi.\nhi", "Say hi.\n") == "hi"


def test_extract_response_after_sentencepiece_round_trip():
    """Generation decodes prompt + new ids together; the decoded text must still start with the prompt."""
    path = DATA / "llama-tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    style = get_prompt_style("alpaca")
    prompt = style.format("Rewrite the sentence in passive voice.", "The cat   chased\tthe mouse 🐭.")
    decoded = sp.decode([sp.bos_id()] + sp.encode(prompt + " The mouse was chased by the cat.") + [sp.eos_id()])
    assert decoded.startswith(prompt)
    assert style.extract_response(decoded, prompt) == "The mouse was chased by the cat."
