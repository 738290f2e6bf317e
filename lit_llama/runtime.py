"""Where a script runs and in what dtype: device choice, precision names, CPU threads, peak memory."""

from __future__ import annotations

import os
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


def default_threads() -> int:
    """The CPUs this process may use, less those other processes keep busy (the 1-minute load
    average, rounded down), at least one. Not simply every core: torch's threads meet at a barrier
    after every op, so a thread whose core another process holds stalls the others, and a small model
    does thousands of short ops per token. Measured on a 2-core VM, decoding (eager, batch 1, each run
    in its own process, 1 and 2 threads interleaved; howto/performance.md "Threads"): with a load of
    5-8 from other work, 2 threads gave 0.07-0.18x the tokens/s of 1 thread (stories260K 16-549 vs
    282-746, SmolLM2-135M 1-29 vs 10-25); on the idle machine 2 threads gave SmolLM2-135M 1.4x."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(cpus, cpus - busy))


def set_threads(threads: int | None) -> int:
    """torch's CPU threads for this run: `threads`, or `default_threads()` when None; returns it."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}")
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def count(n: int, noun: str) -> str:
    """`n` and the noun in the number it takes: "1 token", "12 tokens"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
