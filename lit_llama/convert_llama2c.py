"""Karpathy's llama2.c checkpoints -> our config and state dict.

Two formats:
  .pt   what llama2.c's train.py saves: {"model": state_dict, "model_args": {...}, "optimizer": ...}.
        The state dict uses Meta's names (a torch.compile'd model prefixes them with `_orig_mod.`).
  .bin  the legacy ("version 0") export that run.c reads: 7 int32 (dim, hidden_dim, n_layers,
        n_heads, n_kv_heads, vocab_size, seq_len), then float32 tensors kind by kind (see
        `BIN_ORDER`). A negative vocab_size means an unshared classifier follows at the end.
Both use Meta's interleaved RoPE, as we do, so tensors are copied without any permutation; the
names go through the single Meta table in `convert_meta`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_llama.convert_meta import meta_to_lit
from lit_llama.model import LLaMAConfig

BIN_HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
# The first 4 bytes of llama2.c's versioned exports (`version1_export` and later): "ak42" as uint32.
VERSIONED_MAGIC = 0x616B3432


def bin_layout(h: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """(Meta name or a RoPE table to skip, shape) in the order llama2.c's legacy export writes them;
    each per-layer kind is stored for all layers before the next kind starts."""
    dim, hidden, n_layers, vocab = h["dim"], h["hidden_dim"], h["n_layers"], abs(h["vocab_size"])
    hs = dim // h["n_heads"]
    kv_dim = h["n_kv_heads"] * hs
    per_layer = [
        ("attention_norm", (dim,)), ("attention.wq", (dim, dim)), ("attention.wk", (kv_dim, dim)),
        ("attention.wv", (kv_dim, dim)), ("attention.wo", (dim, dim)), ("ffn_norm", (dim,)),
        ("feed_forward.w1", (hidden, dim)), ("feed_forward.w2", (dim, hidden)), ("feed_forward.w3", (hidden, dim)),
    ]
    layout = [("tok_embeddings.weight", (vocab, dim))]
    for kind, shape in per_layer:
        layout += [(f"layers.{i}.{kind}.weight", shape) for i in range(n_layers)]
    layout.append(("norm.weight", (dim,)))
    # Precomputed RoPE cos/sin (seq_len, hs/2) each; we compute our own.
    layout += [("freq_cis_real", (h["seq_len"], hs // 2)), ("freq_cis_imag", (h["seq_len"], hs // 2))]
    if h["vocab_size"] < 0:
        layout.append(("output.weight", (vocab, dim)))
    return layout


def load_llama2c_bin(path: Path) -> tuple[LLaMAConfig, dict[str, torch.Tensor]]:
    """Config and our state dict from a legacy llama2.c .bin (the file is memory-mapped)."""
    size = path.stat().st_size
    if size < 4 * len(BIN_HEADER):
        raise ValueError(f"{path} has only {size} bytes, not even a llama2.c header; the file is truncated")
    raw = np.fromfile(path, dtype="<i4", count=len(BIN_HEADER))
    if int(raw[0].view("<u4")) == VERSIONED_MAGIC:
        raise ValueError(
            f"{path} is a versioned llama2.c export (magic 'ak42'); only the legacy .bin is read: "
            "export with llama2.c's `export.py --version 0` or convert the .pt checkpoint instead"
        )
    h = dict(zip(BIN_HEADER, (int(v) for v in raw)))
    if min(h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"], h["seq_len"], abs(h["vocab_size"])) <= 0 \
            or h["dim"] % h["n_heads"] or h["n_heads"] % h["n_kv_heads"]:
        raise ValueError(f"{path} does not start with a valid llama2.c header (read {h}); is it a llama2.c .bin?")
    layout = bin_layout(h)
    n_floats = sum(int(np.prod(shape)) for _, shape in layout)
    expected = 4 * len(BIN_HEADER) + 4 * n_floats
    if size != expected:
        raise ValueError(
            f"{path} has {size} bytes but its header ({', '.join(f'{k}={v}' for k, v in h.items())}) needs "
            f"{expected}; the file is {'truncated' if size < expected else 'longer than the header says'}: download it again"
        )
    # mode "c": a private copy-on-write mapping, so the tensors are writable without touching the file.
    data = torch.from_numpy(np.memmap(path, dtype="<f4", mode="c", offset=4 * len(BIN_HEADER), shape=(n_floats,)))
    meta: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in layout:
        n = int(np.prod(shape))
        meta[name] = data[offset:offset + n].view(shape)
        offset += n
    shared = h["vocab_size"] > 0
    if shared:
        meta["output.weight"] = meta["tok_embeddings.weight"]
    del meta["freq_cis_real"], meta["freq_cis_imag"]
    config = LLaMAConfig(
        block_size=h["seq_len"],
        vocab_size=abs(h["vocab_size"]),
        padded_vocab_size=abs(h["vocab_size"]),
        n_layer=h["n_layers"],
        n_head=h["n_heads"],
        n_embd=h["dim"],
        n_query_groups=h["n_kv_heads"],
        intermediate_size=h["hidden_dim"],
        norm_eps=1e-5,  # llama2.c's ModelArgs default; run.c hard-codes it
        rope_base=10000.0,
        tie_embeddings=shared,
        source=f"llama2.c {path.name}",
    )
    return config, meta_to_lit(meta, config.n_layer, shared, path.name)


def load_llama2c_pt(path: Path) -> tuple[LLaMAConfig, dict[str, torch.Tensor]]:
    """Config and our state dict from a llama2.c train.py checkpoint (.pt), loaded without
    unpickling arbitrary objects."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise ValueError(
            f"cannot load {path} safely (torch.load with weights_only=True refused it: {str(e).splitlines()[0][:160]}); "
            "it holds more than tensors and plain types, so it is not read: re-save its 'model' and 'model_args' alone"
        ) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} has no 'model' and 'model_args' (found {keys}); is it a llama2.c train.py checkpoint?")
    args: dict[str, Any] = checkpoint["model_args"]
    # torch.compile'd models save their parameters under `_orig_mod.`.
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if k not in args]
    if missing or "tok_embeddings.weight" not in state_dict or "layers.0.feed_forward.w1.weight" not in state_dict:
        raise ValueError(f"{path} lacks {missing or 'tok_embeddings/w1 weights'}; is it a llama2.c train.py checkpoint?")
    hidden = state_dict["layers.0.feed_forward.w1.weight"].shape[0]
    if args.get("hidden_dim") and args["hidden_dim"] != hidden:
        raise ValueError(f"{path}: model_args says hidden_dim {args['hidden_dim']} but w1 has {hidden} rows")
    tied = "output.weight" not in state_dict or torch.equal(state_dict["output.weight"], state_dict["tok_embeddings.weight"])
    state_dict.setdefault("output.weight", state_dict["tok_embeddings.weight"])
    vocab_rows = state_dict["tok_embeddings.weight"].shape[0]
    config = LLaMAConfig(
        block_size=args.get("max_seq_len", 2048),
        vocab_size=args["vocab_size"],
        padded_vocab_size=vocab_rows,
        n_layer=args["n_layers"],
        n_head=args["n_heads"],
        n_embd=args["dim"],
        n_query_groups=args.get("n_kv_heads") or args["n_heads"],
        intermediate_size=hidden,
        multiple_of=args.get("multiple_of", 256),
        norm_eps=args.get("norm_eps", 1e-5),
        rope_base=10000.0,
        tie_embeddings=tied,
        source=f"llama2.c {path.name}",
    )
    return config, meta_to_lit(state_dict, config.n_layer, tied, path.name)


def load_llama2c(path: Path | str) -> tuple[LLaMAConfig, dict[str, torch.Tensor]]:
    """A llama2.c checkpoint of either kind: a zip (or pickle) .pt/.pth, else a legacy .bin."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint {str(path)!r} does not exist; pass a .pt from train.py or a .bin export")
    if path.suffix in (".pt", ".pth") or zipfile.is_zipfile(path):
        return load_llama2c_pt(path)
    return load_llama2c_bin(path)
