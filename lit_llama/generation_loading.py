"""What a generate script loads: a checkpoint folder or a .gguf file, float or weight-only quantized.

    with checkpoint_folder(checkpoint) as folder:       # a .gguf: its config and tokenizer, in a temporary folder
        config, tokenizer = load_config(folder), Tokenizer.from_checkpoint(folder)
    model = load_for_generation(checkpoint, dtype, device, quantize, group_size, mmap, config)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lit_llama.checkpoint import load_model
from lit_llama.gguf_model import gguf_folder, is_gguf, load_gguf_model
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.weight_only import QuantizeMode, check_quantize, quantize_for_generation


@contextmanager
def checkpoint_folder(checkpoint: Path) -> Iterator[Path]:
    """The folder to read the config and the tokenizer from: `checkpoint` itself, or for a .gguf
    file a temporary folder with what its metadata holds (removed on exit)."""
    if is_gguf(checkpoint):
        with gguf_folder(checkpoint) as folder:
            yield folder
    else:
        yield checkpoint


def load_for_generation(
    checkpoint: Path, dtype: torch.dtype, device: torch.device, quantize: QuantizeMode = "none", group_size: int = 32,
    mmap: bool = True, config: LLaMAConfig | None = None,
) -> LLaMA:
    """The model of a checkpoint folder or a .gguf file, in `dtype` on `device`. Quantized
    (`quantize` int8 or int4 in groups of `group_size`, lit_llama/weight_only.py) from the weights
    as stored, memory-mapped, one layer at a time; a .gguf file's Q4_0/Q4_1 codes are kept as they
    are for int4 (lit_llama/gguf_model.py). `mmap` and `config`: as in `checkpoint.load_model`."""
    check_quantize(quantize, group_size, dtype, device)
    if is_gguf(checkpoint):
        return load_gguf_model(checkpoint, dtype, device, quantize, group_size)
    if quantize == "none":
        return load_model(checkpoint, dtype=dtype, device=device, mmap=mmap, config=config)
    model = load_model(checkpoint, device=device, mmap=True, config=config)  # the stored dtype: quantized from fp32 when it is
    return quantize_for_generation(model, quantize, group_size, dtype)


def refuse_gguf_with_adapter(checkpoint: Path) -> None:
    if is_gguf(checkpoint):
        raise ValueError("a LoRA adapter needs its base as a checkpoint folder, not a .gguf file; convert it with "
                         "scripts/convert_gguf_checkpoint.py --gguf_path FILE --output_dir DIR and pass DIR")
