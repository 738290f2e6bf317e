"""Convert a lit_llama LoRA adapter into a PEFT adapter for the Hugging Face export of its base.

    python scripts/convert_lit_checkpoint.py --checkpoint_dir checkpoints/lit/stories260K --output_dir out/hf/stories260K
    python scripts/convert_lora_to_peft.py --lora_path out/lora/alpaca/lit_model.lora.safetensors --output_dir out/peft/alpaca

The output folder (adapter_config.json, adapter_model.safetensors) loads with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("out/hf/stories260K"), "out/peft/alpaca")`.
The fused c_attn LoRA is split into q_proj/k_proj/v_proj, and the q/k rows of B get HF's RoPE
permutation, as the base checkpoint converter does for the weights (see howto/peft_interop.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lit_llama.adapter import check_adapter_base, load_adapter
from lit_llama.checkpoint import atomic_dir, load_config, save_weights
from lit_llama.cli import run
from lit_llama.model import LLaMAConfig
from lit_llama.peft_interop import lora_to_peft

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")


def main(
    lora_path: Path = Path("out/lora/alpaca/lit_model.lora.safetensors"),
    output_dir: Path = Path("out/peft/alpaca"),
    checkpoint_dir: Path | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors for PEFT.

    Args:
        lora_path: The lit_llama adapter (.lora.safetensors or .lora.pth).
        output_dir: Where to write the PEFT adapter folder.
        checkpoint_dir: The base checkpoint; needed only for adapters without a stored base config (lit-llama's).
        base_model_name_or_path: Recorded in adapter_config.json (e.g. the HF folder or hub id of the base).
    """
    state_dict, meta = load_adapter(lora_path)
    if checkpoint_dir is not None:
        config = load_config(checkpoint_dir)
        check_adapter_base(meta, config, lora_path.name)
    elif meta.base_config is not None:
        config = LLaMAConfig(**meta.base_config)
    else:
        raise ValueError(f"{lora_path} does not record its base model; pass --checkpoint_dir with the base checkpoint")
    tensors, adapter_config = lora_to_peft(state_dict, meta.lora, config, base_model_name_or_path)
    # transformers/PEFT expect format=pt; the prompt style rides along for the way back.
    metadata = {"format": "pt", "lit_llama.prompt_style": meta.prompt_style or ""}
    # The two files appear together or not at all; a folder holding anything else is refused.
    with atomic_dir(output_dir, PEFT_FILES, what="a PEFT adapter's") as tmp:
        save_weights(tensors, tmp / "adapter_model.safetensors", metadata=metadata)
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    n = sum(t.numel() for t in tensors.values())
    print(
        f"Wrote {output_dir} ({len(tensors)} tensors, {n:,} parameters; targets {', '.join(adapter_config['target_modules'])})",
        file=sys.stderr,
    )
    return output_dir


if __name__ == "__main__":
    run(main)
