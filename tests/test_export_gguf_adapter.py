"""The llama.cpp LoRA adapter export, read back with gguf.GGUFReader (llama.cpp's own reader): for every
adapted tensor, alpha / r * lora_b @ lora_a (r = lora_a's rank, as llama.cpp scales) equals our
update of that tensor as MergedLinear.delta_weights computes it (fp32, 1e-6)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_llama.adapter import save_adapter
from lit_llama.checkpoint import save_checkpoint
from lit_llama.cli import run as cli_run
from lit_llama.convert_gguf import field
from lit_llama.export_gguf_adapter import export_adapter
from lit_llama.lora import LoRAConfig, MergedLinear, build_lora_model, lora_layers
from lit_llama.model import LLaMA, LLaMAConfig

gguf = pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def setup(tmp_path: Path, gqa: bool, lora: LoRAConfig, tied: bool = False) -> tuple[Path, Path, LLaMA]:
    config = LLaMAConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=32, n_query_groups=2 if gqa else 4,
                         intermediate_size=64, tie_embeddings=tied)
    torch.manual_seed(0)
    save_checkpoint(LLaMA(config), tmp_path / "base")
    model = build_lora_model(config, lora)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B)
    save_adapter(model, tmp_path / "a.lora.safetensors", lora)
    return tmp_path / "base", tmp_path / "a.lora.safetensors", model


def ours(model: LLaMA) -> dict[str, np.ndarray]:
    """Our per-tensor updates by GGUF name, from the model's own layers."""
    names = {"attn.c_proj": "attn_output", "mlp.c_fc1": "ffn_gate", "mlp.c_fc2": "ffn_up", "mlp.c_proj": "ffn_down"}
    out = {}
    for i, block in enumerate(model.transformer.h):
        if isinstance(block.attn.c_attn, MergedLinear):
            for (rows, delta), name in zip(block.attn.c_attn.delta_weights(),
                                           [n for n, r in zip(("attn_q", "attn_k", "attn_v"), block.attn.c_attn.ranks) if r]):
                out[f"blk.{i}.{name}.weight"] = delta.detach().numpy()
        for path, name in names.items():
            parent, attr = path.split(".")
            layer = getattr(getattr(block, parent), attr)
            if isinstance(layer, MergedLinear):
                out[f"blk.{i}.{name}.weight"] = layer.delta_weights()[0][1].detach().numpy()
    if isinstance(model.lm_head, MergedLinear):
        out["output.weight"] = model.lm_head.delta_weights()[0][1].detach().numpy()
    return out


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("lora", [
    LoRAConfig(r=8, alpha=16, dropout=0.0),  # query, value
    LoRAConfig(r=4, alpha=8, dropout=0.0, key=True, r_query=6, r_key=2, projection=True, mlp=True, head=True),
], ids=["qv", "all"])
def test_lora_b_at_lora_a_times_alpha_over_r_is_our_update(tmp_path, gqa, lora):
    base, adapter, model = setup(tmp_path, gqa, lora)
    n = export_adapter(base, adapter, tmp_path / "a.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert field(reader, "general.architecture") == "llama" and field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    alpha = field(reader, "adapter.lora.alpha")
    assert alpha == lora.alpha
    tensors = {t.name: t for t in reader.tensors}
    expected = ours(model)
    assert n == len(expected) and set(tensors) == {f"{k}.lora_{s}" for k in expected for s in "ab"}
    for name, delta in expected.items():
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        a = np.asarray(a.data).reshape(tuple(int(x) for x in reversed(a.shape)))  # (r, n_in)
        b = np.asarray(b.data).reshape(tuple(int(x) for x in reversed(b.shape)))  # (n_out, r)
        assert a.shape[0] == b.shape[1] and b.shape[0] == delta.shape[0] and a.shape[1] == delta.shape[1]
        np.testing.assert_allclose(alpha / a.shape[0] * (b @ a), delta, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("lora,said", [
    (LoRAConfig(r=4, dropout=0.0, embedding=True), "embedding"),
    (LoRAConfig(r=4, dropout=0.0, train_embedding=True), "train_embedding"),
    (LoRAConfig(r=4, dropout=0.0, resize_vocab=136), "resize_vocab"),
    (LoRAConfig(r=4, dropout=0.0, head=True), "head target on a tied model"),
])
def test_what_llama_cpp_cannot_hold_is_one_line(tmp_path, capsys, lora, said):
    base, adapter, _ = setup(tmp_path, False, lora, tied=True)
    spec = importlib.util.spec_from_file_location("convert_lora_to_gguf", REPO / "scripts" / "convert_lora_to_gguf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # jsonargparse resolves the postponed annotations through sys.modules
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        cli_run(module.main, args=["--checkpoint_dir", str(base), "--lora_path", str(adapter),
                                   "--output_path", str(tmp_path / "a.gguf")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and said in errors[0] and "convert_lit_to_gguf.py --lora_path" in errors[0], errors
    assert not (tmp_path / "a.gguf").exists()
