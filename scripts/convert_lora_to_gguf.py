"""Convert a lit_llama LoRA adapter into a llama.cpp LoRA adapter GGUF, to use beside the base model's GGUF.

    python scripts/convert_lora_to_gguf.py --checkpoint_dir checkpoints/lit/SmolLM2-135M-Instruct \
        --lora_path out/lora/alpaca/lit_model.lora.safetensors --output_path out/alpaca.lora.gguf
    llama-cli -m SmolLM2-135M-Instruct.f16.gguf --lora out/alpaca.lora.gguf

Targets query, key, value (each with its own rank), projection, mlp and an untied head convert; an
embedding LoRA, trained embeddings/head and a grown vocabulary do not (merge those with
scripts/convert_lit_to_gguf.py --lora_path). The code is lit_llama/export_gguf_adapter.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lit_llama.cli import run
from lit_llama.export_gguf_adapter import export_adapter


def main(
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    lora_path: Path = Path("out/lora/alpaca/lit_model.lora.safetensors"),
    output_path: Path = Path("out/gguf/alpaca.lora.gguf"),
) -> Path:
    """Write a llama.cpp LoRA adapter GGUF (general.type=adapter, F32 lora_a/lora_b tensors).

    Args:
        checkpoint_dir: The base model's lit_llama checkpoint directory (its config is checked against the adapter).
        lora_path: The adapter file written by finetune/lora.py.
        output_path: The .gguf file to write (written to a temporary name, then renamed).
    """
    if output_path.suffix != ".gguf":
        raise ValueError(f"--output_path {str(output_path)!r} should end in .gguf (llama.cpp and Ollama look for it)")
    n = export_adapter(checkpoint_dir, lora_path, output_path)
    print(f"Wrote {output_path} ({n} adapted tensors, {output_path.stat().st_size / 2**20:.2f} MiB); "
          f"use it with llama-cli -m BASE.gguf --lora {output_path}", file=sys.stderr)
    return output_path


if __name__ == "__main__":
    run(main)
