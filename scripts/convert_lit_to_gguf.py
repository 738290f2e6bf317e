"""Convert a lit_llama checkpoint (optionally with a LoRA adapter merged in) into one GGUF file for llama.cpp.

    python scripts/convert_lit_to_gguf.py --checkpoint_dir checkpoints/lit/SmolLM2-135M-Instruct \
        --lora_path out/lora/alpaca/lit_model.lora.safetensors --output_path out/smollm2-alpaca.q8_0.gguf --outtype q8_0

The file (general.architecture=llama) holds the weights, the config, the tokenizer (tokenizer.model or
tokenizer.json) and the chat template; `llama-cli -m FILE` and Ollama's `FROM FILE` read it
(howto/gguf.md). It loads in transformers with `from_pretrained(folder, gguf_file=name)`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

import torch

from lit_llama.cli import run
from lit_llama.export_gguf import export_checkpoint
from lit_llama.runtime import peak_memory_mib


def main(
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    output_path: Path = Path("out/gguf/SmolLM2-135M-Instruct.f16.gguf"),
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16",
    lora_path: Path | None = None,
    name: str = "",
) -> Path:
    """Write a llama-architecture GGUF file of a lit_llama checkpoint.

    Args:
        checkpoint_dir: A lit_llama checkpoint directory (lit_config.json, lit_model.*, tokenizer.model or tokenizer.json).
        output_path: The .gguf file to write (written to a temporary name, then renamed).
        outtype: f32, f16, bf16 (every matrix in that type) or q8_0 (8-bit blocks); norms stay F32.
        lora_path: An adapter from finetune/lora.py, merged into the base in fp32 before writing.
        name: general.name in the file (default: the checkpoint folder's name).
    """
    if output_path.suffix != ".gguf":
        raise ValueError(f"--output_path {str(output_path)!r} should end in .gguf (llama.cpp and Ollama look for it)")
    if output_path.is_dir():
        raise IsADirectoryError(f"--output_path {str(output_path)!r} is a folder; pass a file name ending in .gguf")
    t0 = time.perf_counter()
    counts = export_checkpoint(checkpoint_dir, output_path, outtype, lora_path, name)
    print(f"Wrote {output_path} ({output_path.stat().st_size / 2**20:.1f} MiB; tensors {counts}) in "
          f"{time.perf_counter() - t0:.1f} s, peak memory {peak_memory_mib(torch.device('cpu')):.0f} MiB", file=sys.stderr)
    return output_path


if __name__ == "__main__":
    run(main)
