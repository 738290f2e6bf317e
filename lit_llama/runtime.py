"""Where a script runs and in what dtype: device choice, precision names, peak memory."""

from __future__ import annotations

import resource

import torch

PRECISIONS = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


def resolve_device(accelerator: str) -> torch.device:
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError("--accelerator cuda was asked for but no CUDA device is available; use --accelerator cpu")
    return torch.device(accelerator)


def prepare_run(accelerator: str, precision: str, seed: int) -> torch.device:
    """What every generate script does first: the device, a precision it can run, the sampling seed."""
    device = resolve_device(accelerator)
    if precision == "16-true" and device.type == "cpu":
        raise ValueError("--precision 16-true needs a GPU; on CPU use 32-true or bf16-true")
    torch.manual_seed(seed)
    return device


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def count(n: int, noun: str) -> str:
    """`n` and the noun in the number it takes: "1 token", "12 tokens"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
