"""Evaluate a checkpoint, with or without a LoRA adapter: perplexity on a token file and exact-match
accuracy on an instruction test set.

    python scripts/evaluate.py --checkpoint_dir out/quickstart/base --lora_path out/quickstart/lora/lit_model.lora.safetensors \
        --tokens_dir data/demo --instructions_file data/demo/test.json --out_file out/eval.json

Prints a table and writes every number (and each prediction) as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from lit_llama.adapter import AdapterMeta, apply_adapter, load_adapter
from lit_llama.checkpoint import atomic_write_text, load_model
from lit_llama.cli import run
from lit_llama.data import load_records
from lit_llama.evaluate import exact_match, perplexity
from lit_llama.lora import load_lora_model, merge_lora_weights
from lit_llama.model import LLaMA
from lit_llama.pretrain_data import load_tokens, read_meta, token_path
from lit_llama.runtime import set_threads
from lit_llama.tokenizer import Tokenizer


def load_for_eval(checkpoint_dir: Path, lora_path: Path | None) -> tuple[LLaMA, AdapterMeta | None]:
    """The model to evaluate (with the adapter merged in fp32) and the adapter's metadata."""
    if lora_path is None:
        return load_model(checkpoint_dir), None
    _, meta = load_adapter(lora_path)
    model = load_lora_model(checkpoint_dir, meta.lora)
    apply_adapter(model, lora_path)
    merge_lora_weights(model)
    return model.eval(), meta


def evaluate(
    checkpoint_dir: Path, lora_path: Path | None = None, tokens_dir: Path | None = None,
    instructions_file: Path | None = None, prompt_style: str | None = None, batch_size: int = 32,
    max_new_tokens: int = 16, split: str = "val",
) -> dict[str, Any]:
    """Everything main() measures, as a dict (the quickstart calls this directly)."""
    model, meta = load_for_eval(checkpoint_dir, lora_path)
    result: dict[str, Any] = {"checkpoint_dir": str(checkpoint_dir), "lora_path": str(lora_path) if lora_path else None}
    if tokens_dir is not None:
        tokens = torch.from_numpy(load_tokens(token_path(tokens_dir, split), read_meta(tokens_dir)["dtype"],
                                              model.config.vocab_size).astype("int64"))
        result["perplexity"] = perplexity(model, tokens, batch_size=batch_size)
    if instructions_file is not None:
        tokenizer = Tokenizer.from_checkpoint(checkpoint_dir, special_tokens=meta.special_tokens if meta else ())
        records = load_records(instructions_file)
        style = prompt_style or (meta and meta.prompt_style) or "alpaca"
        result["exact_match"] = exact_match(model, tokenizer, records, style, batch_size, max_new_tokens)
        result["exact_match"]["prompt_style"] = style
    return result


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """One column per evaluated model: perplexity, then exact match overall and per task."""
    names = list(rows)
    lines = [["metric", *names]]
    first = next(iter(rows.values()))
    if "perplexity" in first:
        lines.append(["perplexity", *(f"{rows[n]['perplexity']['perplexity']:.2f}" for n in names)])
    if "exact_match" in first:
        em = {n: rows[n]["exact_match"] for n in names}
        lines.append([f"exact match (n={em[names[0]]['n']})", *(f"{em[n]['accuracy']:.1%}" for n in names)])
        for task in em[names[0]]["per_task"]:
            lines.append([f"  {task}", *(f"{em[n]['per_task'][task]['accuracy']:.1%}" for n in names)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines)


def main(
    checkpoint_dir: Path = Path("out/quickstart/base"),
    lora_path: Path | None = None,
    tokens_dir: Path | None = None,
    instructions_file: Path | None = None,
    prompt_style: str | None = None,
    out_file: Path | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure perplexity and/or instruction exact match.

    Args:
        checkpoint_dir: The checkpoint directory to evaluate.
        lora_path: An adapter to apply on top (None: the checkpoint alone).
        tokens_dir: A folder written by scripts/prepare_text.py; perplexity is measured on its val.bin.
        instructions_file: A JSON/JSONL file of instruction/input/output records (optionally a "task" field).
        prompt_style: The prompt template; default: the adapter's, else alpaca.
        out_file: Where to write the results as JSON (None: print only).
        batch_size: Sequences per forward pass.
        max_new_tokens: Longest answer generated for exact match.
        threads: CPU threads for torch (default: the CPUs this process may use, less those other processes keep busy; one thread when the machine is busy, see howto/performance.md).
    """
    set_threads(threads)
    if tokens_dir is None and instructions_file is None:
        raise ValueError("nothing to evaluate: pass --tokens_dir and/or --instructions_file")
    name = "base+lora" if lora_path else "base"
    result = evaluate(checkpoint_dir, lora_path, tokens_dir, instructions_file, prompt_style, batch_size, max_new_tokens)
    print(format_table({name: result}))
    if out_file is not None:
        atomic_write_text(out_file, json.dumps(result, indent=2) + "\n")
        print(f"Wrote {out_file}", file=sys.stderr)
    return result


if __name__ == "__main__":
    run(main)
