"""PEFT interop: our adapters <-> PEFT (huggingface/peft) LoRA adapters.

A PEFT adapter targets the LlamaForCausalLM that scripts/convert_lit_checkpoint.py writes. Module
names come from convert_hf.LIT_TO_HF; PEFT prefixes them with "base_model.model." and stores Linear
LoRA as `<module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r) and Embedding LoRA as
`<module>.lora_embedding_A` (r, V) / `.lora_embedding_B` (C, r), our layouts. Our fused c_attn's
stacked A/B become q/k/v_proj's, with HF's RoPE row permutation on B_q/B_k.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lit_llama.adapter import check_adapter_shapes
from lit_llama.convert_hf import LIT_TO_HF, hf_name_for, hf_names_for, hf_to_meta_rows, meta_to_hf_rows
from lit_llama.lora import FULL_MODULES, LORA_SUFFIXES, TARGETS, LoRAConfig
from lit_llama.model import LLaMAConfig

PEFT_PREFIX = "base_model.model."
PEFT_SHORT_NAMES = {
    "query": ("q_proj",), "key": ("k_proj",), "value": ("v_proj",), "projection": ("o_proj",),
    "mlp": ("gate_proj", "up_proj", "down_proj"), "head": ("lm_head",), "embedding": ("embed_tokens",),
}
PEFT_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _hf_module(lit_module: str) -> str:
    return hf_name_for(lit_module + ".weight").removesuffix(".weight")


def slice_layout(config: LLaMAConfig, lora: LoRAConfig) -> list[tuple[str, int, int, int, int, int]]:
    """Per enabled c_attn slice: (name, heads, rows, rank, first row in lora_A, first row in lora_B)."""
    hs = config.head_size
    heads = (config.n_head, config.n_query_groups, config.n_query_groups)
    out, a0, b0 = [], 0, 0
    for name, n, rank in zip(TARGETS, heads, lora.slice_ranks):
        if rank:
            out.append((name, n, n * hs, rank, a0, b0))
            a0, b0 = a0 + rank, b0 + n * hs
    return out


def lora_to_peft(
    state_dict: dict[str, torch.Tensor], lora: LoRAConfig, config: LLaMAConfig, base_model_name_or_path: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our adapter -> PEFT's (`adapter_model.safetensors` tensors, `adapter_config.json` dict) for
    the Hugging Face twin of the base `config`. c_attn's stacked A/B are split into q/k/v_proj, and
    B_q/B_k rows get HF's RoPE permutation (A is per input column, so it is not permuted). A tied
    shared update becomes an embed_tokens LoRA with `ensure_weight_tying`, which PEFT reads as
    lm_head.lora_A = B^T, lm_head.lora_B = A^T: the same head update ours applies."""
    if lora.resize_vocab is not None:
        raise ValueError(
            "this adapter grows the vocabulary, which a PEFT adapter cannot describe; merge it "
            "(scripts/merge_lora.py) and convert the merged checkpoint instead"
        )
    if not state_dict:
        raise ValueError("the adapter holds no tensors")
    tied = config.tie_embeddings and not lora.untie_embeddings
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        t = t.contiguous()
        module, kind = name.rsplit(".", 1)
        if module.endswith(".attn.c_attn"):
            hf_names = dict(zip(TARGETS, hf_names_for(f"{module}.weight")))  # q, k, v_proj
            for slice_name, heads, rows, rank, a0, b0 in slice_layout(config, lora):
                hf = hf_names[slice_name].removesuffix(".weight")
                if kind == "lora_A":
                    out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = t[a0:a0 + rank].clone()
                else:
                    B = t[b0:b0 + rows, :rank]  # (rows, r_s)
                    if slice_name != "value":  # undo our interleaved-pair row order (RoPE)
                        B = meta_to_hf_rows(B, heads)
                    out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = B.contiguous().clone()
        elif module == "transformer.wte" and kind in LORA_SUFFIXES:
            emb = _hf_module(module)
            out[f"{PEFT_PREFIX}{emb}.lora_embedding_{kind[-1]}"] = t
            if tied:  # PEFT saves the tied head's (transposed) views too; written alike
                head_kind = "lora_A" if kind == "lora_B" else "lora_B"
                out[f"{PEFT_PREFIX}lm_head.{head_kind}.weight"] = t.T.contiguous()
        elif kind in LORA_SUFFIXES:
            out[f"{PEFT_PREFIX}{_hf_module(module)}.{kind}.weight"] = t
        elif name in ("transformer.wte.weight", "lm_head.weight"):
            out[f"{PEFT_PREFIX}{_hf_module(module)}.weight"] = t
            if tied:  # PEFT looks the tied head's modules_to_save copy up too
                out[f"{PEFT_PREFIX}lm_head.weight"] = t.clone()
        else:
            raise ValueError(f"{name} has no PEFT equivalent")
    target_modules = sorted({short for t in lora.target_names for short in PEFT_SHORT_NAMES[t]})
    if tied and lora.head:  # the shared update lives on the embedding
        target_modules = sorted((set(target_modules) - {"lm_head"}) | {"embed_tokens"})
    modules_to_save = sorted(
        {"embed_tokens"} if tied and lora.train_modules else
        {PEFT_SHORT_NAMES[m][0] for m in FULL_MODULES if getattr(lora, f"train_{m}")}
    )
    ranks = {PEFT_SHORT_NAMES[name][0]: rank for name, rank in zip(TARGETS, lora.slice_ranks) if rank and rank != lora.r}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,
        "rank_pattern": ranks,
        "alpha_pattern": {},
        "modules_to_save": modules_to_save or None,
        "ensure_weight_tying": bool(tied and ("embed_tokens" in target_modules or modules_to_save)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return out, adapter_config


def _peft_targets(adapter_config: dict[str, Any]) -> set[str]:
    targets = adapter_config.get("target_modules") or []
    if targets == "all-linear":
        return set(PEFT_ALL_LINEAR)
    if isinstance(targets, str):
        raise ValueError(
            f"target_modules is the regex {targets!r}; only a list of module names (or all-linear) can be converted"
        )
    return {t.rsplit(".", 1)[-1] for t in targets}


def peft_to_lora(
    tensors: dict[str, torch.Tensor], adapter_config: dict[str, Any], config: LLaMAConfig,
) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """A PEFT LoRA adapter of the Hugging Face twin of `config` -> our tensors and LoRAConfig
    (the inverse of `lora_to_peft`). Raises ValueError for what our LoRA cannot express exactly, and
    for a config or tensors that are broken (wrong types, NaN or inf)."""
    check_peft_config_types(adapter_config)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"the PEFT adapter's {name} is a {type(t).__name__}, not a tensor; is it a PEFT adapter?")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"the PEFT adapter holds non-finite values (NaN or inf) in {name}: the training that wrote it "
                             "diverged; use an earlier checkpoint of it")
    targets, saved, tie = _check_peft_config(adapter_config, config)
    sd = _strip_peft_names(tensors)
    lora = _lora_config_from_peft(adapter_config, config, targets, saved, tie, sd)
    out = _lit_tensors(sd, lora, config, saved, tie)
    check_adapter_shapes(out, lora, config, "the PEFT adapter")
    return out, lora


# adapter_config.json's fields this converter reads, and the JSON types each may have.
_NUMBER = (int, float)
_PEFT_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "peft_type": (str,), "r": (int,), "lora_alpha": _NUMBER, "lora_dropout": _NUMBER, "target_modules": (list, str),
    "modules_to_save": (list,), "rank_pattern": (dict,), "alpha_pattern": (dict,), "bias": (str,),
    "ensure_weight_tying": (bool,), "use_dora": (bool,), "use_rslora": (bool,), "fan_in_fan_out": (bool,),
}


def check_peft_config_types(adapter_config: object) -> None:
    """A one-line error for an adapter_config.json field of the wrong JSON type (null means "not set")."""
    if not isinstance(adapter_config, dict):
        raise ValueError(f"adapter_config.json holds a {type(adapter_config).__name__}, not an object; is it PEFT's?")
    for key, types in _PEFT_FIELD_TYPES.items():
        value = adapter_config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join({"int": "an integer", "float": "a number", "list": "a list", "str": "a string",
                                 "dict": "an object", "bool": "true/false"}[t.__name__] for t in types)
            raise ValueError(f"adapter_config.json's {key} is {value!r}; it must be {names}")
    for key in ("target_modules", "modules_to_save"):
        if isinstance(adapter_config.get(key), list) and not all(isinstance(m, str) for m in adapter_config[key]):
            raise ValueError(f"adapter_config.json's {key} must list module names as strings, got {adapter_config[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = adapter_config.get(key) or {}
        if not all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in pattern.values()):
            raise ValueError(f"adapter_config.json's {key} must map module names to numbers, got {pattern!r}")
    if adapter_config.get("r") is not None and adapter_config["r"] < 1:
        raise ValueError(f"adapter_config.json's r is {adapter_config['r']}; it must be a positive integer")


def _check_peft_config(adapter_config: dict[str, Any], config: LLaMAConfig) -> tuple[set[str], set[str], bool]:
    """One-line errors for what our LoRA cannot express; the target modules' short names, the fully
    trained ones (modules_to_save), and whether the head stays tied to the embedding."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type is {adapter_config.get('peft_type')!r}; only LORA adapters can be converted")
    for flag, hint in (("use_dora", "DoRA"), ("use_rslora", "rank-stabilised scaling"), ("fan_in_fan_out", "fan_in_fan_out")):
        if adapter_config.get(flag):
            raise ValueError(f"the adapter uses {hint} ({flag}=true), which lit_llama's LoRA does not implement")
    if adapter_config.get("bias", "none") != "none":
        raise ValueError(f"the adapter trains biases (bias={adapter_config['bias']!r}); LLaMA's layers have none")
    if adapter_config.get("layers_to_transform") is not None:
        raise ValueError("the adapter covers only some layers (layers_to_transform); lit_llama's LoRA covers all")
    alpha = float(adapter_config.get("lora_alpha", 8))
    if any(float(a) != alpha for a in (adapter_config.get("alpha_pattern") or {}).values()):
        raise ValueError("the adapter has per-module alphas (alpha_pattern); lit_llama uses one alpha")
    targets = _peft_targets(adapter_config)
    unknown = targets - {s for names in PEFT_SHORT_NAMES.values() for s in names}
    if unknown:
        raise ValueError(f"target_modules {sorted(unknown)} have no lit_llama equivalent")
    mlp = {"gate_proj", "up_proj", "down_proj"} & targets
    if mlp and len(mlp) != 3:
        raise ValueError(f"the adapter adapts {sorted(mlp)} only; lit_llama's mlp target adapts gate_proj, up_proj and down_proj together")
    saved = {t.rsplit(".", 1)[-1] for t in adapter_config.get("modules_to_save") or []}
    if saved - {"embed_tokens", "lm_head"}:
        raise ValueError(f"modules_to_save {sorted(saved - {'embed_tokens', 'lm_head'})} cannot be converted (only embed_tokens, lm_head)")
    tie = bool(adapter_config.get("ensure_weight_tying")) and config.tie_embeddings
    if tie and "lm_head" in targets and "embed_tokens" not in targets:
        raise ValueError("a tied lm_head LoRA without an embed_tokens LoRA cannot be converted; target embed_tokens")
    return targets, saved, tie


def _strip_peft_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF module names: PEFT's prefix and the adapter name it sometimes leaves in (".default") removed."""
    sd = {}
    for k, v in tensors.items():
        k = k.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default.", ".").replace(".default.", ".")
        if k.endswith(".base_layer.weight"):
            continue  # PEFT's copies of frozen base weights: we never carry them
        sd[k] = v
    return sd


# HF module name (with {i} for the layer) -> ours, from convert_hf's weight-name table.
_HF_TO_LIT = {hf.removesuffix(".weight"): lit.removesuffix(".weight") for lit, hfs in LIT_TO_HF.items() for hf in hfs}


def _lit_module(hf_module: str) -> str:
    m = re.search(r"\.(\d+)\.", hf_module)
    key = hf_module if m is None else hf_module[: m.start()] + ".{i}." + hf_module[m.end():]
    if key not in _HF_TO_LIT:
        raise ValueError(f"{hf_module} is not a LlamaForCausalLM module")
    return _HF_TO_LIT[key].replace("{i}", m.group(1)) if m else _HF_TO_LIT[key]


def _lora_config_from_peft(
    adapter_config: dict[str, Any], config: LLaMAConfig, targets: set[str], saved: set[str], tie: bool,
    sd: dict[str, torch.Tensor],
) -> LoRAConfig:
    """Our LoRAConfig for the adapter; per-slice ranks of q/k/v_proj from their lora_A shapes."""
    r = int(adapter_config.get("r", 8))
    slice_ranks: dict[str, int] = {}
    for name in TARGETS:
        short = PEFT_SHORT_NAMES[name][0]
        if short in targets:
            shapes = {tuple(v.shape) for k, v in sd.items() if k.endswith(f".{short}.lora_A.weight")}
            if len(shapes) != 1:
                raise ValueError(f"{short}'s lora_A tensors are missing or differ in shape across layers: {sorted(shapes)}")
            slice_ranks[name] = next(iter(shapes))[0]
    untie = config.tie_embeddings and not tie and bool(("lm_head" in targets) or ("embed_tokens" in targets) or saved)
    return LoRAConfig(
        r=r, alpha=float(adapter_config.get("lora_alpha", 8)), dropout=float(adapter_config.get("lora_dropout", 0.0)),
        query="q_proj" in targets, key="k_proj" in targets, value="v_proj" in targets,
        projection="o_proj" in targets, mlp="gate_proj" in targets, head="lm_head" in targets and not tie,
        embedding="embed_tokens" in targets,
        **{f"r_{name}": rank for name, rank in slice_ranks.items() if rank != r},
        train_embedding="embed_tokens" in saved, train_head="lm_head" in saved and not tie,
        untie_embeddings=untie,
    )


def _lit_tensors(
    sd: dict[str, torch.Tensor], lora: LoRAConfig, config: LLaMAConfig, saved: set[str], tie: bool,
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under our names: q/k/v_proj's factors stacked into c_attn's (B rows
    of q/k back in our RoPE order), the tied head's transposed views checked and dropped."""
    r = lora.r
    out: dict[str, torch.Tensor] = {}
    c_attn_parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.endswith((".lora_A.weight", ".lora_B.weight")):
            hf_module, kind = k.removesuffix(".weight").rsplit(".", 1)
            short = hf_module.rsplit(".", 1)[-1]
            if short in ("q_proj", "k_proj", "v_proj"):
                c_attn_parts.setdefault(hf_module.rsplit(".", 1)[0], {})[f"{short}.{kind}"] = v
                continue
            if short == "lm_head" and tie:
                continue  # the tied head's views of the embedding's factors, checked below
            if v.shape[0 if kind == "lora_A" else 1] != r:
                raise ValueError(f"{k} has rank {v.shape}; lit_llama gives {short} the common rank r={r}")
            out[f"{_lit_module(hf_module)}.{kind}"] = v.contiguous()
        elif k.endswith((".lora_embedding_A", ".lora_embedding_B")):
            hf_module, kind = k.rsplit(".", 1)
            if v.shape[0 if kind.endswith("A") else 1] != r:
                raise ValueError(f"{k} has shape {tuple(v.shape)}; lit_llama gives embed_tokens the common rank r={r}")
            out[f"{_lit_module(hf_module)}.lora_{kind[-1]}"] = v.contiguous()
        elif k == "lm_head.weight" and tie:
            embed = sd.get("model.embed_tokens.weight")
            if embed is None or not torch.equal(v, embed):
                raise ValueError("ensure_weight_tying is set but the saved lm_head differs from embed_tokens")
        elif k.endswith(".weight") and k.removesuffix(".weight").rsplit(".", 1)[-1] in saved:
            out[f"{_lit_module(k.removesuffix('.weight'))}.weight"] = v.contiguous()
        else:
            raise ValueError(f"{k} is not a LoRA tensor this converter knows")
    if tie and lora.embedding:
        A, B = out.get("transformer.wte.lora_A"), out.get("transformer.wte.lora_B")
        head_A, head_B = sd.get("lm_head.lora_A.weight"), sd.get("lm_head.lora_B.weight")
        if head_A is not None and (A is None or not torch.equal(head_A, B.T) or not torch.equal(head_B, A.T)):
            raise ValueError("ensure_weight_tying is set but lm_head's LoRA is not the transpose of embed_tokens'")
    hs = config.head_size
    for hf_attn, parts in c_attn_parts.items():
        layout = slice_layout(config, lora)
        A = torch.cat([parts[f"{PEFT_SHORT_NAMES[name][0]}.lora_A"] for name, *_ in layout])  # (sum r_s, C)
        rows = sum(n * hs for _, n, *_ in layout)
        ref = parts[f"{PEFT_SHORT_NAMES[layout[0][0]][0]}.lora_B"]
        B = torch.zeros(rows, max(rank for *_, rank, _, _ in layout), dtype=ref.dtype)  # (sum rows, max r_s)
        for name, heads, n_rows, rank, _, b0 in layout:
            B_s = parts[f"{PEFT_SHORT_NAMES[name][0]}.lora_B"]  # (rows, r_s)
            if tuple(B_s.shape) != (n_rows, rank):
                raise ValueError(f"{hf_attn}.{PEFT_SHORT_NAMES[name][0]}.lora_B is {tuple(B_s.shape)}, expected {(n_rows, rank)}; "
                                 "is --checkpoint_dir the base model the adapter was trained on?")
            B[b0:b0 + n_rows, :rank] = B_s if name == "value" else hf_to_meta_rows(B_s, heads)
        c_attn = _lit_module(hf_attn + ".q_proj")  # transformer.h.{i}.attn.c_attn
        out[f"{c_attn}.lora_A"], out[f"{c_attn}.lora_B"] = A, B
    return out
