"""A lit_llama LoRA adapter as a llama.cpp LoRA adapter GGUF (`llama-cli -m base.gguf --lora adapter.gguf`).

llama.cpp's adapter format: general.architecture=llama, general.type=adapter, adapter.type=lora,
adapter.lora.alpha, and per adapted base tensor NAME two tensors NAME.lora_a (numpy shape (r, n_in))
and NAME.lora_b ((n_out, r)), F32 here. llama.cpp adds scale * lora_b @ lora_a to the base output with
scale = alpha / r, r being that tensor's own rank (lora_b's columns), so one alpha serves every tensor.

Ours per target (names from convert_gguf's LIT_TO_GGUF): c_attn's Q/K/V slices become attn_q /
attn_k / attn_v, each with its own rank r_s; our slice scaling is alpha / r_s too (MergedLinear's
per-slice scaling), so llama.cpp's alpha / rank_of_that_tensor equals ours with the same alpha and no
tensor needs pre-scaling. projection -> attn_output, mlp -> ffn_gate, ffn_up, ffn_down, an untied
head -> output. An embedding LoRA (or a tied head's, which lives in the embedding), trained full
embeddings or head, a grown vocabulary and an untied copy of a tied head have no place in the format:
one-line errors naming the target (merge the adapter instead: scripts/convert_lit_to_gguf.py --lora_path).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from lit_llama.adapter import check_adapter_base, load_adapter
from lit_llama.checkpoint import atomic_path, load_config
from lit_llama.convert_gguf import gguf_names_for
from lit_llama.lora import BLOCK_TARGETS, LoRAConfig
from lit_llama.model import LLaMAConfig
from lit_llama.peft_interop import slice_layout

MERGE_INSTEAD = "merge it into the model instead: scripts/convert_lit_to_gguf.py --lora_path"


def check_exportable(lora: LoRAConfig, config: LLaMAConfig) -> None:
    """One-line ValueError for what llama.cpp's LoRA format cannot hold."""
    problems = [
        (lora.embedding, "the embedding target (a LoRA on token_embd)"),
        (lora.head and config.tie_embeddings and not lora.untie_embeddings,
         "the head target on a tied model (its update lives in the embedding)"),
        (lora.untie_embeddings, "untie_embeddings (the base GGUF has no output.weight of its own)"),
        (lora.resize_vocab is not None, f"resize_vocab={lora.resize_vocab} (a grown vocabulary)"),
        (lora.train_embedding, "train_embedding (a fully trained embedding)"),
        (lora.train_head, "train_head (a fully trained head)"),
    ]
    for bad, what in problems:
        if bad:
            raise ValueError(f"the adapter uses {what}, which a llama.cpp LoRA adapter cannot hold; {MERGE_INSTEAD}")


def adapter_gguf_tensors(
    state_dict: dict[str, torch.Tensor], lora: LoRAConfig, config: LLaMAConfig
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF base tensor name -> (lora_a (r, n_in), lora_b (n_out, r)) as float32 arrays, such that
    alpha / r * lora_b @ lora_a is our update of that tensor (r = lora_a's rows)."""
    check_exportable(lora, config)

    def get(name: str) -> np.ndarray:
        if name not in state_dict:
            raise ValueError(f"the adapter lacks {name}, which its LoRA config implies; is it complete?")
        return state_dict[name].detach().float().numpy()

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    slices = slice_layout(config, lora)
    for i in range(config.n_layer):
        if slices:
            prefix = f"transformer.h.{i}.attn.c_attn"
            A, B = get(f"{prefix}.lora_A"), get(f"{prefix}.lora_B")  # (sum r_s, C), (sum rows, max r_s)
            q, k, v = gguf_names_for(f"{prefix}.weight")
            names = {"query": q, "key": k, "value": v}
            for name, _, rows, rank, a0, b0 in slices:
                out[names[name]] = (A[a0:a0 + rank], B[b0:b0 + rows, :rank])
        for target, paths in BLOCK_TARGETS.items():
            if getattr(lora, target):
                for path in paths:
                    prefix = f"transformer.h.{i}.{path}"
                    out[gguf_names_for(f"{prefix}.weight")[0]] = (get(f"{prefix}.lora_A"), get(f"{prefix}.lora_B"))
    if lora.head:
        out[gguf_names_for("lm_head.weight")[0]] = (get("lm_head.lora_A"), get("lm_head.lora_B"))
    return out


def write_adapter_gguf(path: Path | str, tensors: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float, name: str = "") -> None:
    """The adapter GGUF file (F32 tensors), atomically."""
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
            if name:
                writer.add_name(name)
            for base, (a, b) in tensors.items():
                writer.add_tensor(f"{base}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
                writer.add_tensor(f"{base}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def export_adapter(checkpoint_dir: Path | str, lora_path: Path | str, output_path: Path | str) -> int:
    """Our adapter file (checked against the base checkpoint's config) as a llama.cpp LoRA GGUF;
    returns the number of adapted base tensors."""
    config = load_config(checkpoint_dir)
    state_dict, meta = load_adapter(lora_path)
    check_adapter_base(meta, config, Path(lora_path).name)
    tensors = adapter_gguf_tensors(state_dict, meta.lora, config)
    write_adapter_gguf(output_path, tensors, meta.lora.alpha, Path(lora_path).stem)
    return len(tensors)
