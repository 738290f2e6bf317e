"""Check that a checkpoint's weights are intact: the sha256 that save_checkpoint recorded, and every tensor finite.

    python scripts/verify_checkpoint.py checkpoints/lit/SmolLM2-135M-Instruct

Checkpoints written by finetune/full.py, pretrain/base.py and scripts/merge_lora.py carry checksums.sha256
(the weights file's sha256, the format `sha256sum -c checksums.sha256` reads); a flipped byte anywhere
in the file fails it. Converted checkpoints have none, and only the finiteness check runs. Tensors are
read one at a time, so a checkpoint larger than RAM can be verified. Exit status 2 names what is wrong.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lit_llama.checkpoint import verify_checkpoint
from lit_llama.cli import run


def main(checkpoint_dir: Path) -> dict[str, object]:
    """Verify a checkpoint folder's weights (checksum, finite tensors).

    Args:
        checkpoint_dir: The checkpoint folder (lit_config.json, lit_model.safetensors or .pth).
    """
    t0 = time.perf_counter()
    result = verify_checkpoint(checkpoint_dir)
    seconds = time.perf_counter() - t0
    print(
        f"OK: {result['weights']}: {result['tensors']} tensors finite, checksum {result['checksum']}; "
        f"{result['bytes'] / 2**20:.1f} MiB in {seconds:.2f} s ({result['bytes'] / 2**20 / max(seconds, 1e-9):.0f} MiB/s)",
        file=sys.stderr,
    )
    return result


if __name__ == "__main__":
    run(main, positional=True)
