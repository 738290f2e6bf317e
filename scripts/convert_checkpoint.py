"""Convert Meta's original LLaMA checkpoint (params.json + consolidated.XX.pth shards) to ours.

    python scripts/convert_checkpoint.py --checkpoint_dir checkpoints/meta/7B --output_dir checkpoints/lit/7B

Writes lit_model.safetensors, lit_config.json and tokenizer.model into --output_dir. The shards are
memory-mapped and each of our tensors is assembled from them and written on its own, so memory use
stays near the largest single tensor, whatever the model size.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from lit_llama.checkpoint import (
    TOKENIZER_NAME,
    atomic_copy,
    atomic_path,
    load_weights,
    save_config,
    write_safetensors_streaming,
)
from lit_llama.cli import run
from lit_llama.convert_meta import (
    block_of,
    config_from_params,
    embedding_split_dim,
    expected_shapes,
    merge_parts,
    merged_shape,
    name_plan,
    validate_shards,
)
from lit_llama.json_file import read_json
from lit_llama.runtime import peak_memory_mib

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_shards(checkpoint_dir: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, checked to be numbered without gaps."""
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(checkpoint_dir)!r} does not exist; pass the folder with params.json and consolidated.*.pth")
    if not (checkpoint_dir / "params.json").is_file():
        raise FileNotFoundError(f"no params.json in {str(checkpoint_dir)!r}; pass the folder of one model from Meta's download (e.g. llama/7B)")
    shards = sorted(checkpoint_dir.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"no consolidated.*.pth in {str(checkpoint_dir)!r}; the download looks incomplete")
    ranks = [int(m.group(1)) for p in shards if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", p.name))]
    if ranks != list(range(len(shards))):
        raise FileNotFoundError(
            f"shards in {str(checkpoint_dir)!r} are numbered {ranks}, expected 0..{len(shards) - 1}; a shard is missing"
        )
    return shards


def find_tokenizer(checkpoint_dir: Path, tokenizer_path: Path | None) -> Path | None:
    """--tokenizer_path, else tokenizer.model in the model folder or in its parent (Meta's layout)."""
    if tokenizer_path is not None:
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"--tokenizer_path {str(tokenizer_path)!r} does not exist")
        return tokenizer_path
    for candidate in (checkpoint_dir / TOKENIZER_NAME, checkpoint_dir.parent / TOKENIZER_NAME):
        if candidate.is_file():
            return candidate
    return None


def main(
    checkpoint_dir: Path = Path("checkpoints/meta/7B"),
    output_dir: Path = Path("checkpoints/lit/7B"),
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    tokenizer_path: Path | None = None,
    block_size: int = 4096,
) -> Path:
    """Convert a Meta checkpoint folder into a lit_llama checkpoint folder.

    Args:
        checkpoint_dir: The folder with params.json and consolidated.00.pth .. consolidated.NN.pth.
        output_dir: Where to write lit_model.safetensors, lit_config.json and tokenizer.model.
        dtype: Store the weights in this dtype; default: the dtype of the shards (Meta ships bfloat16/float16).
        tokenizer_path: The SentencePiece tokenizer.model; default: the one in checkpoint_dir or its parent.
        block_size: Context length (not in params.json): LLaMA 1 2048, Llama 2 4096, Llama 3 8192.
    """
    t0 = time.perf_counter()
    shard_paths = find_shards(checkpoint_dir)
    tokenizer = find_tokenizer(checkpoint_dir, tokenizer_path)
    params = read_json(checkpoint_dir / "params.json", remedy="download the model again")

    # A first pass over the (memory-mapped) shards reads only their headers: names and shapes.
    shards = [load_weights(p) for p in shard_paths]
    if "tok_embeddings.weight" not in shards[0]:
        raise ValueError(f"{shard_paths[0]} has no tok_embeddings.weight; is this a Meta LLaMA checkpoint?")
    if not isinstance(params.get("dim"), int):
        raise ValueError(f"{checkpoint_dir / 'params.json'} has no integer 'dim'; is this Meta's params.json?")
    embedding = tuple(shards[0]["tok_embeddings.weight"].shape)
    embedding_split = embedding_split_dim(embedding, params["dim"], len(shards))
    vocab_size = embedding[0] * (len(shards) if embedding_split == 0 else 1)
    config = config_from_params(params, vocab_size, block_size)
    validate_shards(shards, config.n_layer)
    plan = name_plan(config.n_layer, embedding_split)
    expected = expected_shapes(config)
    target = DTYPES[dtype] if dtype else None
    specs = {}
    for ours, parts in plan.items():
        shape = merged_shape(shards, parts)
        if shape != expected[ours]:
            raise ValueError(
                f"{ours}: the shards give shape {shape} but params.json implies {expected[ours]}; "
                "params.json does not describe these shards"
            )
        specs[ours] = (target or shards[0][parts[0][0]].dtype, shape)
    del shards

    def tensors():
        # The shards are mapped again for every block (and for the embedding and the head) and
        # unmapped after it: pages read through a mapping count as resident until it is unmapped,
        # so mappings held for the whole run would make the process look as large as the checkpoint.
        group, shards = object(), None
        for ours, parts in plan.items():
            if block_of(ours) != group:
                group, shards = block_of(ours), None
                shards = [load_weights(p) for p in shard_paths]
            yield ours, lambda: merge_parts(shards, parts, target)

    output_dir.mkdir(parents=True, exist_ok=True)
    weights_path = output_dir / "lit_model.safetensors"
    with atomic_path(weights_path) as tmp:
        bar = tqdm(tensors(), total=len(plan), desc=f"merging {len(shard_paths)} shard(s)", unit="tensor")
        write_safetensors_streaming(bar, specs, tmp)
    save_config(config, output_dir)
    if tokenizer is not None:
        atomic_copy(tokenizer, output_dir / TOKENIZER_NAME)
    else:
        print(f"note: no {TOKENIZER_NAME} found next to the shards; pass --tokenizer_path to copy one", file=sys.stderr)

    n_params = sum(torch.Size(shape).numel() for _, shape in specs.values())
    size_gb = weights_path.stat().st_size / 1e9
    peak_mib = peak_memory_mib(torch.device("cpu"))
    print(
        f"Wrote {weights_path} ({n_params / 1e6:.1f} M parameters, {size_gb:.2f} GB) from {len(shard_paths)} shard(s) "
        f"in {time.perf_counter() - t0:.1f} s; peak RSS {peak_mib:.0f} MiB",
        file=sys.stderr,
    )
    return weights_path


if __name__ == "__main__":
    run(main)
