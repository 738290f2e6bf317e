"""Hugging Face `LlamaForCausalLM` <-> lit_llama: the config and the weights, in both directions.
A `MistralForCausalLM` without sliding window has the same tensors and converts too (as a Llama).

Everything a converter needs is here, as plain functions over tensors, so the scripts
(`scripts/convert_hf_checkpoint.py`, `scripts/convert_lit_checkpoint.py`) only read and write files,
and the tests map weights through exactly the code users run.

Two things differ between the formats beyond the names in `LIT_TO_HF`:
  1. We fuse q/k/v into one `c_attn` whose rows are [Q (nh*hs) | K (ng*hs) | V (ng*hs)].
  2. RoPE. We rotate interleaved pairs (x[2j], x[2j+1]) of each head, like Meta's reference code.
     HF's `rotate_half` rotates (x[j], x[j + hs/2]) instead, and HF checkpoints were made to match by
     permuting the rows of q_proj/k_proj inside each head (`permute` in transformers'
     convert_llama_weights_to_hf.py: view (heads, hs/2, 2, in), swap axes 1 and 2). Undoing that
     permutation on the way in is all that is needed for the two RoPE conventions to agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from lit_llama.model import ROPE_SCALING_KEYS, LLaMAConfig

# ours -> HF's, one row per tensor; `{i}` is the layer index. c_attn is the single fused entry:
# its rows are the concatenation of the three HF tensors, in this order.
LIT_TO_HF: dict[str, tuple[str, ...]] = {
    "transformer.wte.weight": ("model.embed_tokens.weight",),
    "transformer.h.{i}.rms_1.weight": ("model.layers.{i}.input_layernorm.weight",),
    "transformer.h.{i}.attn.c_attn.weight": (
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
    ),
    "transformer.h.{i}.attn.c_proj.weight": ("model.layers.{i}.self_attn.o_proj.weight",),
    "transformer.h.{i}.rms_2.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
    "transformer.h.{i}.mlp.c_fc1.weight": ("model.layers.{i}.mlp.gate_proj.weight",),  # Meta's w1
    "transformer.h.{i}.mlp.c_fc2.weight": ("model.layers.{i}.mlp.up_proj.weight",),  # Meta's w3
    "transformer.h.{i}.mlp.c_proj.weight": ("model.layers.{i}.mlp.down_proj.weight",),  # Meta's w2
    "transformer.ln_f.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),  # absent from tied checkpoints: the head is the embedding
}

# Tensors some HF checkpoints carry that hold nothing we need: old transformers versions saved the
# RoPE frequencies as a buffer; we recompute them from rope_theta.
IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_LAYER = re.compile(r"\.(\d+)\.")


# ---------------------------------------------------------------------------------------- config
# model_type -> the architecture, and what transformers assumes for max_position_embeddings when
# config.json leaves it out. A Mistral without a sliding window is a Llama, tensor for tensor.
ARCHITECTURES = {"llama": ("LlamaForCausalLM", 2048), "mistral": ("MistralForCausalLM", 4096 * 32)}
MISTRAL_DEFAULT_SLIDING_WINDOW = 4096  # MistralConfig's default when config.json has no sliding_window


def _rope_from_hf(hf_config: dict) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from either layout of config.json:
      transformers 4: rope_theta and rope_scaling ({"rope_type" or "type": ..., "factor": ...}) at the top;
      transformers 5: one rope_parameters dict with rope_type, rope_theta and the scaling keys.
    As transformers does, a rope_scaling dict takes the place of rope_parameters, and a rope_theta
    at the top level fills in one missing from the dict."""
    rope = dict(hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"per-layer-type RoPE parameters ({', '.join(rope)}) are not supported; lit_llama has one RoPE for all layers")
    theta = float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    partial = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported; lit_llama rotates the whole head")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"RoPE scaling {kind!r} is not supported; lit_llama implements default, {', '.join(ROPE_SCALING_KEYS)}"
        )
    if kind == "llama3":
        # transformers' standardize_rope_params: a top-level original_max_position_embeddings wins,
        # else the dict's, else max_position_embeddings.
        original = hf_config.get("original_max_position_embeddings") or rope.get(
            "original_max_position_embeddings", hf_config.get("max_position_embeddings")
        )
        rope["original_max_position_embeddings"] = original
    # Only the keys this type uses (transformers ignores the rest too); a missing one is
    # LLaMAConfig's one-line error.
    return theta, {"type": kind, **{k: rope[k] for k in ROPE_SCALING_KEYS[kind] if k in rope}}


def config_from_hf(hf_config: dict) -> LLaMAConfig:
    """Our config for a `config.json` of a LlamaForCausalLM or a MistralForCausalLM without sliding
    window, as transformers 4 or 5 writes it. Raises a one-line ValueError for a model we cannot run
    exactly (another architecture, biases, a sliding window, a RoPE scaling we do not implement,
    another activation)."""
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"config.json has model_type {model_type!r}, not 'llama' or 'mistral'; only LlamaForCausalLM and "
            "MistralForCausalLM checkpoints (Llama 1/2/3, Mistral, SmolLM2, TinyLlama, ...) can be converted"
        )
    architecture, default_max_positions = ARCHITECTURES[model_type]
    for name in hf_config.get("architectures") or [architecture]:
        if name != architecture:
            raise ValueError(f"config.json's architecture {name} is not supported; only {architecture} is, for model_type {model_type!r}")
    block_size = hf_config.get("max_position_embeddings", default_max_positions)
    if model_type == "mistral":
        window = hf_config.get("sliding_window", MISTRAL_DEFAULT_SLIDING_WINDOW)
        if window is not None and window < block_size:
            raise ValueError(
                f"sliding_window {window} < max_position_embeddings {block_size} is not supported; lit_llama "
                "attends to the whole context (Mistral 7B v0.2 and later have sliding_window null)"
            )
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf_config['hidden_act']!r} is not supported; LLaMA's MLP uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ValueError(f"config.json sets {flag}=true; lit_llama's linear layers have no biases")
    rope_base, rope_scaling = _rope_from_hf(hf_config)
    n_head = hf_config["num_attention_heads"]
    vocab_size = hf_config["vocab_size"]
    return LLaMAConfig(
        block_size=block_size,
        vocab_size=vocab_size,
        # The checkpoint's embedding has exactly vocab_size rows: no extra padding.
        padded_vocab_size=vocab_size,
        n_layer=hf_config["num_hidden_layers"],
        n_head=n_head,
        n_embd=hf_config["hidden_size"],
        # Explicit head_dim (Llama 3.2 and others write it); None: hidden_size // heads, as transformers.
        head_size=hf_config.get("head_dim"),
        n_query_groups=hf_config.get("num_key_value_heads") or n_head,
        intermediate_size=hf_config["intermediate_size"],
        norm_eps=hf_config.get("rms_norm_eps", 1e-6),  # LlamaConfig's and MistralConfig's default when absent
        rope_base=rope_base,
        rope_scaling=rope_scaling,
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        source=f"Hugging Face config.json ({hf_config.get('_name_or_path') or architecture})",
    )


def config_to_hf(config: LLaMAConfig, torch_dtype: str = "float32") -> dict:
    """A `config.json` dict that `transformers.LlamaForCausalLM` builds our model's twin from, read
    the same by transformers 4 (rope_theta, rope_scaling) and 5 (rope_parameters)."""
    scaling = dict(config.rope_scaling or {})
    if scaling:
        scaling = {"rope_type": scaling.pop("type"), **scaling}  # HF's spelling of the type key
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        # Both spellings: transformers < 4.56 reads torch_dtype, later versions read dtype.
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": scaling or None,
        "rope_parameters": {"rope_type": "default", **scaling, "rope_theta": config.rope_base},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }


# ------------------------------------------------------------------------------------------ names
def _template(lit_name: str) -> tuple[str, str | None]:
    """`transformer.h.3.attn.c_proj.weight` -> (`transformer.h.{i}.attn.c_proj.weight`, "3")."""
    m = _LAYER.search(lit_name)
    if m is None:
        return lit_name, None
    return lit_name[: m.start()] + ".{i}." + lit_name[m.end():], m.group(1)


def hf_names_for(lit_name: str) -> tuple[str, ...]:
    """The HF tensor name(s) our tensor is made of: three for c_attn (q, k, v), else one."""
    template, layer = _template(lit_name)
    if template not in LIT_TO_HF:
        raise KeyError(f"{lit_name!r} is not a lit_llama LLaMA tensor name")
    return tuple(name.format(i=layer) for name in LIT_TO_HF[template])


def hf_name_for(lit_name: str) -> str:
    """The HF name of a one-to-one tensor (every tensor but the fused c_attn)."""
    names = hf_names_for(lit_name)
    if len(names) != 1:
        raise KeyError(f"{lit_name!r} is fused from {', '.join(names)}; use hf_names_for")
    return names[0]


def lit_shapes(config: LLaMAConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` stores, with its shape, in the order the converters
    produce them (layer by layer, so that a sharded HF checkpoint is read roughly in file order)."""
    C, V, hs = config.n_embd, config.padded_vocab_size, config.head_size
    qkv = (config.n_head + 2 * config.n_query_groups) * hs  # nh*hs need not be C (explicit head_size)
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C)}
    per_layer = {
        "rms_1.weight": (C,),
        "attn.c_attn.weight": (qkv, C),
        "attn.c_proj.weight": (C, config.n_head * hs),
        "rms_2.weight": (C,),
        "mlp.c_fc1.weight": (config.intermediate_size, C),
        "mlp.c_fc2.weight": (config.intermediate_size, C),
        "mlp.c_proj.weight": (C, config.intermediate_size),
    }
    for i in range(config.n_layer):
        shapes.update({f"transformer.h.{i}.{k}": v for k, v in per_layer.items()})
    shapes["transformer.ln_f.weight"] = (C,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def hf_shapes(config: LLaMAConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of `config` stores (tied: no lm_head.weight), with its shape."""
    hs = config.head_size
    split = (config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs)  # q, k, v rows
    shapes: dict[str, tuple[int, ...]] = {}
    for lit_name, shape in lit_shapes(config).items():
        names = hf_names_for(lit_name)
        if len(names) == 1:
            shapes[names[0]] = shape
        else:
            shapes.update({name: (rows, shape[1]) for name, rows in zip(names, split)})
    return shapes


# ------------------------------------------------------------------------------------------- RoPE
def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation: within each head, rows [first halves | second halves] become
    interleaved pairs, so that our interleaved RoPE rotates the same pairs HF's rotate_half does."""
    out_features, in_features = w.shape
    hs = out_features // n_heads
    w = w.view(n_heads, 2, hs // 2, in_features)  # (heads, 2, hs/2, in): HF's half-split order
    return w.transpose(1, 2).reshape(out_features, in_features)  # via (heads, hs/2, 2, in): pairs


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's q/k row permutation (the inverse of `hf_to_meta_rows`)."""
    out_features, in_features = w.shape
    hs = out_features // n_heads
    w = w.view(n_heads, hs // 2, 2, in_features)  # (heads, hs/2, 2, in): interleaved pairs
    return w.transpose(1, 2).reshape(out_features, in_features)  # via (heads, 2, hs/2, in)


# ---------------------------------------------------------------------------------------- weights
def hf_to_lit_state_dict(
    get: Callable[[str], torch.Tensor], config: LLaMAConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield our tensors one at a time, in `lit_shapes(config)` order, reading HF tensors by name
    through `get` (a dict's __getitem__, or a reader over checkpoint shards). Nothing is computed
    before it is asked for, so a caller that writes each tensor out holds one at a time.

    Raises ValueError when a tensor has the wrong shape for `config`."""
    expected = hf_shapes(config)

    def fetch(name: str) -> torch.Tensor:
        t = get(name)
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, but config.json implies {expected[name]}; is the config from another model?"
            )
        return t

    for lit_name in lit_shapes(config):
        names = hf_names_for(lit_name)
        if len(names) == 1:
            yield lit_name, fetch(names[0])
            continue
        q, k, v = (fetch(name) for name in names)
        q = hf_to_meta_rows(q, config.n_head)
        k = hf_to_meta_rows(k, config.n_query_groups)
        yield lit_name, torch.cat((q, k, v), dim=0)  # (nh*hs + 2*ng*hs, C)


def lit_to_hf_tensors(
    get: Callable[[str], torch.Tensor], config: LLaMAConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield HF tensors one at a time, in `hf_shapes(config)` order, reading ours through `get`."""
    hs = config.head_size
    split = (config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs)
    for lit_name, shape in lit_shapes(config).items():
        t = get(lit_name)
        if tuple(t.shape) != shape:
            raise ValueError(f"{lit_name} has shape {tuple(t.shape)}, but lit_config.json implies {shape}")
        names = hf_names_for(lit_name)
        if len(names) == 1:
            yield names[0], t
            continue
        q, k, v = t.split(split, dim=0)
        yield names[0], meta_to_hf_rows(q, config.n_head)
        yield names[1], meta_to_hf_rows(k, config.n_query_groups)
        yield names[2], v.contiguous()


def lit_to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: LLaMAConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the state dict of the equivalent LlamaForCausalLM (tied: no lm_head.weight).
    Extra keys (a tied model's lm_head.weight, LoRA tensors) are ignored; missing ones are a KeyError."""
    return dict(lit_to_hf_tensors(state_dict.__getitem__, config))
