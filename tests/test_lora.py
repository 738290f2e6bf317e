import json
import math

import pytest
import torch
from safetensors import safe_open

from lit_llama.adapter import apply_adapter, load_adapter, save_adapter
from lit_llama.checkpoint import (
    CheckpointError,
    load_weights,
    model_state_dict,
    save_checkpoint,
    save_config,
    save_weights,
)
from lit_llama.lora import (
    LoRAConfig,
    MergedLinear,
    build_lora_model,
    load_lora_model,
    lora_param_count,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora_weights,
    unmerge_lora_weights,
)
from lit_llama.model import LLaMA, LLaMAConfig


def random_lora_model(name: str, lora: LoRAConfig, seed: int = 0) -> LLaMA:
    """A LoRA model whose every tensor, lora_B included, is random and non-zero."""
    torch.manual_seed(seed)
    model = build_lora_model(LLaMAConfig.from_name(name), lora)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def random_lora_weights_(model: LLaMA, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in lora_state_dict(model).items():
            v.copy_(torch.randn(v.shape, generator=g) * 0.2)


def tokens(config: LLaMAConfig, B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ shapes
def test_shapes_for_llama_7b_match_original_lit_llama_adapters():
    with torch.device("meta"):
        model = build_lora_model(LLaMAConfig.from_name("7B"), LoRAConfig(r=8))
    sd = model.state_dict()
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (3 * 4096, 4096)
    assert sd["transformer.h.0.attn.c_attn.lora_A"].shape == (16, 4096)
    assert sd["transformer.h.31.attn.c_attn.lora_B"].shape == (8192, 8)
    assert lora_param_count(model) == 32 * (16 * 4096 + 8192 * 8)


def test_shapes_for_llama2_70b_gqa_value_part_has_kv_head_rows():
    with torch.device("meta"):
        model = build_lora_model(LLaMAConfig.from_name("Llama-2-70b"), LoRAConfig(r=8))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A.shape == (16, 8192)
    assert layer.lora_B.shape == (8192 + 8 * 128, 8)  # [B_q (nh*hs rows); B_v (ng*hs rows)]


def test_lora_config_rejects_non_positive_rank():
    with pytest.raises(ValueError, match="lora r must be a positive integer"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="lora r must be a positive integer"):
        LoRAConfig(r=-4)
    with pytest.raises(ValueError, match="at least one of query, key, value"):
        LoRAConfig(query=False, value=False)


# ----------------------------------------------------------------------------------------- forward
SIZES = (32, 16, 16)  # tiny-gqa's Q, K, V rows


@pytest.mark.parametrize("enable", [(True, False, True), (True, True, True), (False, True, False)])
def test_forward_equals_hand_written_lora_per_slice(enable):
    torch.manual_seed(0)
    r, alpha = 4, 8.0
    layer = MergedLinear(32, SIZES, r, alpha, enable_lora=enable)
    with torch.no_grad():
        layer.lora_A.normal_(0.0, 0.3)
        layer.lora_B.normal_(0.0, 0.3)
    x = torch.randn(2, 5, 32)
    out = layer(x)

    # Reference with plain matmuls: A/B are cut into their per-slice blocks by hand.
    W, A, B = layer.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
    base = x @ W.T
    starts = [0, SIZES[0], SIZES[0] + SIZES[1]]
    a_row = b_row = 0
    for start, size, on in zip(starts, SIZES, enable):
        cols = slice(start, start + size)
        if on:
            A_s, B_s = A[a_row:a_row + r], B[b_row:b_row + size]
            expected = base[..., cols] + (alpha / r) * ((x @ A_s.T) @ B_s.T)
            a_row, b_row = a_row + r, b_row + size
            torch.testing.assert_close(out[..., cols], expected, rtol=0, atol=1e-5)
            assert (expected - base[..., cols]).abs().max() > 0.1  # the update is not a no-op
        else:
            assert torch.equal(out[..., cols], base[..., cols])  # untouched slice: exactly the base


def test_dropout_only_touches_the_lora_path():
    torch.manual_seed(0)
    layer = MergedLinear(32, SIZES, 4, 8.0, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 32)
    base = x @ layer.weight.detach().T
    out = layer(x)
    assert torch.equal(out[..., 32:48], base[..., 32:48])  # K is not adapted: no dropout there
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.equal(layer(x), base)  # with B = 0 only the (dropped-out) LoRA path could differ


def test_merged_equals_unmerged_fp32_and_unmerge_restores_weight():
    model = random_lora_model("tiny-gqa", LoRAConfig(r=4, alpha=8, dropout=0.0))
    idx = tokens(model.config)
    weights = [b.attn.c_attn.weight.detach().clone() for b in model.transformer.h]
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora_weights(model)
        assert all(b.attn.c_attn.merged for b in model.transformer.h)
        merged = model(idx)
        merge_lora_weights(model)  # a second merge must not add the update twice
        assert torch.equal(model(idx), merged)
        unmerge_lora_weights(model)
    err = (merged - unmerged).abs().max().item()
    print(f"fp32 merged vs unmerged logits: max abs diff {err:.2e}")
    assert err < 1e-5
    for w, b in zip(weights, model.transformer.h):
        torch.testing.assert_close(b.attn.c_attn.weight, w, rtol=0, atol=1e-6)


def test_merged_equals_unmerged_bf16_base_with_fp32_lora():
    torch.manual_seed(0)
    layer = MergedLinear(256, (256, 128, 128), 8, 16.0, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.lora_A.normal_(0, 0.05)
        layer.lora_B.normal_(0, 0.05)
    assert layer.lora_A.dtype == torch.float32
    W0 = layer.weight.detach().clone()
    x = torch.randn(4, 16, 256).bfloat16()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
    assert unmerged.dtype == merged.dtype == torch.bfloat16
    scale = unmerged.float().abs().max().item()
    err = (merged.float() - unmerged.float()).abs().max().item()
    print(f"bf16 merged vs unmerged: max abs diff {err:.2e} (outputs up to {scale:.2f})")
    # Merging rounds W + delta to bf16, and both outputs are rounded to bf16: allow two bf16 ulps
    # (2^-7 relative each) of the largest output.
    assert err <= 2 * 2**-7 * scale
    # Merge and unmerge each round to bf16 once (half an ulp: 2^-8 of the magnitude rounded, which
    # is at most |W| + |delta|): each element ends within 2 * 2^-8 * (|W| + |delta|) of the original.
    delta = torch.zeros_like(W0, dtype=torch.float32)
    for rows, d in layer.delta_weights():
        delta[rows] = d
    drift = (layer.weight.float() - W0.float()).abs()
    bound = 2 * 2**-8 * (W0.float().abs() + delta.abs())
    print(f"bf16 unmerge: max drift of W {drift.max():.2e}, {(drift / bound).max():.2f} of the bound")
    assert (drift <= bound).all()
    assert (drift > 0).any()  # bf16 unmerge is lossy: why merging is explicit, never hidden in eval()


# ------------------------------------------------------------------------------------------- PEFT
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_logits_match_peft_lora_on_hf_llama(name):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lit_llama.convert_hf import config_to_hf, hf_to_meta_rows, lit_to_hf_state_dict

    r, alpha = 4, 8
    ours = random_lora_model(name, LoRAConfig(r=r, alpha=alpha, dropout=0.0))
    config = ours.config
    base_sd = {k: v for k, v in model_state_dict(ours).items() if "lora_" not in k}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(config), attn_implementation="eager"))
    hf.load_state_dict(lit_to_hf_state_dict(base_sd, config), strict=True)
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ).eval()

    # Random non-zero PEFT A/B, copied into ours: A as is, B_q through HF's q row permutation.
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i, block in enumerate(ours.transformer.h):
            attn = peft_model.base_model.model.model.layers[i].self_attn
            for proj in (attn.q_proj, attn.v_proj):
                for m in (proj.lora_A["default"], proj.lora_B["default"]):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
            c_attn = block.attn.c_attn
            c_attn.lora_A.copy_(torch.cat((attn.q_proj.lora_A["default"].weight, attn.v_proj.lora_A["default"].weight)))
            B_q = hf_to_meta_rows(attn.q_proj.lora_B["default"].weight, config.n_head)
            c_attn.lora_B.copy_(torch.cat((B_q, attn.v_proj.lora_B["default"].weight)))

    idx = tokens(config)
    with torch.no_grad():
        expected = peft_model(input_ids=idx).logits
        with peft_model.disable_adapter():
            hf_base = peft_model(input_ids=idx).logits
        got = ours(idx)
    err = (got - expected).abs().max().item()
    print(f"{name}: max abs logit diff vs PEFT {err:.2e} (LoRA moves PEFT's logits by {(expected - hf_base).abs().max():.2f})")
    assert (expected - hf_base).abs().max() > 0.1  # the adapters are not a no-op
    assert err < 1e-4


# -------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "7B"])
def test_only_lora_trains_and_count_matches_formula(name):
    config = LLaMAConfig.from_name(name)
    r = 8
    with torch.device("meta"):
        model = build_lora_model(config, LoRAConfig(r=r))
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".c_attn.lora_A", ".c_attn.lora_B")) for n in trainable)
    assert len(trainable) == 2 * config.n_layer
    C, hs, ng = config.n_embd, config.head_size, config.n_query_groups
    expected = config.n_layer * (r * 2 * C + r * (C + ng * hs))
    assert lora_param_count(model) == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_backward_reaches_only_lora_parameters():
    model = random_lora_model("tiny-gqa", LoRAConfig(r=4, dropout=0.1)).train()
    mark_only_lora_as_trainable(model)
    model(tokens(model.config)).float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


# -------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_adapter_round_trip(tmp_path, suffix):
    lora = LoRAConfig(r=4, alpha=8, dropout=0.1, query=True, key=True, value=True)
    trained = random_lora_model("tiny-gqa", lora)
    path = tmp_path / f"adapter.lora{suffix}"
    save_adapter(trained, path, lora, trained.config, prompt_style="alpaca")

    fresh = random_lora_model("tiny-gqa", lora)  # same base (same seed), LoRA overwritten below
    random_lora_weights_(fresh, seed=5)
    meta = apply_adapter(fresh, path)
    assert meta.lora == lora and meta.prompt_style == "alpaca"
    for k, v in lora_state_dict(trained).items():
        assert torch.equal(lora_state_dict(fresh)[k], v), k
    idx = tokens(trained.config)
    with torch.no_grad():
        assert torch.equal(fresh(idx), trained(idx))

    state, meta2 = load_adapter(path)
    assert meta2 == meta
    assert set(state) == set(lora_state_dict(trained))  # no base tensor in the file
    if suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            assert all(k.endswith(("lora_A", "lora_B")) for k in f.keys())
            md = f.metadata()
        assert md["r"] == "4" and md["targets"] == "query,key,value" and md["prompt_style"] == "alpaca"
        assert json.loads(md["base_config"])["n_query_groups"] == 2
    else:
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {"lora", "meta"} and set(raw["lora"]) == set(state)


def test_adapter_size_is_what_r_implies(tmp_path):
    lora = LoRAConfig(r=16)
    model = random_lora_model("tiny-gqa", lora)
    path = save_adapter(model, tmp_path / "a.safetensors", lora)
    c = model.config
    tensor_bytes = 4 * c.n_layer * (16 * 2 * c.n_embd + 16 * (c.n_embd + c.n_query_groups * c.head_size))
    size = path.stat().st_size
    print(f"adapter: {size} bytes for {tensor_bytes} bytes of fp32 LoRA tensors")
    assert tensor_bytes <= size <= tensor_bytes + 2048  # the rest is the header with the metadata


def test_adapter_for_another_base_is_a_one_line_error(tmp_path):
    lora = LoRAConfig(r=4)
    path = save_adapter(random_lora_model("tiny", lora), tmp_path / "a.safetensors", lora)
    other = random_lora_model("tiny-gqa", lora)
    with pytest.raises(ValueError, match="trained for another base model") as e:
        apply_adapter(other, path)
    assert "\n" not in str(e.value) and "n_query_groups=4" in str(e.value)


def test_adapter_needs_a_model_with_its_lora_config(tmp_path):
    path = save_adapter(random_lora_model("tiny", LoRAConfig(r=4)), tmp_path / "a.pth", LoRAConfig(r=4))
    with pytest.raises(ValueError, match="needs a model with LoRA r=4"):
        apply_adapter(random_lora_model("tiny", LoRAConfig(r=8)), path)


def test_original_lit_llama_adapter_without_metadata_loads_with_a_warning(tmp_path):
    lora = LoRAConfig(r=4, alpha=16)  # lit-llama: Q and V, alpha 16
    trained = random_lora_model("tiny", lora)
    path = tmp_path / "lit-llama-lora-finetuned.pth"
    torch.save(lora_state_dict(trained), path)  # what lit-llama's finetune/lora.py saved
    with pytest.warns(UserWarning, match="assuming r=4"):
        _, meta = load_adapter(path)
    assert meta.lora.r == 4 and meta.lora.alpha == 16 and meta.lora.targets == "query,value"
    fresh = random_lora_model("tiny", meta.lora)
    random_lora_weights_(fresh, seed=9)
    with pytest.warns(UserWarning):
        apply_adapter(fresh, path)
    idx = tokens(trained.config)
    with torch.no_grad():
        assert torch.equal(fresh(idx), trained(idx))


def test_file_with_base_tensors_is_not_an_adapter(tmp_path):
    model = random_lora_model("tiny", LoRAConfig(r=4))
    path = tmp_path / "full.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        load_adapter(path)


# --------------------------------------------------------------------------- base checkpoint loading
def base_model(name: str) -> LLaMA:
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name(name))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-tied"])
def test_base_checkpoint_loads_into_lora_model(tmp_path, name):
    base = base_model(name)
    save_checkpoint(base, tmp_path)
    model = load_lora_model(tmp_path, LoRAConfig(r=4))
    for k, v in model_state_dict(base).items():
        assert torch.equal(model.state_dict()[k], v), k
    for layer in (b.attn.c_attn for b in model.transformer.h):
        assert layer.lora_A.device.type == "cpu" and layer.lora_A.dtype == torch.float32
        assert layer.lora_A.abs().sum() > 0 and torch.count_nonzero(layer.lora_B) == 0  # the documented init
        bound = 1 / math.sqrt(model.config.n_embd)  # kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
        assert layer.lora_A.abs().max() <= bound
    idx = tokens(base.config)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), base(idx), rtol=0, atol=1e-5)  # B = 0: the base model


def test_bf16_base_keeps_fp32_lora_and_runs(tmp_path):
    base = base_model("tiny-gqa")
    save_checkpoint(base, tmp_path)
    model = load_lora_model(tmp_path, LoRAConfig(r=4), dtype=torch.bfloat16)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    random_lora_weights_(model, seed=3)
    mark_only_lora_as_trainable(model)
    logits = model(tokens(base.config))
    assert logits.dtype == torch.bfloat16
    logits.float().pow(2).mean().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_checkpoint_with_an_unknown_key_does_not_load(tmp_path):
    base = base_model("tiny")
    sd = model_state_dict(base)
    sd["transformer.h.0.attn.extra.weight"] = torch.zeros(2)
    save_weights(sd, tmp_path / "lit_model.safetensors")
    save_config(base.config, tmp_path)
    with pytest.raises(CheckpointError, match="unexpected 1 key"):
        load_lora_model(tmp_path, LoRAConfig(r=4))


def test_checkpoint_missing_a_base_key_does_not_load(tmp_path):
    base = base_model("tiny")
    save_checkpoint(base, tmp_path)
    sd = load_weights(tmp_path / "lit_model.safetensors")
    del sd["transformer.h.1.attn.c_attn.weight"]
    save_weights(sd, tmp_path / "lit_model.safetensors")
    with pytest.raises(CheckpointError, match="missing 1 key"):
        load_lora_model(tmp_path, LoRAConfig(r=4))


def test_bare_safetensors_adapter_with_foreign_metadata_is_read_as_lit_llama(tmp_path):
    from safetensors.torch import save_file

    trained = random_lora_model("tiny", LoRAConfig(r=2))
    path = tmp_path / "adapter.safetensors"
    save_file(lora_state_dict(trained), path, metadata={"format": "pt"})  # what safetensors' own writer adds
    with pytest.warns(UserWarning, match="assuming r=2"):
        state, meta = load_adapter(path)
    assert meta.lora.r == 2 and set(state) == set(lora_state_dict(trained))
