"""Answer an instruction with a base model plus a LoRA adapter.

    python generate/lora.py --checkpoint_dir checkpoints/lit/open_llama_7b \
        --lora_path out/lora/alpaca/lit_model.lora.safetensors --prompt "Name three primary colors."

The adapter file says which prompt template and LoRA settings it was trained with, so they are not
repeated here. Only the response is printed on stdout; timings go to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from lit_llama.adapter import copy_adapter_, load_adapter
from lit_llama.cli import run
from lit_llama.decode_speedups import pack_weights_timed, packs_weights, prepare_decoding
from lit_llama.generation import generate
from lit_llama.generation_loading import refuse_gguf_with_adapter
from lit_llama.lora import load_lora_model, merged_model
from lit_llama.multi_lora import generate_with_adapters, load_multi_lora_model
from lit_llama.prompts import PromptStyleName, describe_style, get_prompt_style
from lit_llama.qlora import match_training_base_
from lit_llama.runtime import PRECISIONS, count, peak_memory_mib, prepare_run
from lit_llama.tokenizer import Tokenizer
from lit_llama.weight_only import QuantizeMode, check_quantize, quantize_for_generation


def main(
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    lora_path: Path | list[Path] = Path("out/lora/alpaca/lit_model.lora.safetensors"),
    prompt: str = "What food do llamas eat?",
    input: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    precision: Literal["32-true", "bf16-true", "16-true"] = "32-true",
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    compile: bool = False,
    prompt_style: PromptStyleName | None = None,
    seed: int = 1234,
    quantize: QuantizeMode = "none",
    group_size: int = 32,
) -> str | list[str]:
    """Generate a response to an instruction with a LoRA-finetuned model.

    Args:
        checkpoint_dir: The base model's checkpoint directory (the one the adapter was finetuned from).
        lora_path: The adapter file written by finetune/lora.py; several (--lora_path a --lora_path b) answer side by side, unmerged, in one batch.
        prompt: The instruction.
        input: Optional context for the instruction (Alpaca's "input" field).
        max_new_tokens: How many tokens to generate at most (generation also stops at EOS).
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only among the k most likely tokens (None: all).
        top_p: Nucleus sampling threshold (None: off).
        precision: Weight and compute dtype: 32-true, bf16-true, or 16-true (GPU only).
        accelerator: Where to run: auto picks cuda when available, else cpu.
        compile: torch.compile the one-token decode step of the merged model, as generate/base.py --compile (one adapter only).
        prompt_style: Override the prompt template stored in the adapter: alpaca, plain, chatml, llama3, or chat_template (the checkpoint's own chat template); default: the adapter's, else alpaca.
        seed: Random seed for sampling.
        quantize: Weight-only quantization of the merged model (howto/quantize.md): int8 (per output channel) or int4 (groups of --group_size); merged in fp32 first, then quantized (one adapter only).
        group_size: Weights per int4 scale: 32, 64 or 128.
    """
    device = prepare_run(accelerator, precision, seed)
    refuse_gguf_with_adapter(checkpoint_dir)
    check_quantize(quantize, group_size, PRECISIONS[precision], device)
    paths = [lora_path] if isinstance(lora_path, Path) else list(lora_path)
    if len(paths) > 1:
        if compile:
            raise ValueError("--compile works with one adapter; several adapters generate unmerged, uncompiled")
        if quantize != "none":
            raise ValueError("--quantize works with one adapter, merged; several adapters generate unmerged over the float base")
        return generate_many(checkpoint_dir, paths, prompt, input, max_new_tokens, temperature, top_k, top_p,
                             precision, device, prompt_style)
    lora_path = paths[0]
    adapter, meta = load_adapter(lora_path)  # read once: the tensors are copied in below
    tokenizer = Tokenizer.from_checkpoint(checkpoint_dir, special_tokens=meta.special_tokens)  # with the tokens the adapter added
    style = get_prompt_style(prompt_style or meta.prompt_style or "alpaca", tokenizer)

    t0 = time.perf_counter()
    # Load in fp32, merge in fp32, then cast (or quantize): merging in bf16 would round W + BA twice.
    pack = packs_weights(device, compile, 1) and quantize == "none"  # loaded unmapped if packed, as in base.py
    model = load_lora_model(checkpoint_dir, meta.lora, device=device, mmap=not pack)
    match_training_base_(model, meta.quantize)  # trained with --quantize: the dequantized base it was trained on
    copy_adapter_(model, adapter, meta, lora_path.name)
    # A plain LLaMA: every linear layer can be packed, or quantized (from the merged fp32 weights).
    model = quantize_for_generation(merged_model(model), quantize, group_size, PRECISIONS[precision])
    print(f"Loaded {checkpoint_dir} + {lora_path} in {time.perf_counter() - t0:.2f} s; prompt style: {describe_style(style)}",
          file=sys.stderr)

    encoded = tokenizer.encode(style.format(prompt, input), bos=style.bos, device=device)
    decode_fn = prepare_decoding(model, compile, pack, 1, len(encoded), max_new_tokens)
    t0 = time.perf_counter()
    out = generate(model, [encoded], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   stop_ids=style.stop_ids(tokenizer), pad_id=tokenizer.pad_id, decode_fn=decode_fn)[0]
    elapsed = time.perf_counter() - t0
    response = tokenizer.decode(out[len(encoded):]).strip()
    print(response)
    n_new = len(out) - len(encoded)
    print(f"Generated {count(n_new, 'token')} in {elapsed:.2f} s: {n_new / elapsed:.1f} tokens/s; "
          f"peak memory {peak_memory_mib(device):.0f} MiB", file=sys.stderr)
    return response


def generate_many(
    checkpoint_dir: Path, paths: list[Path], prompt: str, input: str, max_new_tokens: int, temperature: float,
    top_k: int | None, top_p: float | None, precision: str, device: torch.device, prompt_style: str | None,
) -> list[str]:
    """One answer per adapter, all adapters unmerged over one base in one batch (lit_llama/multi_lora.py)."""
    t0 = time.perf_counter()
    pack = packs_weights(device, False, len(paths))  # loaded unmapped if packed, as in base.py
    model, metas = load_multi_lora_model(checkpoint_dir, paths, device=device, mmap=not pack)
    if len({meta.special_tokens for meta in metas}) > 1:
        raise ValueError("the adapters add different special tokens to the tokenizer, so their prompts cannot share one "
                         "batch; generate with each adapter on its own")
    tokenizer = Tokenizer.from_checkpoint(checkpoint_dir, special_tokens=metas[0].special_tokens)
    model = model.to(PRECISIONS[precision])
    print(f"Loaded {checkpoint_dir} + {len(paths)} adapters in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    if pack:  # the layers no adapter wraps: 134M bf16, 8 rows over 8 Q/V adapters, 294 -> 338 tokens/s
        pack_weights_timed(model)
    # Each adapter gets the prompt in its own template: row k is adapter k.
    styles = [get_prompt_style(prompt_style or meta.prompt_style or "alpaca", tokenizer) for meta in metas]
    encoded = [tokenizer.encode(style.format(prompt, input), bos=style.bos, device=device) for style in styles]
    stop_ids = tuple(dict.fromkeys(i for style in styles for i in style.stop_ids(tokenizer)))
    t0 = time.perf_counter()
    outs = generate_with_adapters(model, encoded, list(range(len(paths))), max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, stop_ids=stop_ids, pad_id=tokenizer.pad_id)
    elapsed = time.perf_counter() - t0
    responses = [tokenizer.decode(out[len(enc):]).strip() for enc, out in zip(encoded, outs)]
    for path, response in zip(paths, responses):
        print(f"### {path}\n{response}")
    n_new = sum(len(out) - len(enc) for enc, out in zip(encoded, outs))
    print(f"Generated {count(n_new, 'token')} for {len(paths)} adapters in {elapsed:.2f} s: {n_new / elapsed:.1f} tokens/s; "
          f"peak memory {peak_memory_mib(device):.0f} MiB", file=sys.stderr)
    return responses


def join_repeated(argv: list[str], flag: str) -> list[str]:
    """`--flag a --flag b` -> `--flag ["a", "b"]`, the list syntax jsonargparse reads (it keeps only the last)."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]
    if len(values) < 2:
        return argv
    rest = [arg for i, arg in enumerate(argv) if arg != flag and (i == 0 or argv[i - 1] != flag)]
    return [*rest, flag, json.dumps(values)]


if __name__ == "__main__":
    run(main, join_repeated(sys.argv[1:], "--lora_path"))
