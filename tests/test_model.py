"""lit_llama.model against transformers' LlamaForCausalLM, on the same random weights mapped through
our converter (scripts/convert_hf_checkpoint.py), for multi-head, grouped-query, multi-query and
tied-embedding configs; plus the KV cache and strict checkpoint loading."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lit_llama.checkpoint import CheckpointError, load_model, load_weights, save_config, save_weights
from lit_llama.convert_hf import hf_to_meta_rows, meta_to_hf_rows
from lit_llama.model import apply_rope, rope_angles

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]

# Tiny LlamaForCausalLM configs; max_position_embeddings is our block_size.
BASE = dict(
    vocab_size=256, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, rms_norm_eps=1e-5,
)
CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2, rope_theta=500000.0),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_hf_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A tiny HF Llama with weights large enough that a wrong mapping shows in the logits
    (HF's default init, std 0.02, makes every logit nearly 0) and norm weights that are not all 1."""
    config = transformers.LlamaConfig(**{**BASE, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def convert(hf_model, tmp_path: Path) -> Path:
    """save_pretrained, then our converter script's main: the path users take."""
    hf_dir, lit_dir = tmp_path / "hf", tmp_path / "lit"
    hf_model.save_pretrained(hf_dir)
    load_script("convert_hf_checkpoint").main(checkpoint_dir=hf_dir, output_dir=lit_dir)
    return lit_dir


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf_llama(name, tmp_path):
    hf = random_hf_llama(**CONFIGS[name])
    model = load_model(convert(hf, tmp_path))
    assert model.config.n_query_groups == CONFIGS[name]["num_key_value_heads"]
    idx = torch.randint(0, BASE["vocab_size"], (2, BASE["max_position_embeddings"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        actual = model(idx)
    delta = (actual - expected).abs().max().item()
    print(f"{name}: max |delta logits| = {delta:.2e} (logit std {expected.std().item():.2f})")
    assert delta <= 1e-4


def test_tied_head_is_the_embedding_after_from_checkpoint(tmp_path):
    lit_dir = convert(random_hf_llama(**CONFIGS["tied"]), tmp_path)
    assert "lm_head.weight" not in load_weights(lit_dir / "lit_model.safetensors")
    model = load_model(lit_dir)
    assert model.config.tie_embeddings
    assert model.lm_head.weight is model.transformer.wte.weight


def test_rope_permutation_matches_hf_rotate_half():
    """Meta's rotation of interleaved pairs (written here with complex numbers, as Meta's reference
    does) on the original rows equals HF's rotate_half RoPE on the rows permuted by meta_to_hf_rows."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n_heads, hs, C, T = 3, 8, 16, 5
    w = torch.randn(n_heads * hs, C, dtype=torch.float64)
    x = torch.randn(1, T, C, dtype=torch.float64)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)  # (T, hs/2)

    q_meta = (x @ w.T).view(1, T, n_heads, hs // 2, 2)
    q_meta = torch.view_as_real(torch.view_as_complex(q_meta) * torch.polar(torch.ones_like(angles), angles)[None, :, None])
    q_meta = q_meta.reshape(1, T, n_heads, hs).transpose(1, 2)  # (1, nh, T, hs)

    q_hf = (x @ meta_to_hf_rows(w, n_heads).T).view(1, T, n_heads, hs).transpose(1, 2)  # (1, nh, T, hs)
    emb = torch.cat((angles, angles), dim=-1)[None]  # HF's cos/sin layout: (1, T, hs)
    q_hf, _ = apply_rotary_pos_emb(q_hf, q_hf, emb.cos(), emb.sin())
    # Back to Meta's row order within each head to compare element by element.
    q_hf_in_meta_order = q_hf.reshape(1, n_heads, T, 2, hs // 2).transpose(-1, -2).reshape(1, n_heads, T, hs)
    torch.testing.assert_close(q_hf_in_meta_order, q_meta, atol=1e-12, rtol=0)

    # ... and our apply_rope is that same rotation.
    cos, sin = rope_angles(torch.arange(T), hs)
    ours = apply_rope((x.float() @ w.float().T).view(1, T, n_heads, hs).transpose(1, 2), cos, sin)
    torch.testing.assert_close(ours, q_meta.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_hf_to_meta_rows_and_meta_to_hf_rows_are_exact_inverses(n_heads):
    w = torch.randn(n_heads * 8, 12)
    assert torch.equal(hf_to_meta_rows(meta_to_hf_rows(w, n_heads), n_heads), w)
    assert torch.equal(meta_to_hf_rows(hf_to_meta_rows(w, n_heads), n_heads), w)
    assert not torch.equal(meta_to_hf_rows(w, n_heads), w)  # and not the identity
    # Head 0 of HF's order is [even rows | odd rows] of Meta's head 0 (hand-written for hs=8).
    assert torch.equal(meta_to_hf_rows(w, n_heads)[:8], w[[0, 2, 4, 6, 1, 3, 5, 7]])


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    return load_model(convert(random_hf_llama(**CONFIGS["gqa"]), tmp_path_factory.mktemp("gqa")))


def test_kv_cache_token_by_token_matches_full_forward(gqa_model):
    model = gqa_model
    idx = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        model.set_kv_cache(batch_size=2, max_seq_length=32)
        prefix = 5
        steps = [model(idx[:, :prefix], torch.arange(prefix))]
        for t in range(prefix, idx.size(1)):
            steps.append(model(idx[:, t:t + 1], torch.tensor([t])))
        model.clear_kv_cache()
    cached = torch.cat(steps, dim=1)
    delta = (cached - full).abs().max().item()
    print(f"KV cache vs full forward: max |delta logits| = {delta:.2e}")
    assert delta <= 1e-5


def test_prompt_longer_than_kv_cache_is_a_value_error(gqa_model):
    model = gqa_model
    model.set_kv_cache(batch_size=1, max_seq_length=8)
    try:
        with pytest.raises(ValueError, match="KV cache of 8 tokens"):
            model(torch.zeros(1, 10, dtype=torch.long), torch.arange(10))
    finally:
        model.clear_kv_cache()
    with pytest.raises(ValueError, match="block_size"):
        model.set_kv_cache(batch_size=1, max_seq_length=BASE["max_position_embeddings"] + 1)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_strict_loading_names_the_offending_key(change, gqa_model, tmp_path):
    state_dict = {k: v.clone() for k, v in gqa_model.state_dict().items()}
    if change == "missing":
        key = "transformer.h.1.mlp.c_fc2.weight"
        del state_dict[key]
    else:
        key = "transformer.h.0.attn.bias"
        state_dict[key] = torch.zeros(3)
    save_weights(state_dict, tmp_path / "lit_model.safetensors")
    save_config(gqa_model.config, tmp_path)
    with pytest.raises(CheckpointError, match=rf"{change if change == 'missing' else 'unexpected'}.*{key}"):
        load_model(tmp_path)
