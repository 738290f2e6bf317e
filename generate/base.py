"""Generate text with a converted checkpoint.

    python generate/base.py --checkpoint_dir checkpoints/lit/stories260K --prompt "Once upon a time"

Raw text (a base model, or --prompt_style none): the prompt + continuation goes to stdout. With a
prompt style (by default the checkpoint's own chat template when its tokenizer has one) the prompt
is one user turn and only the reply goes to stdout; the style used is named on stderr, with load
time, tokens/s and peak memory.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

from lit_llama.checkpoint import load_config
from lit_llama.cli import run
from lit_llama.decode_speedups import packs_weights, prepare_decoding
from lit_llama.generation import generate
from lit_llama.generation_loading import checkpoint_folder, load_for_generation
from lit_llama.prompts import TEMPLATE_STYLE_NAME, PromptStyleName, describe_style, get_prompt_style
from lit_llama.runtime import PRECISIONS, count, peak_memory_mib, prepare_run
from lit_llama.tokenizer import Tokenizer
from lit_llama.weight_only import QuantizeMode


def main(
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    prompt: str = "Once upon a time",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    num_samples: int = 1,
    precision: Literal["32-true", "bf16-true", "16-true"] = "32-true",
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    compile: bool = False,
    seed: int = 1234,
    tokenizer_path: Path | None = None,
    prompt_style: Literal["auto", "none"] | PromptStyleName = "auto",
    quantize: QuantizeMode = "none",
    group_size: int = 32,
) -> list[str]:
    """Generate text from a prompt.

    Args:
        checkpoint_dir: A checkpoint directory (lit_config.json, lit_model.*, tokenizer.model), or a llama .gguf file (config, tokenizer and chat template from its metadata).
        prompt: The text to continue.
        max_new_tokens: How many tokens to generate at most (generation also stops at EOS).
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only among the k most likely tokens (None: all).
        top_p: Nucleus sampling: the smallest set of tokens whose probability reaches p (None: off).
        num_samples: How many independent samples to draw, generated as one batch.
        precision: Weight and compute dtype: 32-true (fp32), bf16-true or 16-true (fp16, GPU only).
        accelerator: Where to run: auto picks cuda when available, else cpu.
        compile: torch.compile the one-token decode step; on CPU its matrix-vector products become fused reductions (about 2x the eager tokens/s at batch 1; with num_samples > 1 over weights packed for oneDNN, 1.3x); 20-30 s to compile, so it pays off for long generations. Without it, CPU weights are packed for oneDNN once.
        seed: Random seed for sampling.
        tokenizer_path: The tokenizer (a SentencePiece .model or a tokenizer.json); default: the one in checkpoint_dir.
        prompt_style: How the prompt is written: none (raw text to continue), a named style (alpaca, plain, chatml, llama3: the prompt is one user turn), chat_template (the checkpoint's own chat template), or auto: chat_template when the checkpoint's tokenizer has one (instruct models), else none. With a style only the reply is printed; stderr names the style used.
        quantize: Weight-only quantization at load (howto/quantize.md): int8 (per output channel) or int4 (groups of --group_size; a .gguf file's Q4_0/Q4_1 codes as they are); activations stay in --precision.
        group_size: Weights per int4 scale: 32, 64 or 128.
    """
    if num_samples < 1:
        raise ValueError(f"--num_samples must be at least 1, got {num_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
    device = prepare_run(accelerator, precision, seed)
    with checkpoint_folder(checkpoint_dir) as folder:  # a .gguf file: its metadata as a folder
        config = load_config(folder)  # names a wrong folder as such, before the tokenizer inside it is missed
        tokenizer = Tokenizer.from_checkpoint(folder, tokenizer_path)

    t0 = time.perf_counter()
    # Weights that prepare_decoding will pack are read into memory rather than mapped from the file,
    # so that each unpacked weight is freed as its packed copy is made. Quantized layers are not packed.
    pack = packs_weights(device, compile, num_samples) and quantize == "none"
    model = load_for_generation(checkpoint_dir, PRECISIONS[precision], device, quantize, group_size, mmap=not pack, config=config)
    quantized = "" if quantize == "none" else f", weights {quantize}" + (f" in groups of {group_size}" if quantize == "int4" else "")
    print(f"Loaded {checkpoint_dir}{quantized} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}; "
            "pass the tokenizer this checkpoint was trained with"
        )

    style = None
    if prompt_style == "auto" and tokenizer.chat_template is not None:
        style = get_prompt_style(TEMPLATE_STYLE_NAME, tokenizer)
    elif prompt_style not in ("auto", "none"):
        style = get_prompt_style(prompt_style, tokenizer)
    if style is None:
        print("prompt style: none (raw text)", file=sys.stderr)
        encoded = tokenizer.encode(prompt, bos=True, device=device)
        stop_ids = tokenizer.stop_ids
    else:
        print(f"prompt style: {describe_style(style)}; --prompt_style none continues raw text", file=sys.stderr)
        encoded = style.encode(tokenizer, [{"role": "user", "content": prompt}], device=device)
        stop_ids = style.stop_ids(tokenizer)
    prompts = [encoded] * num_samples
    decode_fn = prepare_decoding(model, compile, pack, num_samples, len(encoded), max_new_tokens)
    t0 = time.perf_counter()
    outputs = generate(
        model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_ids=stop_ids, pad_id=tokenizer.pad_id, decode_fn=decode_fn,
    )
    elapsed = time.perf_counter() - t0
    texts = [tokenizer.decode(out) if style is None else tokenizer.decode(out[len(encoded):]).strip() for out in outputs]
    for text in texts:
        print(text)
    n_new = sum(len(out) - len(encoded) for out in outputs)
    print(
        f"Generated {count(n_new, 'token')} in {elapsed:.2f} s: {n_new / elapsed:.1f} tokens/s; "
        f"peak memory {peak_memory_mib(device):.0f} MiB",
        file=sys.stderr,
    )
    return texts


if __name__ == "__main__":
    run(main)
