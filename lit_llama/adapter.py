"""The adapter file: what finetune/lora.py writes and every script that uses an adapter reads.

One file (.safetensors, or .pth) holds the LoRA tensors, any embedding/head weights that were trained
or grown, and strings that describe it: the `LoRAConfig` as one JSON document (`lora_config`), the
prompt style, the special tokens, and a fingerprint of the base model's shapes. The flow:
    save_adapter(model, "out/lit_model.lora.safetensors", lora, prompt_style="alpaca")
    _, meta = load_adapter(path)                          # tensors + AdapterMeta, nothing built yet
    model = load_lora_model(checkpoint_dir, meta.lora)    # lit_llama/lora.py
    apply_adapter(model, path)                            # checked against the base, then copied in
Files of older versions keep loading: v2/v1 metadata strings (r, alpha, targets, ...) and the
original lit-llama's bare state dicts (with a warning).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lit_llama.checkpoint import REFUSED_PICKLE, atomic_path, runs_code_if_loaded, save_weights
from lit_llama.lora import (
    ALL_TARGETS,
    TARGETS,
    LoRAConfig,
    build_lora_model,
    full_trained_parameters,
    is_lora_key,
    is_tied,
    lora_layers,
    lora_state_dict,
)
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.qlora import QUANTIZE_MODES

# The config fields that decide the base weights' shapes: an adapter fits a base iff these match.
SHAPE_FIELDS = (
    "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "n_query_groups", "intermediate_size",
    "tie_embeddings",
)
ADAPTER_FORMAT = "lit_llama.lora.v3"  # v3: the LoRAConfig as one JSON document; v2/v1 files still read
RAW_ALPHA = 16.0  # lit-llama's lora_alpha, assumed for its adapters (which store no metadata)
SaveEmbeddingLayers = Literal["auto", "true", "false"]


def base_shape(config: LLaMAConfig) -> dict[str, Any]:
    shape = {name: getattr(config, name) for name in SHAPE_FIELDS}
    if config.head_size != config.n_embd // config.n_head:
        # Recorded only when it is not n_embd // n_head, so fingerprints of older adapters still match.
        shape["head_size"] = config.head_size
    return shape


def base_fingerprint(config: LLaMAConfig) -> str:
    """sha256 of the JSON of the config's shape fields."""
    return hashlib.sha256(json.dumps(base_shape(config), sort_keys=True).encode()).hexdigest()


@dataclass
class AdapterMeta:
    """What an adapter file says about itself (None: not recorded, as in lit-llama adapters).
    `embedding_layers` names the non-LoRA tensors it carries (trained or grown embedding/head)."""

    lora: LoRAConfig
    prompt_style: str | None = None
    base_fingerprint: str | None = None
    base_config: dict[str, Any] | None = None
    embedding_layers: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()  # tokens added to the tokenizer, in id order (lit_llama/tokenizer.py)
    quantize: str = "none"  # how the frozen base was stored in training (lit_llama/qlora.py); older files: none


def adapter_tensors(
    model: LLaMA, lora: LoRAConfig, save_embedding_layers: SaveEmbeddingLayers | bool = "auto"
) -> dict[str, torch.Tensor]:
    """What an adapter file holds: the LoRA tensors, plus embedding/head weights as asked.

    save_embedding_layers: "auto" saves a fully trained embedding/head whole, and of a grown but
    frozen one only its new rows (`transformer.wte.new_rows`, `lm_head.new_rows`): never a copy of a
    frozen base weight. "true" saves the embedding (and an untied head) whole in every case.
    "false" saves none; refused when they were trained, since the adapter would lose that training.
    """
    mode = str(save_embedding_layers).lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"save_embedding_layers must be auto, true or false, got {save_embedding_layers!r}")
    tensors = {k: v.detach().cpu() for k, v in lora_state_dict(model).items()}
    full = full_trained_parameters(model)
    tied = is_tied(model)
    if mode == "false":
        if full:
            raise ValueError(
                f"save_embedding_layers=false would drop the trained {', '.join(full)}; use auto (the default)"
            )
        return tensors
    if mode == "true":
        full = {"transformer.wte.weight": model.transformer.wte.weight}
        if not tied:
            full["lm_head.weight"] = model.lm_head.weight
    tensors.update({k: p.detach().cpu() for k, p in full.items()})
    if lora.resize_vocab is not None:  # the grown rows of a frozen embedding/head: only they are new
        new = slice(model.config.vocab_size, lora.resize_vocab)
        if "transformer.wte.weight" not in full:
            tensors["transformer.wte.new_rows"] = model.transformer.wte.weight.detach()[new].cpu()
        if not tied and "lm_head.weight" not in full:
            tensors["lm_head.new_rows"] = model.lm_head.weight.detach()[new].cpu()
    return tensors


def adapter_metadata(
    lora: LoRAConfig, base_config: LLaMAConfig, prompt_style: str | None = None, embedding_layers: tuple[str, ...] = (),
    special_tokens: Sequence[str] = (), quantize: str = "none",
) -> dict[str, str]:
    """The strings an adapter file stores about itself (its safetensors header). The LoRAConfig is
    one JSON document of all its fields, read back by `LoRAConfig(**...)`: a new field needs no code
    here. The v2 summary strings beside it (r, alpha, targets, ...) are for readers of older versions.
    `quantize`: the mode the frozen base was quantized with in training (nf4, nf4-dq, int8; none)."""
    ranks = {name: rank for name, rank in zip(TARGETS, lora.slice_ranks) if rank and rank != lora.r}
    return {
        "format": ADAPTER_FORMAT,
        "lora_config": json.dumps(dataclasses.asdict(lora), sort_keys=True),
        "r": str(lora.r),
        "alpha": repr(float(lora.alpha)),
        "dropout": repr(float(lora.dropout)),
        "targets": lora.targets,
        "ranks": json.dumps(ranks, sort_keys=True) if ranks else "",
        "train_modules": lora.train_modules,
        "untie_embeddings": "true" if lora.untie_embeddings else "false",
        "resize_vocab": "" if lora.resize_vocab is None else str(lora.resize_vocab),
        "pad_id": "" if lora.pad_id is None else str(lora.pad_id),
        "embedding_layers": ",".join(embedding_layers),
        "special_tokens": json.dumps(list(special_tokens)) if special_tokens else "",
        "prompt_style": prompt_style or "",
        "base_fingerprint": base_fingerprint(base_config),
        "base_config": json.dumps(base_shape(base_config), sort_keys=True),
        "quantize": quantize,
    }


def write_adapter(tensors: dict[str, torch.Tensor], path: Path | str, meta: dict[str, str]) -> Path:
    """Write adapter tensors and metadata strings atomically: .safetensors (metadata in its header)
    or .pth ({"lora": tensors, "meta": dict})."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"adapter path {str(path)!r} must end in .safetensors or .pth")
    check_replaceable(path)
    meta = {**meta, "tensors_sha256": tensors_sha256(tensors)}
    if path.suffix == ".safetensors":
        save_weights(tensors, path, metadata=meta)
    else:
        with atomic_path(path) as tmp:
            torch.save({"lora": {k: v.contiguous() for k, v in tensors.items()}, "meta": meta}, tmp)
    return path


def check_replaceable(path: Path) -> None:
    """An existing .safetensors file is replaced only if it is a lit_llama adapter (a rerun writing its
    result again): a base model's weights or any other file passed by mistake is never overwritten."""
    if path.suffix != ".safetensors" or not path.is_file():
        return
    try:
        with safe_open(path, "pt") as f:
            ours = str((f.metadata() or {}).get("format", "")).startswith("lit_llama.lora")
    except Exception:  # not a safetensors file at all
        ours = False
    if not ours:
        raise FileExistsError(f"{str(path)!r} exists and is not a lit_llama adapter; it is not overwritten")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: stored with an adapter
    (a few MB, so hashing is cheap) to tell a damaged file from a good one at load."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_adapter(
    model: LLaMA, path: Path | str, lora: LoRAConfig, base_config: LLaMAConfig | None = None,
    prompt_style: str | None = None, save_embedding_layers: SaveEmbeddingLayers | bool = "auto",
    special_tokens: Sequence[str] = (), quantize: str | None = None,
) -> Path:
    """Write what was trained (`adapter_tensors`) and what is needed to use it (r, alpha, dropout,
    targets, ranks, embedding options, prompt style, the base's fingerprint) to a .safetensors file
    (metadata in its header) or a .pth file ({"lora": tensors, "meta": dict}). `base_config`
    defaults to `model.config` (the base checkpoint's config, also after untying or resizing);
    `quantize` records how the frozen base was quantized (default: the model's `quantize_mode`, set by
    lit_llama/qlora.py, else none)."""
    quantize = quantize or getattr(model, "quantize_mode", "none")
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"adapter path {str(path)!r} must end in .safetensors or .pth")
    built = getattr(model, "lora_config", None)
    if built is None:
        raise ValueError("the model has no LoRA layers; build it with build_lora_model or load_lora_model")
    if built.layout != lora.layout:
        raise ValueError(
            f"the model's LoRA layers do not match the LoRAConfig given (r={lora.r}, targets {lora.targets}); "
            "pass the config the model was built with"
        )
    tensors = adapter_tensors(model, lora, save_embedding_layers)
    embedding_layers = tuple(k for k in tensors if not is_lora_key(k))
    meta = adapter_metadata(lora, base_config or model.config, prompt_style, embedding_layers, special_tokens, quantize)
    return write_adapter(tensors, path, meta)


def _meta_from_strings(meta: dict[str, str], path: Path) -> AdapterMeta:
    try:
        lora = _lora_from_json(meta["lora_config"]) if meta.get("lora_config") else _lora_from_v2_strings(meta)
        base_config = json.loads(meta["base_config"]) if meta.get("base_config") else None
        layers = tuple(k for k in meta.get("embedding_layers", "").split(",") if k)
        special = tuple(json.loads(meta["special_tokens"])) if meta.get("special_tokens") else ()
        if not all(isinstance(t, str) for t in special):
            raise TypeError("special_tokens is not a list of strings")
        quantize = meta.get("quantize") or "none"  # files written before QLoRA: a float base
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"unknown quantize mode {quantize!r}")
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path} has broken adapter metadata ({type(e).__name__}: {e}); save the adapter again") from None
    return AdapterMeta(lora, meta.get("prompt_style") or None, meta.get("base_fingerprint") or None, base_config, layers,
                       special, quantize)


def _lora_from_json(document: str) -> LoRAConfig:
    fields = json.loads(document)
    if not isinstance(fields, dict):
        raise TypeError("lora_config is not a JSON object")
    return LoRAConfig(**fields)  # an unknown field is a TypeError; a bad value LoRAConfig's own ValueError


def _lora_from_v2_strings(meta: dict[str, str]) -> LoRAConfig:
    """The LoRAConfig of a file written before `lora_config` existed (formats v1, v2)."""
    targets = {t for t in meta["targets"].split(",") if t}
    unknown = targets - set(ALL_TARGETS)
    if unknown:
        raise ValueError(f"unknown targets {sorted(unknown)}")
    ranks = json.loads(meta["ranks"]) if meta.get("ranks") else {}
    train = {t for t in meta.get("train_modules", "").split(",") if t}
    lora = LoRAConfig(
        r=int(meta["r"]), alpha=float(meta["alpha"]), dropout=float(meta["dropout"]),
        **{name: name in targets for name in ALL_TARGETS},
        **{f"r_{name}": int(rank) for name, rank in ranks.items()},
        train_embedding="embedding" in train, train_head="head" in train,
        untie_embeddings=meta.get("untie_embeddings") == "true",
        resize_vocab=int(meta["resize_vocab"]) if meta.get("resize_vocab") else None,
        pad_id=int(meta["pad_id"]) if meta.get("pad_id") else None,
    )
    return lora


def _raw_meta(state_dict: dict[str, torch.Tensor], path: Path) -> AdapterMeta:
    """lit-llama adapters are bare state dicts: r from lora_A's rows, assuming Q+V and alpha 16."""
    a_rows = {v.shape[0] for k, v in state_dict.items() if k.endswith("lora_A")}
    if len(a_rows) != 1 or next(iter(a_rows)) % 2:
        raise ValueError(f"{path} has no metadata and its lora_A shapes {sorted(a_rows)} are not lit-llama's Q+V layout")
    r = next(iter(a_rows)) // 2
    warnings.warn(
        f"{path} has no metadata (a lit-llama adapter?): assuming r={r} from lora_A's shape, "
        f"targets query,value and alpha={RAW_ALPHA:g}",
        stacklevel=3,
    )
    return AdapterMeta(LoRAConfig(r=r, alpha=RAW_ALPHA, query=True, key=False, value=True))


def read_adapter_file(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors and metadata strings of an adapter file, read safely (no checks)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist; pass the .lora.safetensors/.pth finetune wrote")
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                meta_strings = f.metadata() or None
            return load_file(path), meta_strings
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and set(obj) == {"lora", "meta"}:
            return obj["lora"], obj["meta"]
        return obj, None
    except Exception as e:  # a truncated file, a pickle with code in it, not an adapter at all
        if runs_code_if_loaded(e):
            raise ValueError(f"cannot read adapter {path}: {REFUSED_PICKLE}") from None
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise ValueError(
            f"cannot read adapter {path}: {type(e).__name__}: {detail}; the file is damaged or incomplete: "
            "copy it again or rerun finetune/lora.py"
        ) from None


def load_adapter(path: Path | str) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    """Read an adapter written by `save_adapter`, or a bare lit-llama LoRA state dict (with a warning)."""
    path = Path(path)
    state_dict, meta_strings = read_adapter_file(path)
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{path} holds no tensors; is it an adapter?")
    # Safetensors files from elsewhere may carry metadata of their own (e.g. {"format": "pt"}).
    ours = bool(meta_strings) and str(meta_strings.get("format", "")).startswith("lit_llama.lora")
    meta = _meta_from_strings(meta_strings, path) if ours else None
    declared = set(meta.embedding_layers) if meta else set()
    others = [k for k in state_dict if not is_lora_key(k) and k not in declared]
    if others:
        raise ValueError(f"{path} is not a LoRA adapter: it holds non-LoRA tensors such as {others[0]!r}")
    if meta is None:
        meta = _raw_meta(state_dict, path)
    claimed = (meta_strings or {}).get("tensors_sha256")
    if claimed and claimed != tensors_sha256(state_dict):
        raise ValueError(f"{path} fails its checksum: its tensors changed since they were saved (a damaged copy?); "
                         "copy it again or rerun finetune/lora.py")
    for name, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path} holds non-finite values (NaN or inf) in {name}: the training that wrote it "
                             "diverged; use an earlier iter-* adapter or finetune again with a lower learning rate")
    if meta.base_config is not None:  # the metadata must agree with the tensors before a model is built from it
        check_adapter_fits_its_base(state_dict, meta, path.name)
    return state_dict, meta


def check_adapter_fits_its_base(state_dict: dict[str, torch.Tensor], meta: AdapterMeta, name: str) -> None:
    """A one-line error unless the file's tensors have the shapes its LoRAConfig gives on the base it
    records (built on the meta device: an adapter claiming r=10^7 or a 10^9-token vocabulary
    allocates nothing before it is refused)."""
    try:
        config = LLaMAConfig(**meta.base_config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} has a broken base_config in its metadata ({e}); save the adapter again") from None
    check_adapter_shapes(state_dict, meta.lora, config, name)
    grown = meta.lora.resize_vocab
    rows = {"transformer.wte.new_rows": (grown or config.vocab_size) - config.vocab_size,
            "lm_head.new_rows": (grown or config.vocab_size) - config.vocab_size,
            "transformer.wte.weight": max(config.padded_vocab_size, grown or 0),
            "lm_head.weight": max(config.padded_vocab_size, grown or 0)}
    for key in meta.embedding_layers:
        if key in state_dict and key in rows and tuple(state_dict[key].shape) != (rows[key], config.n_embd):
            raise ValueError(f"{name} does not fit its metadata: {key} is {tuple(state_dict[key].shape)}, "
                             f"resize_vocab={grown} on a {config.vocab_size}-token base needs {(rows[key], config.n_embd)}")
    if grown is not None and not set(meta.embedding_layers) & set(rows) and grown > 2 * config.vocab_size:
        raise ValueError(f"{name} claims resize_vocab={grown} for a {config.vocab_size}-token base but carries no grown "
                         "rows; its metadata is damaged: save the adapter again")


def _describe(shape: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def check_adapter_base(meta: AdapterMeta, config: LLaMAConfig, name: str) -> None:
    """A one-line error when the adapter was trained for another base than `config`."""
    if meta.base_fingerprint is not None and meta.base_fingerprint != base_fingerprint(config):
        ours = base_shape(config)
        theirs = meta.base_config or {}
        keys = list(dict.fromkeys([*ours, *theirs]))  # SHAPE_FIELDS, then head_size where either records it
        diff = [k for k in keys if theirs.get(k) != ours.get(k)] or list(SHAPE_FIELDS)
        raise ValueError(
            f"{name} was trained for another base model ({_describe({k: theirs.get(k) for k in diff})}), "
            f"not this one ({_describe({k: ours.get(k) for k in diff})}); load the base checkpoint it was finetuned from"
        )


def copy_adapter_(model: LLaMA, state_dict: dict[str, torch.Tensor], meta: AdapterMeta, name: str = "the adapter") -> None:
    """Copy adapter tensors into `model` (built with `meta.lora`), checking that every tensor fits."""
    check_adapter_base(meta, model.config, name)
    lora = meta.lora
    built = getattr(model, "lora_config", None)
    if built is None or built.layout != lora.layout:
        raise ValueError(
            f"{name} needs a model with LoRA r={lora.r}, alpha={lora.alpha:g}, targets {lora.targets}; "
            "build it with load_lora_model(checkpoint_dir, meta.lora) from meta = load_adapter(path)[1]"
        )
    if any(layer.merged for layer in lora_layers(model)):
        raise ValueError("the model's LoRA weights are merged; call unmerge_lora_weights(model) before applying an adapter")
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set(lora_state_dict(model))
    given = {k for k in state_dict if is_lora_key(k)}
    if given != expected:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise ValueError(f"{name} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tied = is_tied(model)
    new = slice(model.config.vocab_size, lora.resize_vocab or model.config.vocab_size)
    targets: dict[str, torch.Tensor] = {k: params[k] for k in given}
    for k in state_dict.keys() - given:
        if k == "lm_head.weight" and tied:
            raise ValueError(f"{name} holds a separate lm_head.weight but the model's head is tied to its embedding")
        if k.endswith(".new_rows"):
            if lora.resize_vocab is None or (k == "lm_head.new_rows" and tied):
                raise ValueError(f"{name} holds {k} but the model has no such grown rows")
            targets[k] = (model.transformer.wte.weight if k.startswith("transformer") else model.lm_head.weight)[new]
        elif k in ("transformer.wte.weight", "lm_head.weight"):
            targets[k] = model.transformer.wte.weight if k.startswith("transformer") else model.lm_head.weight
        else:
            raise ValueError(f"{name} holds {k!r}, which is neither a LoRA tensor nor an embedding layer")
    with torch.no_grad():
        for k, target in targets.items():
            if target.shape != state_dict[k].shape:
                raise ValueError(
                    f"{name} does not fit the model: {k} is {tuple(state_dict[k].shape)}, the model has {tuple(target.shape)}"
                )
            target.copy_(state_dict[k])


def apply_adapter(model: LLaMA, path: Path | str) -> AdapterMeta:
    """Copy an adapter's tensors into `model`'s LoRA parameters (their dtype and device are kept),
    and any embedding/head weights it carries into the model's.

    The model must be the base the adapter was trained on (checked by fingerprint when the file
    has one) and be built with the adapter's LoRAConfig: `load_lora_model(dir, meta.lora)`."""
    path = Path(path)
    state_dict, meta = load_adapter(path)
    copy_adapter_(model, state_dict, meta, path.name)
    return meta



def check_adapter_shapes(state_dict: dict[str, torch.Tensor], lora: LoRAConfig, config: LLaMAConfig, name: str) -> None:
    """A one-line error unless `state_dict` holds exactly the LoRA tensors a model of `config` with
    `lora` has, in their shapes (checked on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in lora_state_dict(build_lora_model(config, lora)).items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items() if is_lora_key(k)}
    if set(given) != set(expected):
        missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        raise ValueError(f"{name} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, shape in given.items():
        if shape != expected[k]:
            raise ValueError(f"{name} does not fit the model: {k} is {shape}, the model has {expected[k]}")
