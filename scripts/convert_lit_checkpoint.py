"""Convert a lit_llama checkpoint directory into a Hugging Face LlamaForCausalLM folder.

    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/finetune/merged --output_dir out/hf

The output (config.json, model.safetensors, generation_config.json and the tokenizer files) loads with
`transformers.AutoModelForCausalLM.from_pretrained(output_dir)` and
`transformers.AutoTokenizer.from_pretrained(output_dir)` (no protobuf needed). A tied model stores only
model.embed_tokens.weight, with tie_word_embeddings=true, as transformers itself does.

Tokenizer files (lit_llama/hf_tokenizer_export.py): a SentencePiece tokenizer.model becomes a
tokenizer.json that encodes exactly as ours (BOS first, "<s>" typed in stays text), with
tokenizer_config.json, special_tokens_map.json, generation_config.json (bos/eos/pad ids) and a copy of
tokenizer.model; a merged adapter's special tokens (special_tokens.json) become added tokens at their
ids. A checkpoint with a Hugging Face tokenizer.json instead has its tokenizer files copied.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lit_llama.checkpoint import (
    TOKENIZER_FILES,
    atomic_path,
    atomic_write_text,
    check_output_dir,
    find_weights,
    load_config,
    open_weights,
    write_safetensors_streaming,
)
from lit_llama.cli import run
from lit_llama.convert_hf import config_to_hf, hf_shapes, lit_shapes, lit_to_hf_tensors
from lit_llama.hf_tokenizer_export import write_hf_tokenizer

# What this script writes into --output_dir (a rerun replaces them; a folder holding anything else is refused).
HF_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES, ".*.tmp")


def lazy_reader(weights_path: Path):
    """A name -> tensor function that reads one tensor at a time (safetensors) or maps the file (pth)."""
    names, get = open_weights(weights_path)
    return set(names), get


def main(
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    output_dir: Path = Path("out/hf/SmolLM2-135M-Instruct"),
) -> Path:
    """Convert a lit_llama checkpoint to a Hugging Face LlamaForCausalLM folder, with tokenizer files that
    transformers.AutoTokenizer loads and that encode as ours (tokenizer.json built from tokenizer.model,
    tokenizer_config.json, special_tokens_map.json, generation_config.json; a Hugging Face tokenizer is copied).

    Args:
        checkpoint_dir: A lit_llama checkpoint directory (lit_config.json, lit_model.*, tokenizer.model).
        output_dir: Where to write config.json, model.safetensors, generation_config.json and the tokenizer
            files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model).
    """
    check_output_dir(output_dir, HF_FILES)
    config = load_config(checkpoint_dir)  # both raise a one-line CheckpointError (a ValueError)
    weights_path = find_weights(checkpoint_dir)
    names, get = lazy_reader(weights_path)
    expected = set(lit_shapes(config))
    missing = sorted(expected - names)
    # A tied model saved with its head too is fine: the head is the embedding.
    extra = sorted(names - expected - ({"lm_head.weight"} if config.tie_embeddings else set()))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ValueError(
            f"{weights_path} does not match lit_config.json ({what}); merge a LoRA checkpoint into "
            "its base model before converting"
        )
    dtype = get("transformer.wte.weight").dtype
    shapes = hf_shapes(config)
    specs = {name: (dtype, shape) for name, shape in shapes.items()}

    output_dir.mkdir(parents=True, exist_ok=True)
    token_ids = write_hf_tokenizer(checkpoint_dir, output_dir, config)  # first: a bad tokenizer fails fast
    t0 = time.perf_counter()
    tensors = tqdm(lit_to_hf_tensors(get, config), total=len(shapes), desc="Converting", unit="tensor")
    with atomic_path(output_dir / "model.safetensors") as tmp:
        # transformers refuses safetensors files without format=pt in their metadata.
        write_safetensors_streaming(
            ((name, lambda t=t: t.to(dtype)) for name, t in tensors), specs, tmp, metadata={"format": "pt"}
        )
    hf_config = config_to_hf(config, torch_dtype=str(dtype).removeprefix("torch.")) | token_ids
    atomic_write_text(output_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    print(
        f"Wrote {output_dir / 'model.safetensors'} ({n_params / 1e6:.2f} M parameters) in {time.perf_counter() - t0:.2f} s; "
        f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(output_dir)!r})",
        file=sys.stderr,
    )
    return output_dir / "model.safetensors"


if __name__ == "__main__":
    run(main)
