"""Autoregressive generation over the KV cache, as small named steps:
logits_to_probs -> sample, prefill (the prompt in one forward), decode_one_token, generate.

A batch may hold prompts of different lengths: they are left-padded to a common length and the
padding slots are masked out of attention. RoPE only sees differences of positions, so shifting a
prompt right does not change its result (beyond float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Callable

import torch

from lit_llama.model import LLaMA


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) > top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from (B, V) logits; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.float().argmax(-1)  # CPU's argmax is 3x slower over bf16 than over fp32
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: LLaMA, idx: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Run the (B, T) prompt through the model, filling the KV cache; logits of the last position (B, V).
    Only that position goes through the head: the others' logits would be T - 1 wasted (C, V) matmuls."""
    input_pos = torch.arange(idx.size(1), device=idx.device)
    hidden = model(idx, input_pos, key_valid, return_hidden=True)  # (B, T, C)
    return model.lm_head(hidden[:, -1:])[:, -1]  # (B, V); heads see (B, T, C) as always


def decode_one_token(model: LLaMA, token: torch.Tensor, input_pos: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """One step: token (B, 1) at position input_pos (1,) -> logits (B, V)."""
    return model(token, input_pos, key_valid)[:, -1]


def check_fits_context(model: LLaMA, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's context of "
            f"{model.config.block_size}; shorten the prompt or lower max_new_tokens"
        )


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths right-aligned: ids (B, L) and the pad lengths (B,)."""
    longest = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=prompts[0].device)
    for row, p in enumerate(prompts):
        idx[row, longest - len(p):] = p
    pads = torch.tensor([longest - len(p) for p in prompts], device=idx.device)
    return idx, pads


def _stop_tensor(stop_ids: Sequence[int] | int | None, device: torch.device) -> torch.Tensor | None:
    ids = _ids_list(stop_ids)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


@torch.inference_mode()
def generate_tokens(
    model: LLaMA,
    prompts: list[torch.Tensor] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] | int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    decode_fn: Callable = decode_one_token,
) -> Iterator[torch.Tensor]:
    """The one generation loop: yields each step's new tokens (B,) for the prompts (1-D id tensors,
    any lengths; a (B, T) tensor is B prompts), at most `max_new_tokens` steps, ending early once every
    row has sampled one of `stop_ids` (a row that has stopped keeps being sampled until then; the
    caller cuts it). `decode_fn` is the per-token step, so a caller can pass a compiled `decode_one_token`.
    """
    if isinstance(prompts, torch.Tensor):
        prompts = list(prompts) if prompts.dim() == 2 else [prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (encode with bos=True)")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive number of tokens, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (the probability mass kept), got {top_p}")
    idx, pads = left_pad(prompts, pad_id)
    B, L = idx.shape
    check_fits_context(model, L, max_new_tokens)
    total = L + max_new_tokens
    cache = model.transformer.h[0].attn.kv_cache
    if cache is None or cache.k.shape[0] != B or cache.k.shape[2] < total:
        model.set_kv_cache(B, total)
    cache_len = model.transformer.h[0].attn.kv_cache.k.shape[2]
    slots = torch.arange(cache_len, device=idx.device)
    key_valid = (slots[None, :] >= pads[:, None]) if bool(pads.any()) else None  # (B, S)
    stops = _stop_tensor(stop_ids, idx.device)

    positions = torch.arange(L, total, device=idx.device)  # where each new token goes, made once
    stopped = torch.zeros(B, dtype=torch.bool, device=idx.device)
    eager = decode_fn is decode_one_token
    logits = prefill(model, idx, key_valid)
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        yield token
        if stops is not None:
            stopped |= torch.isin(token, stops)
            if bool(stopped.all()):
                return
        if step + 1 < max_new_tokens:
            # Every step passes the same shapes and objects, so once the first has passed dynamo's
            # guards (compiling if needed) a compiled decode_fn need not re-check them: 0.35 -> 0.1 ms a
            # token. The eager step has no guards, and set_stance would import dynamo for it (about 1 s).
            with nullcontext() if eager else torch.compiler.set_stance("default", skip_guard_eval_unsafe=step > 0):
                logits = decode_fn(model, token[:, None], positions[step:step + 1], key_valid)


@torch.inference_mode()
def generate(
    model: LLaMA,
    prompts: list[torch.Tensor] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] | int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    decode_fn: Callable = decode_one_token,
) -> list[torch.Tensor]:
    """Continue each prompt (1-D id tensors, any lengths) by up to `max_new_tokens` tokens.

    Returns one tensor per prompt: the prompt followed by its new tokens, stopping before the first
    of `stop_ids` (one id or several: a tokenizer's `stop_ids`, e.g. Llama 3's <|eot_id|> and
    <|end_of_text|>). The loop is `generate_tokens`.
    """
    if isinstance(prompts, torch.Tensor):
        prompts = list(prompts) if prompts.dim() == 2 else [prompts]
    steps = list(generate_tokens(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids, pad_id,
                                 generator, decode_fn))
    device = prompts[0].device
    new_tokens = torch.stack(steps, dim=1) if steps else torch.empty(len(prompts), 0, dtype=torch.long, device=device)
    n_new = new_tokens.shape[1]
    lengths = torch.full((len(prompts),), n_new, dtype=torch.long, device=device)
    stops = _stop_tensor(stop_ids, device)
    if stops is not None and n_new:
        is_stop = torch.isin(new_tokens, stops)  # (B, n_new)
        lengths = torch.where(is_stop.any(1), is_stop.int().argmax(1), lengths)  # argmax: the first stop
    return [torch.cat([p, new_tokens[row, : int(lengths[row])]]) for row, p in enumerate(prompts)]


def stream(
    model: LLaMA,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] | int | None = None,
    generator: torch.Generator | None = None,
    decode_fn: Callable = decode_one_token,
) -> Iterator[int]:
    """The new token ids of one prompt (1-D), each as soon as it is sampled, ending before a stop id
    (which is not yielded) or after `max_new_tokens`. The loop is `generate_tokens`."""
    stops = set(_ids_list(stop_ids))
    for token in generate_tokens(model, [prompt], max_new_tokens, temperature, top_k, top_p, stop_ids,
                                 generator=generator, decode_fn=decode_fn):
        token_id = int(token[0])
        if token_id in stops:
            return
        yield token_id


def _ids_list(stop_ids: Sequence[int] | int | None) -> list[int]:
    return [] if stop_ids is None else [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
