"""Many LoRA adapters over one frozen base, unmerged, in one batch (howto/multi_adapter.md).

Each row of a batch names its adapter (or None: the base model). Every adapted layer keeps its
base weight once and a stack of all adapters' updates as low-rank factors,
    stack_A (N+1, R, in)    stack_B (N+1, out, R)      update of adapter n = stack_B[n] @ stack_A[n]
(slot N is all zeros: the base), with each adapter's scaling folded into B and ranks zero-padded to
the largest R. A forward computes the base matmul for the whole batch, then the rows' own updates
as one gathered, batched matmul:
    y = x W^T + bmm(bmm(x, A_rows^T), B_rows^T)        A_rows = stack_A[ids] (B, R, in)
so N adapters cost one base forward plus two small bmm's per layer, not N forwards. The gathered
A_rows/B_rows are built once per `set_adapter_ids` and reused for every decoding step.

    model = load_multi_lora_model("checkpoints/base", ["a.lora.safetensors", "b.lora.safetensors"])
    set_adapter_ids(model, [0, 1, None])          # row 0: adapter a, row 1: b, row 2: the base
    logits = model(idx)                           # idx (3, T), the training-style forward
    outs = generate_with_adapters(model, prompts, [0, 1, None], max_new_tokens=50)
    answers = generate_parallel(model, prompts, max_new_tokens=50)   # answers[k][b]: adapter k, prompt b

The model's own forward is unchanged: the adapter choice travels with the layers, set beforehand.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.adapter import AdapterMeta, base_fingerprint, base_shape, copy_adapter_, load_adapter
from lit_llama.checkpoint import load_model
from lit_llama.generation import generate
from lit_llama.lora import (
    LoRAConfig,
    LoRAEmbedding,
    MergedLinear,
    TiedLoRAHead,
    add_lora,
    build_lora_model,
    lora_state_dict,
    merged_model,
)
from lit_llama.model import LLaMA, LLaMAConfig, init_weights


class MultiLoRALinear(nn.Module):
    """A frozen linear weight plus N stacked LoRA updates; each batch row uses its own."""

    def __init__(self, weight: nn.Parameter, stack_A: torch.Tensor, stack_B: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight  # (out, in), shared with the base model
        self.register_buffer("stack_A", stack_A, persistent=False)  # (N+1, R, in)
        self.register_buffer("stack_B", stack_B, persistent=False)  # (N+1, out, R)
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def select(self, ids: torch.Tensor) -> None:
        """Gather the rows' factors once: (B, in, R) and (B, R, out), ready for bmm."""
        self._rows = (self.stack_A[ids].transpose(1, 2), self.stack_B[ids].transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (B, T, out)
        A_t, B_t = _selected(self._rows, x.shape[0])
        update = torch.bmm(torch.bmm(x.to(A_t.dtype), A_t), B_t)  # (B, T, R) -> (B, T, out)
        return y + update.to(y.dtype)


class MultiLoRAEmbedding(nn.Module):
    """A frozen token embedding plus N stacked LoRA updates: stack_B (N+1, V, R) holds each
    token's code, stack_A (N+1, R, C) maps codes to embedding updates."""

    def __init__(self, weight: nn.Parameter, stack_A: torch.Tensor, stack_B: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight  # (V, C)
        self.register_buffer("stack_A", stack_A, persistent=False)  # (N+1, R, C)
        self.register_buffer("stack_B", stack_B, persistent=False)  # (N+1, V, R)
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def select(self, ids: torch.Tensor) -> None:
        self._rows = (ids, self.stack_A[ids])  # (B,), (B, R, C)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        y = F.embedding(idx, self.weight)  # (B, T, C)
        ids, A = _selected(self._rows, idx.shape[0])
        codes = self.stack_B[ids[:, None], idx]  # (B, T, R): row b's adapter, token idx[b, t]
        return y + torch.bmm(codes, A).to(y.dtype)


def _selected(rows: tuple[torch.Tensor, torch.Tensor] | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    if rows is None:
        raise RuntimeError("no adapter chosen for the batch rows: call set_adapter_ids(model, ids) first")
    if rows[0].shape[0] != batch:
        raise ValueError(
            f"the batch has {batch} rows but set_adapter_ids named {rows[0].shape[0]}; give one adapter id per row"
        )
    return rows


MULTI_LAYERS = (MultiLoRALinear, MultiLoRAEmbedding)


# ----------------------------------------------------------------------------------------- building
def adapter_factors(base: LLaMA, state_dict: dict[str, torch.Tensor], meta: AdapterMeta, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One adapter's update of every module it adapts, as fp32 factors A (R, in), B (out, R) with
    delta = B @ A, scaling folded in; for the embedding A (R, C), B (V, R). The adapter is checked and
    read through the single-adapter code (`add_lora` + `copy_adapter_`) on a shadow model that
    shares the base's tensors."""
    lora = meta.lora
    if lora.train_modules or lora.resize_vocab is not None:
        raise ValueError(
            f"{name} trains or grows the embedding/head in full, which a shared base cannot batch; "
            "merge it (scripts/merge_lora.py) and serve it on its own"
        )
    with torch.device("meta"):
        shadow = LLaMA(base.config)
    shadow.load_state_dict(base.state_dict(), assign=True)  # the same tensors, no copy
    if base.config.tie_embeddings:
        shadow.tie_weights()
    add_lora(shadow, lora)
    copy_adapter_(shadow, state_dict, meta, name)
    factors = {}
    for module_name, module in shadow.named_modules():
        if isinstance(module, (MergedLinear, LoRAEmbedding)):
            factors[module_name] = module.factors()
        elif isinstance(module, TiedLoRAHead):
            # The tied head's update is the embedding's delta (V, C) = B (V, R) @ A (R, C), which
            # is also the factorisation a linear layer of weight (V, C) uses.
            factors[module_name] = module.embedding.factors()
    return factors


def _stack(pairs: list[tuple[torch.Tensor, torch.Tensor] | None], rows: int, cols: int,
           device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded stacks of N adapters' factors of a (rows, cols) weight, plus the zero slot N:
    (N+1, R, cols) and (N+1, rows, R), R the largest rank."""
    R = max(p[0].shape[0] for p in pairs if p is not None)
    stack_A = torch.zeros(len(pairs) + 1, R, cols, device=device, dtype=dtype)
    stack_B = torch.zeros(len(pairs) + 1, rows, R, device=device, dtype=dtype)
    for n, pair in enumerate(pairs):
        if pair is not None:
            A, B = pair
            stack_A[n, : A.shape[0]] = A.to(device, dtype)
            stack_B[n, :, : B.shape[1]] = B.to(device, dtype)
    return stack_A, stack_B


def add_adapters(
    model: LLaMA, adapters: Sequence[tuple[dict[str, torch.Tensor], AdapterMeta]], names: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> LLaMA:
    """Put N adapters (tensors, meta from `load_adapter`) over a plain LLaMA, in place: every module
    any adapter adapts becomes a MultiLoRALinear/MultiLoRAEmbedding holding all N updates. The
    stacks are in `dtype` (default: the base weights' dtype). Adapters may differ in rank and
    targets. Returns `model`, with `model.adapter_names` recorded."""
    if not adapters:
        raise ValueError("no adapters given; pass at least one adapter file")
    if any(isinstance(m, MULTI_LAYERS + (MergedLinear, LoRAEmbedding)) for m in model.modules()):
        raise ValueError("the model already carries LoRA layers; start from a plain LLaMA")
    names = list(names or [f"adapter {n}" for n in range(len(adapters))])
    per_adapter = [adapter_factors(model, sd, meta, name) for (sd, meta), name in zip(adapters, names)]
    modules = dict(model.named_modules())
    weight = model.lm_head.weight
    dtype = dtype or weight.dtype
    for module_name in sorted({m for factors in per_adapter for m in factors}):
        pairs = [factors.get(module_name) for factors in per_adapter]
        base_module = modules[module_name]
        rows, cols = base_module.weight.shape
        stack_A, stack_B = _stack(pairs, rows, cols, weight.device, dtype)
        # Embedding factors are A (R, C), B (V, R): a token's code is its row of B.
        kind = MultiLoRAEmbedding if module_name == "transformer.wte" else MultiLoRALinear
        new = kind(base_module.weight, stack_A, stack_B)
        parent_name, _, attr = module_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new.train(base_module.training))
    model.adapter_names = names
    return model


def load_multi_lora_model(
    checkpoint_dir: Path | str, adapter_paths: Sequence[Path | str], dtype: torch.dtype | None = None,
    device: torch.device | str | None = None, mmap: bool = True,
) -> tuple[LLaMA, list[AdapterMeta]]:
    """Load a base checkpoint once and put every adapter over it (see `add_adapters`).
    `mmap`: as in `checkpoint.load_weights`."""
    model = load_model(checkpoint_dir, dtype=dtype, device=device, mmap=mmap)
    adapters = [load_adapter(path) for path in adapter_paths]
    add_adapters(model, adapters, names=[Path(p).name for p in adapter_paths])
    return model, [meta for _, meta in adapters]


def multi_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MULTI_LAYERS)]


def set_adapter_ids(model: LLaMA, ids: Sequence[int | None] | torch.Tensor) -> None:
    """Choose each batch row's adapter: an index into the adapters given, or None / -1 for the
    base model. Holds until the next call (generation reuses it for every step)."""
    n = len(getattr(model, "adapter_names", []))
    layers = multi_layers(model)
    if not layers:
        raise ValueError("the model has no adapters; build it with load_multi_lora_model or add_adapters")
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    ids = [-1 if i is None else int(i) for i in ids]
    bad = [i for i in ids if not -1 <= i < n]
    if bad:
        raise ValueError(f"adapter id {bad[0]} does not exist; use 0..{n - 1}, or None/-1 for the base model")
    device = model.lm_head.weight.device
    rows = torch.tensor([n if i == -1 else i for i in ids], dtype=torch.long, device=device)  # slot n: zeros
    for layer in layers:
        layer.select(rows)


# --------------------------------------------------------------------------------------- generation
def generate_with_adapters(
    model: LLaMA, prompts: list[torch.Tensor], adapter_ids: Sequence[int | None], max_new_tokens: int, **kwargs,
) -> list[torch.Tensor]:
    """`generation.generate` with prompt b answered by adapter `adapter_ids[b]` (None: the base).
    One batch, one KV cache: returns one tensor per prompt, as `generate` does."""
    if len(adapter_ids) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(adapter_ids)} adapter ids; give one id per prompt")
    set_adapter_ids(model, adapter_ids)
    return generate(model, prompts, max_new_tokens, **kwargs)


def generate_parallel(
    model: LLaMA, prompts: list[torch.Tensor], max_new_tokens: int, adapters: Sequence[int | None] | None = None,
    **kwargs,
) -> list[list[torch.Tensor]]:
    """Answer every prompt with each of K adapters (default: all of them) in one batch of K x B rows.

    Returns a K x B nested list: `answers[k][b]` is prompt b continued by adapter `adapters[k]`
    (the batch is never silently doubled into a flat list). With a fixed seed and temperature > 0,
    each row draws its own samples."""
    adapters = list(range(len(model.adapter_names))) if adapters is None else list(adapters)
    rows = [p for _ in adapters for p in prompts]  # adapter-major: row k * B + b
    ids = [a for a in adapters for _ in prompts]
    flat = generate_with_adapters(model, rows, ids, max_new_tokens, **kwargs)
    B = len(prompts)
    return [flat[k * B:(k + 1) * B] for k in range(len(adapters))]


@torch.no_grad()
def forward_parallel(model: LLaMA, idx: torch.Tensor, adapters: Sequence[int | None] | None = None) -> torch.Tensor:
    """Logits of the (B, T) batch under each of K adapters, as one forward of K*B rows: (K, B, T, V)."""
    adapters = list(range(len(model.adapter_names))) if adapters is None else list(adapters)
    B, T = idx.shape
    set_adapter_ids(model, [a for a in adapters for _ in range(B)])
    return model(idx.repeat(len(adapters), 1)).view(len(adapters), B, T, -1)  # (K, B, T, V)


# ---------------------------------------------------------------------------------------- benchmark
def _random_adapter(config: LLaMAConfig, lora: LoRAConfig, seed: int) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    """An in-memory adapter for `config` with random, non-zero A and B."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in lora_state_dict(build_lora_model(config, lora)).items()}
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in shapes.items()}
    return tensors, AdapterMeta(lora, None, base_fingerprint(config), base_shape(config))


def benchmark_multi_adapter(
    config: LLaMAConfig | str = "tiny", n_rows: int = 8, n_adapters: int = 8, lora: LoRAConfig | None = None,
    prompt_length: int = 16, max_new_tokens: int = 32, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, repeats: int = 3,
) -> dict[str, float]:
    """Tokens/s of greedy generation for `n_rows` rows spread over `n_adapters` different unmerged
    adapters, against `n_rows` rows of one adapter merged into the base (the fastest single-adapter
    path). Random weights, no files. Returns both rates and their ratio (multi / merged); the best
    of `repeats` timed runs after one warm-up each. (scripts/benchmark.py calls this.)"""
    config = LLaMAConfig.from_name(config) if isinstance(config, str) else config
    lora = lora or LoRAConfig(r=8, alpha=16, dropout=0.0)
    device = torch.device(device)
    torch.manual_seed(0)
    with torch.device(device):
        base = LLaMA(config)
    init_weights(base)
    base = base.to(dtype).eval()
    adapters = [_random_adapter(config, lora, seed=n) for n in range(n_adapters)]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (prompt_length,), generator=g).to(device) for _ in range(n_rows)]

    # The merged reference: a copy of the base with adapter 0 folded in.
    with torch.device("meta"):
        single = LLaMA(config)
    single.load_state_dict({k: v.clone() for k, v in base.state_dict().items()}, assign=True)
    if config.tie_embeddings:
        single.tie_weights()
    add_lora(single, adapters[0][1].lora)
    copy_adapter_(single, *adapters[0], name="adapter 0")
    merged = merged_model(single).to(device=device, dtype=dtype)

    multi = add_adapters(base, adapters)
    ids = [n % n_adapters for n in range(n_rows)]

    def rate(fn) -> float:
        fn()  # warm-up: allocations, caches
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return n_rows * max_new_tokens / best

    merged_rate = rate(lambda: generate(merged, prompts, max_new_tokens, temperature=0.0))
    multi_rate = rate(lambda: generate_with_adapters(multi, prompts, ids, max_new_tokens, temperature=0.0))
    return {
        "multi_tokens_per_s": multi_rate,
        "merged_tokens_per_s": merged_rate,
        "ratio": multi_rate / merged_rate,
        "n_rows": n_rows,
        "n_adapters": n_adapters,
    }
