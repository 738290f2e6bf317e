"""Run one of this repo's scripts as `python SCRIPT ARGS...` would, and print its peak memory on exit.

    python scripts/run_with_peak_memory.py finetune/lora.py --data_dir data/alpaca ...

The training scripts print tokens/s but not their peak GPU memory; scripts/gpu_check.sh runs every
step through this so that each one's stderr ends with one line, whatever the step and however it
ended (an error exit included):

    gpu_check: peak memory 1234 MiB (torch.cuda.max_memory_allocated)

on CUDA (the most the tensors held at once, as generate/base.py reports it), else the process's
peak resident memory (max RSS). The script runs as __main__ in this process (runpy), so its exit
status is this process's.
"""

from __future__ import annotations

import atexit
import resource
import runpy
import sys
from pathlib import Path

import torch


def print_peak_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mib, source = torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    else:
        mib, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "max RSS"  # Linux: KiB
    print(f"gpu_check: peak memory {mib:.0f} MiB ({source})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2 or not Path(sys.argv[1]).is_file():
        print("error: pass the script to run and its arguments: run_with_peak_memory.py SCRIPT [ARGS...]", file=sys.stderr)
        sys.exit(2)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]  # what the script sees, as if started itself
    sys.path[0] = str(Path(script).resolve().parent)
    atexit.register(print_peak_memory)
    runpy.run_path(script, run_name="__main__")
