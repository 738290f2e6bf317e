"""Where a script runs and in what dtype: device choice, precision names, CPU threads, peak memory."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

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
    """The CPUs this process may use, less those other processes keep busy now, at least one.

    Not simply every core: torch's threads meet at a barrier after every op, so a thread whose core
    another process holds stalls the others, and a small model runs thousands of short ops per
    token. Measured on a 2-core VM, greedy decoding (eager, batch 1, each run in its own process, 1 and
    2 threads interleaved, 3 rounds; howto/performance.md "Threads"): idle, 2 threads gave 0.94x the
    tokens/s of 1 thread for stories260K (0.23M parameters), 1.15x at 19M, 1.38x at 58M, 1.47x for
    SmolLM2-135M; with two other jobs running (load 5-8), 2 threads gave 0.07x, 0.16x, 0.18x and 0.12x
    (stories260K 16-549 tokens/s against 282-746 with one thread)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus - busy_cpus())


def busy_cpus(samples: int = 5, interval_s: float = 0.01) -> int:
    """Processes running or runnable right now besides this one: the fewest of a few looks at
    /proc/loadavg's running count (a load average would still count a job that ended a minute ago)."""
    loadavg = Path("/proc/loadavg")
    if not loadavg.is_file():
        return int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    counts = []
    for _ in range(samples):
        counts.append(int(loadavg.read_text().split()[3].split("/")[0]) - 1)  # "running/total"; minus this process
        time.sleep(interval_s)
    return max(0, min(counts))


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
