"""Autoregressive generation over the KV cache, as small named steps:
logits_to_probs -> sample, prefill (the prompt in one forward), decode_one_token, generate.

A batch may hold prompts of different lengths: they are left-padded to a common length and the
padding slots are masked out of attention. RoPE only sees differences of positions, so shifting a
prompt right does not change its result (beyond float rounding).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from lit_llama.model import LLaMA
from lit_llama.prompts import get_prompt_style


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


@torch.inference_mode()
def generate(
    model: LLaMA,
    prompts: list[torch.Tensor] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    decode_fn: Callable = decode_one_token,
) -> list[torch.Tensor]:
    """Continue each prompt (1-D id tensors, any lengths) by up to `max_new_tokens` tokens.

    Returns one tensor per prompt: the prompt followed by its new tokens, stopping before EOS.
    `decode_fn` is the per-token step, so a caller can pass a compiled `decode_one_token`.
    """
    if isinstance(prompts, torch.Tensor):
        prompts = list(prompts) if prompts.dim() == 2 else [prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (encode with bos=True)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive number of tokens, got {top_k}")
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

    positions = torch.arange(L, total, device=idx.device)  # where each new token goes, made once
    new_tokens = torch.empty(B, max_new_tokens, dtype=torch.long, device=idx.device)
    # A row's length is max_new_tokens until it emits EOS; then it is the EOS position.
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=idx.device)
    n_new = 0
    eager = decode_fn is decode_one_token
    logits = prefill(model, idx, key_valid)
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        new_tokens[:, step] = token
        n_new = step + 1
        if eos_id is not None:
            lengths = torch.where((token == eos_id) & (lengths == max_new_tokens), step, lengths)
            if bool((lengths < max_new_tokens).all()):
                break
        if step + 1 < max_new_tokens:
            # Every step passes the same shapes and objects, so once the first has passed dynamo's
            # guards (compiling if needed) a compiled decode_fn need not re-check them: 0.35 -> 0.1 ms a
            # token. The eager step has no guards, and set_stance would import dynamo for it (about 1 s).
            with nullcontext() if eager else torch.compiler.set_stance("default", skip_guard_eval_unsafe=step > 0):
                logits = decode_fn(model, token[:, None], positions[step:step + 1], key_valid)
    return [torch.cat([p, new_tokens[row, : min(int(lengths[row]), n_new)]]) for row, p in enumerate(prompts)]


# ------------------------------------------------- text samples of a model in training, for eyeballing
def instruction_sampler(
    tokenizer, prompt_style: str, instruction: str, max_new_tokens: int = 64
) -> Callable[[torch.nn.Module], str]:
    """A function that greedily answers `instruction` with the model in training, for eyeballing progress."""
    return greedy_sampler(tokenizer, get_prompt_style(prompt_style).format(instruction), max_new_tokens)


def greedy_sampler(
    tokenizer, prompt: str, max_new_tokens: int, keep_prompt: bool = False
) -> Callable[[torch.nn.Module], str]:
    """A function that greedily continues `prompt` with the model in training (the continuation, or
    prompt + continuation with `keep_prompt`), then puts the model back in training mode."""
    def sample(model: torch.nn.Module) -> str:
        inner = getattr(model, "module", model)
        device = next(inner.parameters()).device
        ids = tokenizer.encode(prompt, bos=True, device=device)
        budget = min(max_new_tokens, inner.config.block_size - len(ids))
        if budget <= 0:
            return ""
        inner.eval()
        out = generate(inner, [ids], budget, temperature=0, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)[0]
        inner.clear_kv_cache()
        inner.train()
        return tokenizer.decode(out if keep_prompt else out[len(ids):])

    return sample
