"""Merge a LoRA adapter into its base model and write a standalone checkpoint directory.

    python scripts/merge_lora.py --checkpoint_dir checkpoints/lit/open_llama_7b \
        --lora_path out/lora/alpaca/lit_model.lora.safetensors --output_dir checkpoints/lit/open_llama_7b-alpaca

The result loads with generate/base.py and converts with scripts/convert_lit_checkpoint.py like any
other checkpoint. The base is memory-mapped and merged in fp32 one layer at a time, then cast back
to the base's dtype, so peak memory stays near one copy of the model. An adapter trained on a
quantized base (finetune/lora.py --quantize) is merged into that base, dequantized: the frozen
weights are rounded as they were in training (stderr says by how much); the checkpoint is not changed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

import torch

from lit_llama.adapter import copy_adapter_, load_adapter
from lit_llama.checkpoint import load_config, save_checkpoint
from lit_llama.cli import run
from lit_llama.lora import load_lora_model, merged_model
from lit_llama.qlora import match_training_base_

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    lora_path: Path = Path("out/lora/alpaca/lit_model.lora.safetensors"),
    output_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct-lora-merged"),
    dtype: Literal["keep", "float32", "bfloat16", "float16"] = "keep",
) -> Path:
    """Merge LoRA weights into the base weights.

    Args:
        checkpoint_dir: The base model's checkpoint directory.
        lora_path: The adapter file written by finetune/lora.py.
        output_dir: Where to write the merged checkpoint directory.
        dtype: dtype of the merged weights; keep = the base checkpoint's dtype.
    """
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError("--output_dir must differ from --checkpoint_dir; the base checkpoint is never overwritten")
    config = load_config(checkpoint_dir)  # a clear error for a wrong directory before anything heavy
    adapter, meta = load_adapter(lora_path)  # read once: the tensors are copied in below
    t0 = time.perf_counter()
    model = load_lora_model(checkpoint_dir, meta.lora, config=config)
    match_training_base_(model, meta.quantize)  # an adapter trained with --quantize: the base it saw (stderr says so)
    copy_adapter_(model, adapter, meta, lora_path.name)
    base_dtype = model.lm_head.weight.dtype
    # W += scaling * B A in fp32, cast back to W's dtype; a plain LLaMA takes the merged tensors by
    # assignment, with the config the adapter implies (tied stays tied; untied or grown vocab change it).
    merged = merged_model(model)
    out_dtype = base_dtype if dtype == "keep" else DTYPES[dtype]
    merged = merged.to(out_dtype)
    # With the base's tokenizer files, and the grown rows' tokens for Tokenizer.from_checkpoint.
    weights = save_checkpoint(merged, output_dir, tokenizer_dir=checkpoint_dir, special_tokens=meta.special_tokens)
    print(f"Merged {lora_path} (r={meta.lora.r}, targets {meta.lora.targets}) into {weights} "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return output_dir


if __name__ == "__main__":
    run(main)
