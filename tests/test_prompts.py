"""Prompt styles, compared with Stanford Alpaca's PROMPT_DICT written out here by hand."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from lit_llama.chat_template import render_chat_template
from lit_llama.prompts import PROMPT_STYLES, TEMPLATE_STYLE_NAME, PromptStyleName, get_prompt_style
from lit_llama.tokenizer import Tokenizer

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
    assert set(get_args(PromptStyleName)) == set(PROMPT_STYLES) | {TEMPLATE_STYLE_NAME}
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


# ------------------------------------------------------------------ chat templates against transformers
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Name three primary colors."}],
    "system and two turns": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "  Paris is the capital of France. \n"},
        {"role": "user", "content": "And of Italy? Answer with \"quotes\" & <tags>, café 🦙."},
    ],
}


@pytest.mark.parametrize("folder", ["llama3_chat_dir", "smollm2_chat_dir"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers_apply_chat_template(folder, conversation, add_generation_prompt, request):
    folder = request.getfixturevalue(folder)
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    style = get_prompt_style("chat_template", Tokenizer.from_checkpoint(folder))
    messages = CONVERSATIONS[conversation]
    expected = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert style.render(messages, add_generation_prompt) == expected


@pytest.mark.parametrize("folder", ["llama3_chat_dir", "smollm2_chat_dir"])
def test_chat_template_ids_match_transformers(folder, request):
    """Encoding the rendered text as the style says (bos=False: the template writes its own BOS) gives
    apply_chat_template(tokenize=True)'s ids."""
    folder = request.getfixturevalue(folder)
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer = Tokenizer.from_checkpoint(folder)
    style = get_prompt_style("chat_template", tokenizer)
    messages = CONVERSATIONS["system and two turns"]
    expected = auto.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert style.encode(tokenizer, messages).tolist() == list(expected)


def test_chat_template_end_tokens_are_found(llama3_chat_dir, smollm2_chat_dir):
    llama3 = Tokenizer.from_checkpoint(llama3_chat_dir)
    smol = Tokenizer.from_checkpoint(smollm2_chat_dir)
    assert get_prompt_style("chat_template", llama3).end_token == "<|eot_id|>"
    assert get_prompt_style("chat_template", smol).end_token == "<|im_end|>"
    # the end token joins the tokenizer's stop ids: this Llama 3 config names only <|end_of_text|> as EOS
    assert llama3.stop_ids == (128001,)
    assert get_prompt_style("chat_template", llama3).stop_ids(llama3) == (128001, 128009)


# This Llama 3 template (the first Meta-Llama-3-8B-Instruct one) writes the assistant header even without
# add_generation_prompt, so the comparison without it is ChatML's only.
@pytest.mark.parametrize("name, folder, cases", [
    ("llama3", "llama3_chat_dir", ((2, True), (4, True))),
    ("chatml", "smollm2_chat_dir", ((2, True), (3, False), (4, True))),
])
def test_named_chat_styles_equal_the_templates_they_name(name, folder, cases, request):
    folder = request.getfixturevalue(folder)
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer = Tokenizer.from_checkpoint(folder)
    named = get_prompt_style(name)
    # SmolLM2's template adds its own system message when there is none, so every conversation has one
    messages = CONVERSATIONS["system and two turns"]
    for cut, generation_prompt in cases:
        expected = auto.apply_chat_template(messages[:cut], tokenize=False, add_generation_prompt=generation_prompt)
        assert named.render(messages[:cut], generation_prompt) == expected
        ids = auto.apply_chat_template(messages[:cut], tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
        assert named.encode(tokenizer, messages[:cut], generation_prompt).tolist() == list(ids)
    assert named.end_token == get_prompt_style("chat_template", tokenizer).end_token
    # format(): an instruction record is one user turn, instruction then a blank line and the input
    record = [{"role": "user", "content": "Translate.\n\nGood morning"}]
    expected = auto.apply_chat_template([messages[0], *record], tokenize=False, add_generation_prompt=True)
    assert named.render([messages[0]], False) + named.format("Translate.", "Good morning")[len(named.prefix):] == expected


def test_chat_template_errors_are_one_line_value_errors(llama3_chat_dir):
    sp_like = Tokenizer.from_checkpoint(llama3_chat_dir)
    object.__setattr__(sp_like, "chat_template", None)
    with pytest.raises(ValueError, match="has none, choose one of: alpaca, plain, chatml, llama3"):
        get_prompt_style("chat_template", sp_like)
    with pytest.raises(ValueError, match="refused the conversation: roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="not valid Jinja"):
        render_chat_template("{% for %}", [{"role": "user", "content": "x"}])
    # the sandbox: no way from a template to Python internals
    with pytest.raises(ValueError, match="refused"):
        render_chat_template("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    assert render_chat_template("{{ messages[0] | tojson }}", [{"role": "user", "content": "<é>"}]) == '{"role": "user", "content": "<é>"}'
