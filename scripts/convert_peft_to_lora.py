"""Convert a PEFT LoRA adapter of a Hugging Face LLaMA into a lit_llama adapter.

    python scripts/convert_peft_to_lora.py --peft_dir out/peft/alpaca --checkpoint_dir checkpoints/lit/stories260K \
        --output_path out/lora/from_peft.lora.safetensors

The base checkpoint is the lit_llama conversion of the HF model the adapter was trained on; its
config gives the head counts needed to undo HF's RoPE row permutation. The result works with
generate/lora.py and scripts/merge_lora.py like an adapter finetune/lora.py wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lit_llama.adapter import adapter_metadata, write_adapter
from lit_llama.checkpoint import load_config
from lit_llama.cli import run
from lit_llama.lora import is_lora_key
from lit_llama.peft_interop import peft_to_lora


def read_peft_dir(peft_dir: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """adapter_model.safetensors (or .bin, read with weights_only=True), adapter_config.json, metadata."""
    config_path = peft_dir / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no adapter_config.json in {str(peft_dir)!r}; pass the folder PEFT's save_pretrained wrote")
    adapter_config = json.loads(config_path.read_text())
    if (peft_dir / "adapter_model.safetensors").is_file():
        with safe_open(peft_dir / "adapter_model.safetensors", "pt") as f:
            metadata = f.metadata() or {}
        return load_file(peft_dir / "adapter_model.safetensors"), adapter_config, metadata
    if (peft_dir / "adapter_model.bin").is_file():
        return torch.load(peft_dir / "adapter_model.bin", map_location="cpu", weights_only=True), adapter_config, {}
    raise FileNotFoundError(f"no adapter_model.safetensors or adapter_model.bin in {str(peft_dir)!r}")


def main(
    peft_dir: Path = Path("out/peft/alpaca"),
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    output_path: Path = Path("out/lora/from_peft.lora.safetensors"),
    prompt_style: str | None = None,
) -> Path:
    """Write a lit_llama adapter from a PEFT adapter folder.

    Args:
        peft_dir: The PEFT adapter folder (adapter_config.json, adapter_model.safetensors).
        checkpoint_dir: The lit_llama base checkpoint (converted from the HF model the adapter belongs to).
        output_path: The adapter file to write (.safetensors or .pth).
        prompt_style: Prompt template to record (default: the one a lit_llama export stored, else none).
    """
    config = load_config(checkpoint_dir)
    tensors, adapter_config, metadata = read_peft_dir(peft_dir)
    state_dict, lora = peft_to_lora(tensors, adapter_config, config)
    style = prompt_style or metadata.get("lit_llama.prompt_style") or None
    embedding_layers = tuple(k for k in state_dict if not is_lora_key(k))
    write_adapter(state_dict, output_path, adapter_metadata(lora, config, style, embedding_layers))
    print(f"Wrote {output_path} (r={lora.r}, alpha={lora.alpha:g}, targets {lora.targets})", file=sys.stderr)
    return output_path


if __name__ == "__main__":
    run(main)
