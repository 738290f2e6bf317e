"""lit_llama.model against transformers' LlamaForCausalLM, on the same random weights mapped through
our converter (scripts/convert_hf_checkpoint.py), for multi-head, grouped-query, multi-query and
tied-embedding configs, each RoPE scaling, an explicit head_dim and both config.json layouts
(transformers 4 and 5); plus the presets, the KV cache and strict checkpoint loading."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lit_llama.checkpoint import CheckpointError, load_model, load_weights, save_config, save_weights
from lit_llama.convert_hf import hf_to_meta_rows, meta_to_hf_rows
from lit_llama.model import LLaMA, LLaMAConfig, apply_rope, rope_angles, rope_frequencies

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
    return random_hf_model(transformers.LlamaForCausalLM, {**BASE, **overrides}, seed)


def random_hf_model(cls, config_json: dict, seed: int = 0):
    """`cls` (LlamaForCausalLM, MistralForCausalLM) built from a config.json dict, random weights."""
    fields = {k: v for k, v in config_json.items() if k != "model_type"}
    config = cls.config_class(**fields, attn_implementation="eager")
    torch.manual_seed(seed)
    model = cls(config)
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


# ------------------------------------------------------------------ RoPE scaling, head_dim, layouts
# Each case in HF's spelling. llama3 with original_max_position_embeddings=16 on a 64-token input, so
# most positions lie past the pretraining context; with rope_theta 100 and hs 8 its four pairs make
# 2.5, 0.8, 0.25 and 0.08 turns over those 16 tokens: one kept (> high 2), one interpolated, two slowed.
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=0.5, high_freq_factor=2.0, original_max_position_embeddings=16)
ROPE_CASES = {
    "default": dict(rope_theta=500000.0, scaling=None, fields=dict(num_key_value_heads=2)),
    "llama3": dict(rope_theta=100.0, scaling=LLAMA3, fields=dict(num_key_value_heads=2)),
    "llama3-tied": dict(rope_theta=100.0, scaling=LLAMA3, fields=dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "linear": dict(rope_theta=100.0, scaling=dict(type="linear", factor=4.0), fields=dict(num_key_value_heads=4)),
    # 4 heads of 16 on hidden_size 32: Q/K/V and o_proj are not square multiples of C.
    "head_dim": dict(rope_theta=10000.0, scaling=None, fields=dict(num_key_value_heads=2, head_dim=16)),
    "head_dim-llama3-tied": dict(
        rope_theta=100.0, scaling=LLAMA3, fields=dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    ),
}


def hf_config_json(case: str, layout: str, model_type: str = "llama") -> dict:
    """config.json as transformers 4 writes it (rope_theta, rope_scaling at the top level) or as
    transformers 5 does (everything in rope_parameters): the two layouts on the Hub."""
    c = ROPE_CASES[case]
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
    config = {"architectures": [arch], "model_type": model_type, **BASE, "tie_word_embeddings": False, **c["fields"]}
    if layout == "transformers4":
        return config | {"rope_theta": c["rope_theta"], "rope_scaling": c["scaling"]}
    scaling = {k: v for k, v in (c["scaling"] or {}).items() if k not in ("type", "rope_type")}
    return config | {"rope_parameters": {"rope_type": rope_type_of(case), **scaling, "rope_theta": c["rope_theta"]}}


def rope_type_of(case: str) -> str:
    scaling = ROPE_CASES[case]["scaling"] or {}
    return scaling.get("rope_type") or scaling.get("type") or "default"  # "type": transformers < 4.43


def convert_config_json(hf_model, config_json: dict, tmp_path: Path) -> Path:
    """`convert`, with config.json replaced by the hand-written `config_json` (the installed
    transformers writes only its own layout)."""
    hf_dir, lit_dir = tmp_path / "hf", tmp_path / "lit"
    hf_model.save_pretrained(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps(config_json))
    load_script("convert_hf_checkpoint").main(checkpoint_dir=hf_dir, output_dir=lit_dir)
    return lit_dir


def max_logit_delta(hf_model, model, T: int = BASE["max_position_embeddings"]) -> float:
    idx = torch.randint(0, BASE["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model(idx) - hf_model(idx).logits).abs().max().item()


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_scaling_and_head_dim_logits_match_hf(case, layout, tmp_path):
    config_json = hf_config_json(case, layout)
    hf = random_hf_model(transformers.LlamaForCausalLM, config_json)
    model = load_model(convert_config_json(hf, config_json, tmp_path))
    c = model.config
    assert c.head_size == config_json.get("head_dim", BASE["hidden_size"] // BASE["num_attention_heads"])
    assert c.tie_embeddings == config_json["tie_word_embeddings"]
    assert (c.rope_scaling or {}).get("type", "default") == rope_type_of(case)
    # Our frequencies are transformers' (which read the same config.json) ...
    ours = rope_frequencies(c.head_size, c.rope_base, c.rope_scaling)
    torch.testing.assert_close(ours, hf.model.rotary_emb.inv_freq, atol=0, rtol=1e-6)
    # ... and so are the logits, over all 64 positions (48 of them past original_max_position_embeddings).
    delta = max_logit_delta(hf, model)
    print(f"{case} ({layout}): max |delta logits| = {delta:.2e}")
    assert delta <= 1e-4


@pytest.mark.parametrize("rope_type,factor", [("llama3", 8.0), ("llama3", 32.0), ("linear", 4.0)])
def test_rope_frequencies_equal_transformers_at_llama3_sizes(rope_type, factor):
    """At the real sizes (hs 128, theta 500000, pretrained on 8192 tokens), against transformers' own
    ROPE_INIT_FUNCTIONS: the same fp32 numbers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(type=rope_type, factor=factor)
    if rope_type == "llama3":
        scaling |= dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    hf_config = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
        rope_parameters={"rope_type": rope_type, "rope_theta": 500000.0, **{k: v for k, v in scaling.items() if k != "type"}},
    )
    expected, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device="cpu")
    assert attention_factor == 1.0  # neither type rescales cos/sin
    torch.testing.assert_close(rope_frequencies(128, 500000.0, scaling), expected, atol=0, rtol=1e-6)
    plain = rope_frequencies(128, 500000.0)
    if rope_type == "llama3":  # the fastest pairs are kept, the slowest slowed down by exactly factor
        assert torch.equal(rope_frequencies(128, 500000.0, scaling)[:8], plain[:8])
        assert torch.equal(rope_frequencies(128, 500000.0, scaling)[-8:], plain[-8:] / factor)


@pytest.mark.parametrize("sliding_window", [None, 64, "absent", 16])
def test_mistral_without_sliding_window_converts_and_matches(sliding_window, tmp_path):
    """A window at least as long as the context never masks anything: such a Mistral is a Llama.
    Absent means MistralConfig's default, 4096, which is longer than this model's 64 positions."""
    config_json = hf_config_json("head_dim", "transformers5", model_type="mistral")
    if sliding_window != "absent":
        config_json["sliding_window"] = sliding_window
    hf = random_hf_model(transformers.MistralForCausalLM, config_json)
    if sliding_window == 16:
        with pytest.raises(ValueError, match="sliding_window 16 < max_position_embeddings 64 is not supported"):
            convert_config_json(hf, config_json, tmp_path)
        return
    model = load_model(convert_config_json(hf, config_json, tmp_path))
    delta = max_logit_delta(hf, model)
    print(f"mistral (sliding_window {sliding_window}): max |delta logits| = {delta:.2e}")
    assert delta <= 1e-4


# Parameter counts of the published models (their model cards, rounded): the presets build them.
PRESET_PARAMS = {
    "Llama-3-8B": 8.03e9, "Llama-3.1-8B": 8.03e9, "Llama-3.1-70B": 70.55e9, "Llama-3.2-1B": 1.236e9,
    "Llama-3.2-3B": 3.213e9, "SmolLM2-135M": 134.5e6, "SmolLM2-360M": 361.8e6, "SmolLM2-1.7B": 1.711e9,
}


@pytest.mark.parametrize("name", list(PRESET_PARAMS))
def test_presets_of_current_models_build_with_plausible_sizes(name):
    config = LLaMAConfig.from_name(name)
    with torch.device("meta"):
        model = LLaMA(config)
    n_params = sum(p.numel() for p in model.parameters())  # a tied head counts once
    assert abs(n_params / PRESET_PARAMS[name] - 1) < 0.002, n_params
    assert config.source.endswith("config.json") or "config.json (" in config.source
    assert config.padded_vocab_size == config.vocab_size in (128256, 49152)
    # 3.1 and 3.2 run at their full 131072-token context; the llama3 scaling is what makes that work.
    if name.startswith(("Llama-3.1", "Llama-3.2")):
        assert config.block_size == 131072 and config.rope_scaling["type"] == "llama3"
        assert config.rope_scaling["factor"] == (32.0 if name.startswith("Llama-3.2") else 8.0)


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
