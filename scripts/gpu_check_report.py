"""Read the step folders scripts/gpu_check.sh leaves and write its one JSON report.

    python scripts/gpu_check_report.py --steps_dir WORK/steps --output out/gpu_check/gpu_check.json

Each step folder (NN-name, in run order) holds `command` (one argument per line), and either
`skipped` (the reason) or `exit_code`, `wall_s`, `stdout` and `stderr`. The figures come from what
the scripts themselves write:

- tokens/s of a training step: the median of metrics.csv's `tokens_per_sec` rows after the first
  (the first log interval includes CUDA's warm-up), and `tokens_per_sec_overall` from the run's
  closing "Done: ... (N tokens/s)" line on stdout (validation and sampling included);
- tokens/s of a generation step: generate/base.py's "Generated N tokens in T s: X tokens/s" line,
  with its load and compilation times;
- peak memory: generate/base.py's own "peak memory N MiB" line (torch.cuda.max_memory_allocated on
  CUDA), else the line scripts/run_with_peak_memory.py prints at the step's exit.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from lit_llama.checkpoint import atomic_write_text
from lit_llama.cli import run

STDERR_TAIL_LINES = 20
PACKAGES = ("lightning", "jsonargparse", "sentencepiece", "tokenizers", "safetensors", "gguf", "bitsandbytes", "matplotlib")

GENERATED = re.compile(r"Generated (\d+) tokens? in ([\d.]+) s: ([\d.]+) tokens/s; peak memory ([\d.]+) MiB")
TRAINED = re.compile(r"Done: (\d+) steps, (\d+) trained tokens in ([\d.]+) s \(([\d.]+) tokens/s\)")
WRAPPER_PEAK = re.compile(r"gpu_check: peak memory ([\d.]+) MiB \(([^)]+)\)")
LOADED = re.compile(r"^Loaded .* in ([\d.]+) s$", re.MULTILINE)
COMPILED = re.compile(r"Compiled the decode step in ([\d.]+) s")


def flag(command: list[str], name: str) -> str | None:
    """The value after `--name` in a command, or None."""
    return command[command.index(name) + 1] if name in command[:-1] else None


def training_figures(command: list[str], output: str) -> dict[str, Any]:
    out_dir = flag(command, "--out_dir")
    rows = []
    if out_dir and (Path(out_dir) / "metrics.csv").is_file():
        with open(Path(out_dir) / "metrics.csv", newline="") as f:
            rows = [float(r["tokens_per_sec"]) for r in csv.DictReader(f) if r.get("tokens_per_sec")]
    figures: dict[str, Any] = {"tokens_per_sec": statistics.median(rows[1:] or rows) if rows else None}
    if done := TRAINED.search(output):
        figures.update(steps=int(done[1]), tokens=int(done[2]), train_s=float(done[3]),
                       tokens_per_sec_overall=float(done[4]))
    return figures


def generation_figures(output: str) -> dict[str, Any]:
    figures: dict[str, Any] = {"tokens_per_sec": None}
    if gen := GENERATED.search(output):
        figures.update(tokens=int(gen[1]), generate_s=float(gen[2]), tokens_per_sec=float(gen[3]),
                       peak_memory_mib=float(gen[4]), peak_memory_source="generate/base.py")
    if loaded := LOADED.search(output):
        figures["load_s"] = float(loaded[1])
    if compiled := COMPILED.search(output):
        figures["compile_s"] = float(compiled[1])
    return figures


def read_step(folder: Path) -> dict[str, Any]:
    command = (folder / "command").read_text().splitlines() if (folder / "command").is_file() else []
    step: dict[str, Any] = {"command": shlex.join(command), "precision": flag(command, "--precision")}
    if (folder / "skipped").is_file():
        return {**step, "status": "skipped", "reason": (folder / "skipped").read_text().strip()}
    exit_code = int((folder / "exit_code").read_text())
    stderr = (folder / "stderr").read_text(errors="replace")
    output = (folder / "stdout").read_text(errors="replace") + stderr  # Fabric prints the closing "Done:" line to stdout
    step.update(status="ok" if exit_code == 0 else "failed", exit_code=exit_code,
                wall_s=float((folder / "wall_s").read_text()))
    script = command[0] if command else ""
    if script.startswith(("pretrain/", "finetune/")):
        step.update(training_figures(command, output))
    elif script.startswith("generate/"):
        step.update(generation_figures(output))
    if step.get("peak_memory_mib") is None and (peak := WRAPPER_PEAK.search(output)):
        step.update(peak_memory_mib=float(peak[1]), peak_memory_source=peak[2])
    if exit_code != 0:
        step["stderr_tail"] = "\n".join(stderr.splitlines()[-STDERR_TAIL_LINES:])
    return step


def environment(device: str) -> dict[str, Any]:
    cuda = device == "cuda" and torch.cuda.is_available()
    return {
        "device": device, "python": sys.version.split()[0], "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
        "cuda_version": torch.version.cuda if cuda else None,
        "missing_packages": [p for p in PACKAGES if importlib.util.find_spec(p) is None],
    }


def main(
    steps_dir: Path = Path("out/gpu_check/steps"),
    output: Path = Path("out/gpu_check/gpu_check.json"),
    device: Literal["cuda", "cpu"] = "cuda",
    base_model: str = "",
) -> dict[str, Any]:
    """Collect scripts/gpu_check.sh's step folders into one JSON report and print a summary table.

    Args:
        steps_dir: The folder of step folders (NN-name) that scripts/gpu_check.sh wrote.
        output: The JSON file to write.
        device: The device the steps ran on (cuda or cpu), recorded with torch's view of it.
        base_model: What the finetuning and generation steps started from, in words.
    """
    folders = sorted(p for p in steps_dir.glob("[0-9][0-9]-*") if p.is_dir())
    if not folders:
        raise ValueError(f"{str(steps_dir)!r} holds no step folders (NN-name); run scripts/gpu_check.sh")
    steps = {folder.name.split("-", 1)[1]: read_step(folder) for folder in folders}
    report = {"ok": all(s["status"] != "failed" for s in steps.values()), "environment": environment(device),
              "base_model": base_model, "steps": steps}
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")

    def number(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    print(f"{'step':<18} {'status':<8} {'precision':<10} {'wall s':>7} {'tokens/s':>10} {'peak MiB':>9}")
    for name, s in steps.items():
        print(f"{name:<18} {s['status']:<8} {s['precision'] or '-':<10} {number(s.get('wall_s'), '.1f'):>7} "
              f"{number(s.get('tokens_per_sec'), '.0f'):>10} {number(s.get('peak_memory_mib'), '.0f'):>9}")
    print(f"Wrote {output}" + ("" if report["ok"] else f"; failed: {', '.join(n for n, s in steps.items() if s['status'] == 'failed')}"))
    return report


if __name__ == "__main__":
    run(main)
