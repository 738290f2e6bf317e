"""Convert a Hugging Face LlamaForCausalLM folder into a lit_llama checkpoint directory.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/TinyLlama/TinyLlama-1.1B-Chat-v1.0 \
        --output_dir checkpoints/lit/TinyLlama-1.1B-Chat-v1.0

Reads config.json and the weights (*.safetensors or pytorch_model*.bin, sharded or not) one shard
at a time, and writes lit_config.json, lit_model.safetensors and a copy of the tokenizer files
(tokenizer.model, tokenizer.json, tokenizer_config.json, generation_config.json, ... whichever exist). With the default
safetensors output, peak memory stays near one input shard plus the tensor being written.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Literal

import torch
from tqdm import tqdm

from lit_llama.checkpoint import (
    CHECKPOINT_FILES,
    TOKENIZER_NAME,
    atomic_copy,
    atomic_path,
    check_output_dir,
    open_weights,
    save_config,
    save_weights,
    write_checksums,
    write_safetensors_streaming,
)
from lit_llama.cli import run
from lit_llama.convert_hf import IGNORED_HF, config_from_hf, hf_shapes, hf_to_lit_state_dict, lit_shapes
from lit_llama.json_file import read_json
from lit_llama.tokenizer import HF_TOKENIZER_FILES, HF_TOKENIZER_NAME

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ShardReader:
    """Read HF tensors by name from a folder's weight files, keeping at most `max_open` shards
    loaded (a tensor can sit in a different shard than its neighbours, e.g. q_proj and k_proj at a
    shard boundary). Safetensors and mmap-ed .bin files are only paged in as tensors are read."""

    def __init__(self, checkpoint_dir: Path, max_open: int = 2) -> None:
        self.dir = checkpoint_dir
        self.weight_map = find_weight_map(checkpoint_dir)  # HF name -> file name
        self.max_open = max_open
        self._open: OrderedDict[str, Callable[[str], torch.Tensor]] = OrderedDict()  # file -> tensor getter

    def _shard(self, file: str):
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        path = self.dir / file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in the index but missing; download the checkpoint again")
        _, shard = open_weights(path)
        self._open[file] = shard
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)  # drop the least recently used shard
        return shard

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ValueError(f"tensor {name} is missing from the weights in {self.dir}; is the download complete?")
        shard = self._shard(self.weight_map[name])
        return shard(name)


def find_weight_map(checkpoint_dir: Path) -> dict[str, str]:
    """Map every tensor name to the file holding it: from an index json, or by listing one file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = checkpoint_dir / index_name
        if index.is_file():
            weight_map = read_json(index, remedy="download the model again").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map object (tensor name -> file); download the model again")
            return dict(weight_map)
    files = sorted(checkpoint_dir.glob("*.safetensors")) or sorted(checkpoint_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors or pytorch_model*.bin weights in {checkpoint_dir}; download them with scripts/download.py"
        )
    weight_map = {}
    for path in files:  # several shards without an index: list each one's names
        weight_map.update({name: path.name for name in open_weights(path)[0]})
    return weight_map


def main(
    checkpoint_dir: Path = Path("checkpoints/TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    output_dir: Path = Path("checkpoints/lit/TinyLlama-1.1B-Chat-v1.0"),
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    format: Literal["safetensors", "pth"] = "safetensors",
) -> Path:
    """Convert a Hugging Face LlamaForCausalLM checkpoint folder to a lit_llama checkpoint.

    Args:
        checkpoint_dir: The Hugging Face folder (config.json, *.safetensors or pytorch_model*.bin, tokenizer.model).
        output_dir: Where to write lit_config.json, the weights and tokenizer.model.
        dtype: Store the weights in this dtype (default: the dtype of the input weights).
        format: safetensors (streamed, one tensor in memory at a time) or pth (holds the whole model in memory).
    """
    check_output_dir(output_dir, (*CHECKPOINT_FILES, ".*.tmp"))
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {str(checkpoint_dir)!r} does not exist; download one with "
            "python scripts/download.py --repo_id ORG/NAME"
        )
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {checkpoint_dir}; pass a Hugging Face model folder")
    config = config_from_hf(read_json(config_path, remedy="download the model again"))
    get = ShardReader(checkpoint_dir)

    # Fail before writing anything when a tensor is missing or something unknown is present.
    expected = hf_shapes(config)
    missing = [name for name in expected if name not in get.weight_map]
    if missing:
        raise ValueError(
            f"{len(missing)} tensor(s) missing from {checkpoint_dir}, e.g. {missing[0]}; is the download complete?"
        )
    extra = [n for n in get.weight_map if n not in expected and not IGNORED_HF.fullmatch(n)]
    if config.tie_embeddings:
        extra = [n for n in extra if n != "lm_head.weight"]  # some tied checkpoints store the head too
    if extra:
        raise ValueError(
            f"{len(extra)} tensor(s) in {checkpoint_dir} have no place in a LLaMA model, e.g. {extra[0]}; "
            "is this a LlamaForCausalLM checkpoint?"
        )

    out_dtype = DTYPES[dtype] if dtype else get("model.embed_tokens.weight").dtype
    shapes = lit_shapes(config)
    specs = {name: (out_dtype, shape) for name, shape in shapes.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # The generator maps one tensor when the writer asks for it; `lit_shapes` fixes the order of both.
    tensors = tqdm(hf_to_lit_state_dict(get, config), total=len(shapes), desc="Converting", unit="tensor")
    if format == "safetensors":
        weights_path = output_dir / "lit_model.safetensors"
        with atomic_path(weights_path) as tmp:
            write_safetensors_streaming(
                ((name, lambda t=t: t.to(out_dtype)) for name, t in tensors), specs, tmp, metadata={"format": "pt"}
            )
    else:
        weights_path = output_dir / "lit_model.pth"
        save_weights({name: t.to(out_dtype) for name, t in tensors}, weights_path)
    write_checksums(weights_path)
    save_config(config, output_dir)
    tokenizer_files = [name for name in (TOKENIZER_NAME, *HF_TOKENIZER_FILES) if (checkpoint_dir / name).is_file()]
    for name in tokenizer_files:  # Llama 3 / SmolLM2 folders have a tokenizer.json and no tokenizer.model
        atomic_copy(checkpoint_dir / name, output_dir / name)
    if not {TOKENIZER_NAME, HF_TOKENIZER_NAME} & set(tokenizer_files):
        print(f"note: no {TOKENIZER_NAME} or {HF_TOKENIZER_NAME} in {checkpoint_dir}; pass --tokenizer_path when generating",
              file=sys.stderr)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    print(
        f"Wrote {weights_path} ({n_params / 1e6:.2f} M parameters, {str(out_dtype).removeprefix('torch.')}, "
        f"{weights_path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.2f} s",
        file=sys.stderr,
    )
    return weights_path


if __name__ == "__main__":
    run(main)
