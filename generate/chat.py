"""Chat with a model, turn after turn, the reply streamed as it is generated.

    python generate/chat.py --checkpoint_dir checkpoints/lit/SmolLM2-135M-Instruct

Each line you type is a user turn; the conversation is written in the model's own chat template
(or the prompt style an adapter was trained with) and the reply streams to stdout until the
template's end token. /reset starts a new conversation, /exit (or end of input) ends. When the
conversation outgrows the model's context, the oldest turns are dropped (said on stderr).

Piped input works too, one user turn per line, with no prompt decoration:

    printf 'Hi!\\nWhat is 2 + 2?\\n' | python generate/chat.py --checkpoint_dir DIR --temperature 0
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch

from lit_llama.adapter import copy_adapter_, load_adapter
from lit_llama.checkpoint import load_config
from lit_llama.cli import run
from lit_llama.decode_speedups import packs_weights, prepare_decoding
from lit_llama.generation import stream
from lit_llama.generation_loading import checkpoint_folder, load_for_generation, refuse_gguf_with_adapter
from lit_llama.lora import load_lora_model, merged_model
from lit_llama.prompts import (
    PROMPT_STYLES,
    TEMPLATE_STYLE_NAME,
    PromptStyle,
    PromptStyleName,
    describe_style,
    get_prompt_style,
)
from lit_llama.runtime import PRECISIONS, prepare_run
from lit_llama.tokenizer import Tokenizer
from lit_llama.weight_only import QuantizeMode, check_quantize, quantize_for_generation

Message = dict[str, str]


def main(
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    lora_path: Path | None = None,
    system: str | None = None,
    prompt_style: Literal["auto"] | PromptStyleName = "auto",
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    precision: Literal["32-true", "bf16-true", "16-true"] = "32-true",
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    seed: int = 1234,
    quantize: QuantizeMode = "none",
    group_size: int = 32,
) -> list[Message]:
    """Chat with a model: one user turn per line of input, replies streamed to stdout.

    Args:
        checkpoint_dir: A checkpoint directory (lit_config.json, lit_model.*, and a tokenizer: tokenizer.json with a chat template for an instruct model), or a llama .gguf file (config, tokenizer and chat template from its metadata).
        lora_path: An adapter file written by finetune/lora.py, merged into the model; its prompt style is used.
        system: A system message that starts every conversation (kept when old turns are dropped and on /reset).
        prompt_style: How the conversation is written: auto (the adapter's style, else the checkpoint's chat template), chat_template (the checkpoint's own Jinja template), or a named style: chatml, llama3, alpaca, plain.
        max_new_tokens: The longest reply in tokens; replies end earlier at the template's end token (or EOS).
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only among the k most likely tokens (None: all).
        top_p: Nucleus sampling: the smallest set of tokens whose probability reaches p (None: off).
        precision: Weight and compute dtype: 32-true (fp32), bf16-true or 16-true (fp16, GPU only).
        accelerator: Where to run: auto picks cuda when available, else cpu.
        seed: Random seed for sampling.
        quantize: Weight-only quantization at load (howto/quantize.md): int8 (per output channel) or int4 (groups of --group_size; a .gguf file's Q4_0/Q4_1 codes as they are); an adapter is merged in fp32 first.
        group_size: Weights per int4 scale: 32, 64 or 128.
    """
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
    device = prepare_run(accelerator, precision, seed)
    check_quantize(quantize, group_size, PRECISIONS[precision], device)
    recorded, special_tokens = None, ()
    if lora_path is not None:
        refuse_gguf_with_adapter(checkpoint_dir)
        adapter, meta = load_adapter(lora_path)
        recorded, special_tokens = meta.prompt_style, meta.special_tokens
    with checkpoint_folder(checkpoint_dir) as folder:  # a .gguf file: its metadata as a folder
        config = load_config(folder)
        if max_new_tokens >= config.block_size:
            raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for the conversation in the model's context of "
                             f"{config.block_size}; lower it")
        tokenizer = Tokenizer.from_checkpoint(folder, special_tokens=special_tokens)
    t0 = time.perf_counter()
    pack = packs_weights(device, False, 1) and quantize == "none"  # quantized layers are not packed
    if lora_path is None:
        model = load_for_generation(checkpoint_dir, PRECISIONS[precision], device, quantize, group_size, mmap=not pack,
                                    config=config)
    else:
        model = load_lora_model(checkpoint_dir, meta.lora, device=device, mmap=not pack)
        copy_adapter_(model, adapter, meta, lora_path.name)
        # Merged in fp32, then cast or quantized, as generate/lora.py.
        model = quantize_for_generation(merged_model(model), quantize, group_size, PRECISIONS[precision])
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}; "
                         "pass the checkpoint the tokenizer belongs to")
    style = choose_style(prompt_style, tokenizer, recorded)
    decode_fn = prepare_decoding(model, False, pack, 1, 0, max_new_tokens)
    print(f"Loaded {checkpoint_dir}{' + ' + str(lora_path) if lora_path else ''} in {time.perf_counter() - t0:.2f} s; "
          f"prompt style: {describe_style(style)}", file=sys.stderr)

    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; /reset starts over, /exit (or Ctrl-D) ends.", file=sys.stderr)
    start = [{"role": "system", "content": system}] if system else []
    history: list[Message] = []
    stop_ids = style.stop_ids(tokenizer)
    for line in user_lines(sys.stdin, interactive):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            print("(conversation reset)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        prompt, history = fit_context(style, tokenizer, start, history, model.config.block_size - max_new_tokens, device)
        if prompt is None:
            continue
        t0 = time.perf_counter()
        tokens = stream(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        stop_ids=stop_ids, decode_fn=decode_fn)
        reply, n = print_streamed(tokenizer, tokens)
        history.append({"role": "assistant", "content": reply})
        if interactive:
            print(f"[{n} tokens in {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    model.clear_kv_cache()
    return start + history


def choose_style(prompt_style: str, tokenizer: Tokenizer, recorded: str | None) -> PromptStyle:
    """`--prompt_style auto`: the style the adapter was trained with, else the checkpoint's chat template."""
    if prompt_style != "auto":
        return get_prompt_style(prompt_style, tokenizer)
    if recorded:
        return get_prompt_style(recorded, tokenizer)
    if tokenizer.chat_template is not None:
        return get_prompt_style(TEMPLATE_STYLE_NAME, tokenizer)
    raise ValueError("this checkpoint's tokenizer has no chat template (a base model?); pass --prompt_style, one of: "
                     f"{', '.join(PROMPT_STYLES)}, or use generate/base.py to continue text")


def user_lines(stdin: Iterable[str], interactive: bool) -> Iterator[str]:
    """The user's lines; at a terminal after a "> " prompt on stderr."""
    if not interactive:
        yield from stdin
        return
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # Ctrl-D
            print(file=sys.stderr)
            return
        yield line


def fit_context(
    style: PromptStyle, tokenizer: Tokenizer, start: list[Message], history: list[Message], budget: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, list[Message]]:
    """The prompt ids of the conversation and the history they hold: the oldest turns (a user message
    and its reply) dropped until the prompt fits in `budget` tokens. When even the last message alone
    does not fit, the prompt is None and the history is kept without it."""
    dropped, before = 0, history[:-1]
    while True:
        ids = style.encode(tokenizer, start + history, device=device)
        if len(ids) <= budget:
            break
        if len(history) == 1:
            print(f"error: the message is {len(ids)} tokens with the template; at most {budget} fit beside "
                  "--max_new_tokens in the model's context; send a shorter one or lower --max_new_tokens", file=sys.stderr)
            return None, before
        history = history[2:]
        dropped += 1
    if dropped:
        print(f"(dropped the oldest {dropped} turn{'s' if dropped > 1 else ''} to fit the context)", file=sys.stderr)
    return ids, history


def print_streamed(tokenizer: Tokenizer, tokens: Iterable[int]) -> tuple[str, int]:
    """Print the reply to stdout as its tokens come; returns (its text, its length in tokens).

    A token can hold part of a UTF-8 character (byte-fallback pieces, byte-level BPE), so the whole
    reply so far is decoded each time and only its new end is printed, once it no longer ends in
    the replacement character of an unfinished byte sequence."""
    ids: list[int] = []
    printed = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd") or not text.startswith(printed):
            continue
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    text = tokenizer.decode(ids)
    sys.stdout.write((text[len(printed):] if text.startswith(printed) else "") + "\n")
    sys.stdout.flush()
    return text, len(ids)


if __name__ == "__main__":
    run(main)
