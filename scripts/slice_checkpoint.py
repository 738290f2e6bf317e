"""Slice one of our checkpoints into Meta's model-parallel format (N consolidated.XX.pth + params.json).

    python scripts/slice_checkpoint.py --checkpoint_dir checkpoints/lit/7B --output_dir checkpoints/meta/7B-mp2 --shards 2

The result loads with Meta's reference code on N GPUs (torchrun --nproc_per_node N) and converts back
with scripts/convert_checkpoint.py. Only one shard is held in memory at a time: each is built from
slices read straight out of the source file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from lit_llama.checkpoint import (
    TOKENIZER_NAME,
    atomic_copy,
    atomic_path,
    atomic_write_text,
    check_output_dir,
    find_weights,
    load_config,
    load_weights,
)
from lit_llama.cli import run
from lit_llama.convert_meta import SliceReader, block_of, check_shards_divide, meta_shard, params_from_config
from lit_llama.runtime import peak_memory_mib


def slice_reader(weights_path: Path) -> SliceReader:
    """read(name, rows, cols) over a .safetensors or .pth file; each slice is a new tensor.

    The file is mapped anew for every block (and for the embedding and the head) and unmapped after
    it: pages read through a mapping count as resident while it lives, so one mapping held for the
    whole run would look as large as the whole file. `meta_shard` reads block by block.
    """
    current: dict[str, Any] = {"block": object(), "tensors": None}

    def tensors_for(name: str) -> Any:
        if block_of(name) != current["block"]:
            current["tensors"] = None  # unmap the previous block's mapping before mapping again
            if weights_path.suffix == ".safetensors":
                current["tensors"] = safe_open(str(weights_path), framework="pt")
            else:
                current["tensors"] = load_weights(weights_path)
            current["block"] = block_of(name)
        return current["tensors"]

    def read(name: str, rows: tuple[int, int], cols: tuple[int, int] | None) -> torch.Tensor:
        source = tensors_for(name)
        if weights_path.suffix == ".safetensors":
            view = source.get_slice(name)
            full_cols = slice(None) if cols is None else slice(*cols)
            t = view[rows[0]:rows[1]] if len(view.get_shape()) == 1 else view[rows[0]:rows[1], full_cols]
        else:
            t = source[name][rows[0]:rows[1]]
            t = t if cols is None else t[:, cols[0]:cols[1]]
        # clone: the slice is a view into the mapped file, and torch.save would write a view's whole
        # storage; a shard must own exactly its own memory.
        return t.clone()

    return read


def main(
    checkpoint_dir: Path = Path("checkpoints/lit/7B"),
    output_dir: Path = Path("checkpoints/meta/7B-mp2"),
    shards: int = 2,
) -> Path:
    """Write a checkpoint as N Meta-style model-parallel shards.

    Args:
        checkpoint_dir: One of our checkpoint folders (lit_config.json + lit_model.safetensors or .pth).
        output_dir: Where to write params.json, consolidated.00.pth .. consolidated.NN.pth and tokenizer.model.
        shards: How many model-parallel ranks to cut for; must divide n_head, n_kv_heads and every split size.
    """
    check_output_dir(output_dir, ("params.json", "consolidated.*.pth", TOKENIZER_NAME, ".*.tmp"))
    t0 = time.perf_counter()
    config = load_config(checkpoint_dir)
    weights_path = find_weights(checkpoint_dir)
    check_shards_divide(config, shards)
    read = slice_reader(weights_path)

    output_dir.mkdir(parents=True, exist_ok=True)
    total_bytes = 0
    for rank in tqdm(range(shards), desc="writing shards", unit="shard"):
        shard = meta_shard(config, read, rank, shards)
        with atomic_path(output_dir / f"consolidated.{rank:02d}.pth") as tmp:
            torch.save(shard, tmp)
        total_bytes += sum(t.numel() * t.element_size() for t in shard.values())
        del shard
    atomic_write_text(output_dir / "params.json", json.dumps(params_from_config(config), indent=2) + "\n")
    if (checkpoint_dir / TOKENIZER_NAME).is_file():
        atomic_copy(checkpoint_dir / TOKENIZER_NAME, output_dir / TOKENIZER_NAME)
    if config.tie_embeddings:
        print("note: the model ties its head to the embedding; Meta's format has no such flag, so output.weight "
              "is written as a copy and converting back gives an untied model with the same outputs", file=sys.stderr)
    peak_mib = peak_memory_mib(torch.device("cpu"))
    print(
        f"Wrote {shards} shard(s) of {total_bytes / shards / 1e6:.1f} MB each to {output_dir} "
        f"in {time.perf_counter() - t0:.1f} s; peak RSS {peak_mib:.0f} MiB",
        file=sys.stderr,
    )
    return output_dir


if __name__ == "__main__":
    run(main)
