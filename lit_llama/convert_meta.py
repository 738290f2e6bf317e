"""Meta's original checkpoint format <-> ours.

Meta's release is a directory with `params.json` and one `consolidated.XX.pth` per model-parallel
rank. Each file holds that rank's slice of every weight, cut the way Meta's fairscale layers cut it:
    ColumnParallelLinear (wq, wk, wv, w1, w3, output)   output rows (dim 0)
    RowParallelLinear    (wo, w2)                        input columns (dim 1)
    ParallelEmbedding    (tok_embeddings)                the embedding dim (dim 1)
    RMSNorm weights                                      replicated on every rank
(Llama 3 cuts tok_embeddings along the vocabulary instead, with VocabParallelEmbedding; the
converter tells the two apart by a shard's shape, see `embedding_split_dim`.)
Merging concatenates the slices along that dim; splitting cuts each tensor into N equal slices.
Our fused `c_attn` is the row stack [wq | wk | wv], so it is merged per part and split per part.

Meta's RoPE rotates interleaved pairs, as ours does, so no row is permuted. llama2.c uses the same
names with a single shard, and reuses this table (see `convert_llama2c.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from lit_llama.model import LLaMAConfig, find_multiple

# (Meta name, our name, model-parallel split dim or None when replicated), in our state-dict order
# (which also puts the two largest tensors first, before small ones fragment the heap).
# wq, wk and wv all map to c_attn: their rows are stacked in that order.
NAME_TABLE: tuple[tuple[str, str, int | None], ...] = (
    ("output.weight", "lm_head.weight", 0),  # ColumnParallelLinear
    ("tok_embeddings.weight", "transformer.wte.weight", 1),  # ParallelEmbedding
    ("layers.{i}.attention_norm.weight", "transformer.h.{i}.rms_1.weight", None),
    ("layers.{i}.attention.wq.weight", "transformer.h.{i}.attn.c_attn.weight", 0),  # ColumnParallelLinear
    ("layers.{i}.attention.wk.weight", "transformer.h.{i}.attn.c_attn.weight", 0),  # ColumnParallelLinear
    ("layers.{i}.attention.wv.weight", "transformer.h.{i}.attn.c_attn.weight", 0),  # ColumnParallelLinear
    ("layers.{i}.attention.wo.weight", "transformer.h.{i}.attn.c_proj.weight", 1),  # RowParallelLinear
    ("layers.{i}.ffn_norm.weight", "transformer.h.{i}.rms_2.weight", None),
    ("layers.{i}.feed_forward.w1.weight", "transformer.h.{i}.mlp.c_fc1.weight", 0),  # ColumnParallelLinear
    ("layers.{i}.feed_forward.w3.weight", "transformer.h.{i}.mlp.c_fc2.weight", 0),  # ColumnParallelLinear
    ("layers.{i}.feed_forward.w2.weight", "transformer.h.{i}.mlp.c_proj.weight", 1),  # RowParallelLinear
    ("norm.weight", "transformer.ln_f.weight", None),
)
# Precomputed RoPE frequencies that early LLaMA-1 shards carry; our model computes its own.
IGNORED_META_KEYS = frozenset({"rope.freqs"})

Part = tuple[str, int | None]  # (Meta name, split dim or None)


def name_plan(n_layer: int, embedding_split: int = 1) -> dict[str, list[Part]]:
    """Our tensor name -> the Meta tensors it is made of (rows stacked in this order), block by block.
    `embedding_split` overrides the split dim of tok_embeddings (0 for Llama 3's shards)."""
    first_layered = next(k for k, row in enumerate(NAME_TABLE) if "{i}" in row[0])
    layered = [row for row in NAME_TABLE if "{i}" in row[0]]
    before = list(NAME_TABLE[:first_layered])
    after = [row for row in NAME_TABLE[first_layered:] if "{i}" not in row[0]]
    rows = before + [(m.format(i=i), o.format(i=i), d) for i in range(n_layer) for m, o, d in layered] + after
    plan: dict[str, list[Part]] = {}
    for meta, ours, dim in rows:
        plan.setdefault(ours, []).append((meta, embedding_split if meta == "tok_embeddings.weight" else dim))
    return plan


def embedding_split_dim(shard_shape: tuple[int, ...], dim: int, n_shards: int) -> int:
    """Which dim the shards cut tok_embeddings along: LLaMA 1/2 (ParallelEmbedding) cut the
    embedding dim, Llama 3 (VocabParallelEmbedding) the vocabulary; a shard's width tells which."""
    if n_shards == 1 or shard_shape[1] * n_shards == dim:
        return 1
    if shard_shape[1] == dim:
        return 0
    raise ValueError(
        f"tok_embeddings shards are {tuple(shard_shape)}, which fits neither split of dim {dim} over {n_shards} shards; "
        "params.json does not describe these shards"
    )


def block_of(name: str) -> str:
    """The unit the converters map files for: `transformer.h.3` for that block's tensors, the name
    itself for the others (the embedding and the head are each about as large as a block)."""
    parts = name.split(".")
    return ".".join(parts[:3]) if name.startswith("transformer.h.") else name


# ------------------------------------------------------------------------------------------ config
def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size Meta's FeedForward derives from params.json."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


def config_from_params(params: dict[str, Any], vocab_size: int, block_size: int = 4096) -> LLaMAConfig:
    """Our config from Meta's params.json. `vocab_size` is the row count of tok_embeddings (LLaMA 1
    and 2 write -1 in params.json); params.json does not record the context length: pass `block_size`."""
    missing = [k for k in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps") if k not in params]
    if missing:
        raise ValueError(f"params.json lacks {', '.join(missing)}; is this Meta's params.json?")
    if params.get("use_scaled_rope"):
        raise ValueError("params.json asks for Llama 3.1's scaled RoPE, which this model does not implement")
    declared = params.get("vocab_size", -1)
    if declared > 0 and declared != vocab_size:
        raise ValueError(
            f"params.json says vocab_size {declared} but tok_embeddings has {vocab_size} rows; the shards and params.json do not belong together"
        )
    return LLaMAConfig(
        block_size=block_size,
        vocab_size=vocab_size,
        padded_vocab_size=vocab_size,
        n_layer=params["n_layers"],
        n_head=params["n_heads"],
        n_embd=params["dim"],
        n_query_groups=params.get("n_kv_heads") or params["n_heads"],
        intermediate_size=meta_intermediate_size(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")),
        multiple_of=params["multiple_of"],
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params["norm_eps"],
        rope_base=float(params.get("rope_theta", 10000.0)),
        source="Meta params.json",
    )


def params_from_config(config: LLaMAConfig) -> dict[str, Any]:
    """Meta's params.json for `config`, with only the keys Meta's own loaders accept (LLaMA 1/2 reject
    rope_theta, and set max_seq_len themselves, so neither is written unless needed)."""
    # Meta's params.json has no field for either: its loaders derive head_dim = dim / n_heads and
    # plain RoPE (Llama 3.1's use_scaled_rope is one fixed llama3 scaling, not read here).
    if config.head_size * config.n_head != config.n_embd:
        raise ValueError(
            f"head_size {config.head_size} x {config.n_head} heads != n_embd {config.n_embd}; Meta's format cannot express it"
        )
    if config.rope_scaling is not None:
        raise ValueError(f"rope_scaling {config.rope_scaling['type']!r} cannot be written to Meta's params.json")
    multiple_of, multiplier = config.multiple_of, config.ffn_dim_multiplier
    if meta_intermediate_size(config.n_embd, multiple_of, multiplier) != config.intermediate_size:
        # Meta's rule rounds the hidden size up to multiple_of; with multiple_of = intermediate_size
        # any start value in (0, intermediate_size] lands exactly on it, so shrink it there if needed.
        multiple_of, multiplier = config.intermediate_size, None
        hidden = int(2 * 4 * config.n_embd / 3)
        if hidden > config.intermediate_size:
            multiplier = config.intermediate_size / hidden
        assert meta_intermediate_size(config.n_embd, multiple_of, multiplier) == config.intermediate_size
    params: dict[str, Any] = {"dim": config.n_embd, "n_layers": config.n_layer, "n_heads": config.n_head}
    if config.n_query_groups != config.n_head:
        params["n_kv_heads"] = config.n_query_groups
    params["multiple_of"] = multiple_of
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    params["norm_eps"] = config.norm_eps
    params["vocab_size"] = config.padded_vocab_size
    if config.rope_base != 10000.0:
        params["rope_theta"] = config.rope_base
    return params


def expected_shapes(config: LLaMAConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of the model `config` describes, in our state-dict order (lm_head included).

    Written out rather than read off a meta-device LLaMA: building one imports torch's compiler
    stack, which costs seconds in a converter that otherwise only moves bytes. A test checks that the
    two agree."""
    C, V, H = config.n_embd, config.padded_vocab_size, config.intermediate_size
    qkv = (config.n_head + 2 * config.n_query_groups) * config.head_size
    shapes: dict[str, tuple[int, ...]] = {"lm_head.weight": (V, C), "transformer.wte.weight": (V, C)}
    for i in range(config.n_layer):
        block = f"transformer.h.{i}."
        shapes[block + "rms_1.weight"] = (C,)
        shapes[block + "attn.c_attn.weight"] = (qkv, C)
        shapes[block + "attn.c_proj.weight"] = (C, config.n_head * config.head_size)
        shapes[block + "rms_2.weight"] = (C,)
        shapes[block + "mlp.c_fc1.weight"] = (H, C)
        shapes[block + "mlp.c_fc2.weight"] = (H, C)
        shapes[block + "mlp.c_proj.weight"] = (C, H)
    shapes["transformer.ln_f.weight"] = (C,)
    return shapes


def check_shards_divide(config: LLaMAConfig, n_shards: int) -> None:
    """One-line error when the model cannot be cut into `n_shards` equal model-parallel slices."""
    if n_shards < 1:
        raise ValueError(f"--shards must be at least 1, got {n_shards}")
    sizes = {
        "n_head": config.n_head,
        "n_kv_heads (n_query_groups)": config.n_query_groups,
        "n_embd": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "padded_vocab_size": config.padded_vocab_size,
    }
    bad = [f"{name} {size}" for name, size in sizes.items() if size % n_shards]
    if bad:
        divisors = [n for n in range(1, config.n_query_groups + 1) if all(s % n == 0 for s in sizes.values())]
        raise ValueError(
            f"{n_shards} shards do not divide {', '.join(bad)}; choose a shard count from {divisors}"
        )


# ----------------------------------------------------------------------------------------- merging
def validate_shards(shards: list[Mapping[str, torch.Tensor]], n_layer: int, names: list[str] | None = None) -> None:
    """Every shard holds exactly the Meta tensors of an n_layer model (rope.freqs aside), same shapes.
    `names` label the shards in errors (default: consolidated.XX.pth)."""
    names = names or [f"consolidated.{rank:02d}.pth" for rank in range(len(shards))]
    wanted = {meta for parts in name_plan(n_layer).values() for meta, _ in parts}
    for rank, shard in enumerate(shards):
        keys = set(shard) - IGNORED_META_KEYS
        missing, unexpected = sorted(wanted - keys), sorted(keys - wanted)
        if missing or unexpected:
            what = f"missing {missing[:4]}" if missing else f"unexpected {unexpected[:4]}"
            raise ValueError(
                f"{names[rank]} does not hold the tensors of a {n_layer}-layer LLaMA ({what}); "
                "are the config and the weights from the same model?"
            )
        for key in wanted:
            if shard[key].shape != shards[0][key].shape:
                raise ValueError(
                    f"{key} has shape {tuple(shard[key].shape)} in {names[rank]} but "
                    f"{tuple(shards[0][key].shape)} in {names[0]}; are all shards from the same model?"
                )


def merged_shape(shards: list[Mapping[str, torch.Tensor]], parts: list[Part]) -> tuple[int, ...]:
    """Shape of the tensor `merge_parts` would build, from the shard shapes alone (no data read)."""
    shapes = []
    for meta, dim in parts:
        shape = list(shards[0][meta].shape)
        if dim is not None:
            shape[dim] *= len(shards)
        shapes.append(shape)
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def merge_parts(
    shards: list[Mapping[str, torch.Tensor]], parts: list[Part], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """One of our tensors from all model-parallel shards: each part is the concatenation of its
    slices along its split dim (replicated parts come from rank 0); parts are stacked as rows.

    Everything is gathered in one torch.cat, so the result is the only allocation; with a single
    slice the (possibly memory-mapped) tensor itself is returned.
    """
    dims = {dim for _, dim in parts if dim is not None}
    if len(parts) > 1 and dims - {0}:
        raise ValueError(f"cannot stack {[m for m, _ in parts]} as rows: they are split along dim {dims}")
    cat_dim = dims.pop() if dims else 0
    slices = [s for meta, dim in parts for s in ([shards[0][meta]] if dim is None else [sh[meta] for sh in shards])]
    if dtype is not None:
        # Cast slice by slice, so a dtype change never holds two full copies.
        slices = [s.to(dtype) for s in slices]
    return slices[0] if len(slices) == 1 else torch.cat(slices, dim=cat_dim)


def meta_to_lit(
    state_dict: Mapping[str, torch.Tensor], n_layer: int, tie_embeddings: bool = False, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """A single-shard Meta state dict (also llama2.c's) under our names; drops lm_head when tied."""
    validate_shards([state_dict], n_layer, [source])
    out = {ours: merge_parts([state_dict], parts) for ours, parts in name_plan(n_layer).items()}
    if tie_embeddings:
        del out["lm_head.weight"]
    return out


# ---------------------------------------------------------------------------------------- splitting
SliceReader = Callable[[str, tuple[int, int], tuple[int, int] | None], torch.Tensor]
"""read(our_name, (row_start, row_stop), (col_start, col_stop) or None for all columns) -> a new tensor."""


def meta_shard(config: LLaMAConfig, read: SliceReader, rank: int, n_shards: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s Meta state dict out of `n_shards`, reading only the slices it needs.

    c_attn is first cut into its wq, wk, wv row blocks, then each block is sliced; with GQA wk and
    wv hold n_kv_heads / n_shards heads per rank, as Meta's model-parallel attention expects.
    A tied model has no lm_head: output.weight is sliced from the embedding.
    """
    check_shards_divide(config, n_shards)
    shapes = expected_shapes(config)
    hs = config.head_size
    qkv_rows = (config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs)  # wq | wk | wv
    shard: dict[str, torch.Tensor] = {}
    for ours, parts in name_plan(config.n_layer).items():
        source = "transformer.wte.weight" if ours == "lm_head.weight" and config.tie_embeddings else ours
        shape = shapes[source]
        row_sizes = qkv_rows if len(parts) == 3 else (shape[0],)
        row_start = 0
        for (meta, dim), n_rows in zip(parts, row_sizes):
            rows, cols = (row_start, row_start + n_rows), None
            if dim == 0:
                step = n_rows // n_shards
                rows = (row_start + rank * step, row_start + (rank + 1) * step)
            elif dim == 1:
                step = shape[1] // n_shards
                cols = (rank * step, (rank + 1) * step)
            shard[meta] = read(source, rows, cols)
            row_start += n_rows
    return shard
