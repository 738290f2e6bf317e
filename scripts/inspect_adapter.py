"""List what a LoRA adapter file holds, and flag anything that looks like a frozen base weight.

    python scripts/inspect_adapter.py out/lora/alpaca/lit_model.lora.safetensors [--checkpoint_dir DIR] [--strict true]

Prints every tensor (name, shape, dtype, bytes) and the metadata stored with it (r, alpha, targets,
embedding options, prompt style, base fingerprint). A tensor whose shape is the shape of a weight
of the base model is flagged: an adapter should hold only what was trained, and a copy of a frozen
base weight only makes it bigger. An embedding/head the adapter declares as trained in full is
listed as such, not flagged. `--strict true` turns a flag into an error (exit status 2).
"""

from __future__ import annotations

import json
from pathlib import Path

from lit_llama.adapter import base_fingerprint, read_adapter_file
from lit_llama.checkpoint import load_config
from lit_llama.cli import run
from lit_llama.convert_hf import lit_shapes
from lit_llama.lora import is_lora_key
from lit_llama.model import LLaMAConfig


def main(
    path: Path, checkpoint_dir: Path | None = None, strict: bool = False,
) -> list[str]:
    """Show an adapter's tensors and metadata; flag tensors shaped like frozen base weights.

    Args:
        path: The adapter file (.safetensors or .pth) to inspect.
        checkpoint_dir: The base checkpoint to compare shapes with (default: the base config stored in the adapter).
        strict: Fail (exit status 2) when a tensor is flagged.
    """
    tensors, meta = read_adapter_file(path)
    if not isinstance(tensors, dict):
        raise ValueError(f"{path} does not hold a dict of tensors; is it an adapter?")
    meta = meta or {}
    config: LLaMAConfig | None = None
    if checkpoint_dir is not None:
        config = load_config(checkpoint_dir)
        if meta.get("base_fingerprint") and meta["base_fingerprint"] != base_fingerprint(config):
            raise ValueError(f"{path.name} was trained for another base model than {str(checkpoint_dir)!r}; pass the base "
                             "checkpoint it was finetuned from, or no --checkpoint_dir to use the base config it records")
    elif meta.get("base_config"):
        try:
            config = LLaMAConfig(**json.loads(meta["base_config"]))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} has a broken base_config in its metadata ({e}); save the adapter again") from None
    base_shapes: dict[tuple[int, ...], list[str]] = {}
    for name, shape in (lit_shapes(config) if config else {}).items():
        base_shapes.setdefault(tuple(shape), []).append(name)
    # The full weights the metadata declares as trained (train_modules); a tied head is the embedding.
    train_modules = {t for t in meta.get("train_modules", "").split(",") if t}
    tied = config is not None and config.tie_embeddings and meta.get("untie_embeddings") != "true"
    trained = set()
    if "embedding" in train_modules or (tied and "head" in train_modules):
        trained.add("transformer.wte.weight")
    if "head" in train_modules and not tied:
        trained.add("lm_head.weight")

    flagged: list[str] = []
    total = 0
    width = max(len(k) for k in tensors) if tensors else 4
    print(f"{'tensor':<{width}}  {'shape':<16} {'dtype':<9} {'bytes':>12}  note")
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        total += nbytes
        note = ""
        if not is_lora_key(name):
            note = "embedding layer" if name.endswith("new_rows") else "full weight"
        if tuple(t.shape) in base_shapes:
            if name in trained:
                note = "full weight, trained (declared in train_modules)"
            else:
                note = f"FLAG: shaped like the frozen base weight {base_shapes[tuple(t.shape)][0]}"
                flagged.append(name)
        shape = "(" + ", ".join(map(str, t.shape)) + ")"
        print(f"{name:<{width}}  {shape:<16} {str(t.dtype).removeprefix('torch.'):<9} {nbytes:>12,}  {note}")
    print(f"{len(tensors)} tensors, {total:,} bytes ({total / 2**20:.2f} MiB) of tensor data; file {Path(path).stat().st_size:,} bytes")
    print("metadata:" if meta else "metadata: none (a bare state dict, e.g. an original lit-llama adapter)")
    for key, value in sorted(meta.items()):
        print(f"  {key}: {value}")
    if config is None:
        print("no base config (pass --checkpoint_dir): tensors were not compared with base weight shapes")
    if flagged:
        message = (
            f"{len(flagged)} tensor(s) look like frozen base weights ({', '.join(flagged[:3])}); "
            "save the adapter with save_embedding_layers=auto to leave them out"
        )
        if strict:
            raise ValueError(message)
        print(f"warning: {message}")
    return flagged


if __name__ == "__main__":
    run(main, positional=True)
