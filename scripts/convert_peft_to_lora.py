"""Convert a PEFT LoRA adapter of a Hugging Face LLaMA into a lit_llama adapter.

    python scripts/convert_peft_to_lora.py --peft_dir out/peft/alpaca --checkpoint_dir checkpoints/lit/stories260K \
        --output_path out/lora/from_peft.lora.safetensors

The base checkpoint is the lit_llama conversion of the HF model the adapter was trained on; its
config gives the head counts needed to undo HF's RoPE row permutation. The result works with
generate/lora.py and scripts/merge_lora.py like an adapter finetune/lora.py wrote.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open

from lit_llama.adapter import adapter_metadata, write_adapter
from lit_llama.checkpoint import load_config, load_weights
from lit_llama.cli import run
from lit_llama.json_file import read_json
from lit_llama.lora import is_lora_key
from lit_llama.peft_interop import peft_to_lora


def read_peft_dir(peft_dir: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """adapter_model.safetensors (or .bin, read with weights_only=True), adapter_config.json, metadata;
    a damaged file, a pickle holding code and a config that is not a JSON object are one-line errors."""
    if not peft_dir.is_dir():
        raise NotADirectoryError(f"--peft_dir {str(peft_dir)!r} is not a folder; pass the folder PEFT's save_pretrained wrote")
    config_path = peft_dir / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no adapter_config.json in {str(peft_dir)!r}; pass the folder PEFT's save_pretrained wrote")
    adapter_config = read_json(config_path, remedy="save the PEFT adapter again")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = peft_dir / name
        if path.is_file():
            tensors = load_weights(path, mmap=path.suffix == ".safetensors")  # safetensors, or weights_only=True
            if not isinstance(tensors, dict):
                raise ValueError(f"{path} holds a {type(tensors).__name__}, not a dict of tensors; is it a PEFT adapter?")
            if path.suffix != ".safetensors":
                return tensors, adapter_config, {}
            with safe_open(path, "pt") as f:
                return tensors, adapter_config, f.metadata() or {}
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
