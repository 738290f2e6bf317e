"""Evaluation: perplexity on a token stream and exact-match accuracy on instruction records."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from tqdm import tqdm

from lit_llama.generation import generate
from lit_llama.model import LLaMA
from lit_llama.prompts import get_prompt_style
from lit_llama.tokenizer import Tokenizer


@torch.inference_mode()
def perplexity(model: LLaMA, tokens: torch.Tensor, block_size: int | None = None, batch_size: int = 8) -> dict[str, float]:
    """Perplexity of `tokens` (1-D) over non-overlapping windows of block_size tokens.

    Every token after the first of each window is predicted once, from the tokens before it in
    its window. Returns the mean loss (nats/token), the perplexity and the number of predicted tokens.
    """
    block_size = block_size or model.config.block_size
    device = next(model.parameters()).device
    n_windows = (len(tokens) - 1) // block_size
    if n_windows == 0:
        raise ValueError(f"the token file holds {len(tokens)} tokens, fewer than one window of {block_size + 1}")
    windows = tokens[: n_windows * block_size + 1]
    total_loss, total_tokens = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", leave=False):
        rows = range(start, min(start + batch_size, n_windows))
        x = torch.stack([windows[r * block_size: (r + 1) * block_size] for r in rows]).to(device)  # (B, T)
        y = torch.stack([windows[r * block_size + 1: (r + 1) * block_size + 1] for r in rows]).to(device)  # (B, T)
        logits = model(x).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        total_loss += loss.item()
        total_tokens += y.numel()
    mean = total_loss / total_tokens
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": total_tokens}


def response_of(text: str) -> str:
    """The answer in a generated response: its first line, stripped."""
    stripped = text.strip()
    return stripped.splitlines()[0].strip() if stripped else ""


@torch.inference_mode()
def exact_match(
    model: LLaMA,
    tokenizer: Tokenizer,
    records: list[dict[str, Any]],
    prompt_style: str = "alpaca",
    batch_size: int = 32,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    """Greedy answers to instruction records, scored by exact match with their `output`.

    Returns overall and per-`task` accuracy (records without a task count as "all") and the
    predictions themselves, so a report can show what went wrong.
    """
    style = get_prompt_style(prompt_style, tokenizer)
    device = next(model.parameters()).device
    predictions = []
    for start in tqdm(range(0, len(records), batch_size), desc="exact match", unit="batch", leave=False):
        batch = records[start: start + batch_size]
        prompts = [tokenizer.encode(style.format(r["instruction"], r.get("input", "")), bos=style.bos, device=device) for r in batch]
        longest = max(len(p) for p in prompts)
        budget = min(max_new_tokens, model.config.block_size - longest)
        if budget <= 0:
            raise ValueError(f"a prompt of {longest} tokens leaves no room to answer in the model's context of {model.config.block_size}")
        outputs = generate(model, prompts, budget, temperature=0, stop_ids=style.stop_ids(tokenizer), pad_id=tokenizer.pad_id)
        for record, prompt, out in zip(batch, prompts, outputs):
            predictions.append(response_of(tokenizer.decode(out[len(prompt):])))
    model.clear_kv_cache()

    per_task: dict[str, list[bool]] = defaultdict(list)
    for record, prediction in zip(records, predictions):
        per_task[record.get("task", "all")].append(prediction == record["output"].strip())
    hits = [h for task_hits in per_task.values() for h in task_hits]
    return {
        "accuracy": sum(hits) / len(hits),
        "n": len(hits),
        "per_task": {task: {"accuracy": sum(h) / len(h), "n": len(h)} for task, h in sorted(per_task.items())},
        "predictions": predictions,
    }
