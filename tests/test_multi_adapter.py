"""Many adapters over one frozen base: every batch row must equal its adapter merged alone.

The reference for each row is the single-adapter path, with the adapter merged into its own copy
of the base (`merged_model`) and run on that row only, in fp32.
"""

from pathlib import Path

import pytest
import torch

from lit_llama.adapter import apply_adapter, load_adapter, save_adapter
from lit_llama.checkpoint import load_model, save_checkpoint
from lit_llama.decode_speedups import can_pack_linear, pack_linear_weights
from lit_llama.generation import generate
from lit_llama.lora import LoRAConfig, load_lora_model, lora_state_dict, merged_model
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.multi_lora import (
    benchmark_multi_adapter,
    forward_parallel,
    generate_parallel,
    generate_with_adapters,
    load_multi_lora_model,
    set_adapter_ids,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


ADAPTERS = [
    LoRAConfig(r=4, alpha=8, dropout=0.0),
    LoRAConfig(r=2, alpha=4, dropout=0.0, key=True, mlp=True, head=True, embedding=True),
    LoRAConfig(r=3, alpha=8, dropout=0.0, projection=True, r_value=1),
]


def make_setup(root: Path, name: str) -> tuple[Path, list[Path]]:
    torch.manual_seed(0)
    base = LLaMA(LLaMAConfig.from_name(name))
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.2)
    save_checkpoint(base, root / "base")
    paths = []
    for n, lora in enumerate(ADAPTERS):
        model = load_lora_model(root / "base", lora)
        g = torch.Generator().manual_seed(10 + n)
        with torch.no_grad():
            for v in lora_state_dict(model).values():
                v.copy_(torch.randn(v.shape, generator=g) * 0.3)
            if lora.r_value:  # V uses 1 of the 3 columns of its B rows; the rest stay zero
                for block in model.transformer.h:
                    block.attn.c_attn.lora_B[model.config.n_embd:, 1:] = 0
        paths.append(save_adapter(model, root / f"a{n}.lora.safetensors", lora))
    return root / "base", paths


@pytest.fixture(scope="module", params=["tiny-gqa", "tiny-tied"])
def setup(request, tmp_path_factory):
    base_dir, paths = make_setup(tmp_path_factory.mktemp(request.param), request.param)
    refs = []
    for path in paths:
        model = load_lora_model(base_dir, load_adapter(path)[1].lora)
        apply_adapter(model, path)
        refs.append(merged_model(model))
    multi, _ = load_multi_lora_model(base_dir, paths)
    return multi.eval(), refs, load_model(base_dir)


def test_each_row_equals_its_adapter_merged_alone_training_forward(setup):
    multi, refs, base = setup
    ids = [0, 1, None, 2, 1]
    idx = torch.randint(0, multi.config.vocab_size, (len(ids), 9), generator=torch.Generator().manual_seed(2))
    set_adapter_ids(multi, ids)
    with torch.no_grad():
        out = multi(idx)  # no input_pos: the training-style causal forward
        for row, n in enumerate(ids):
            expected = (refs[n] if n is not None else base)(idx[row:row + 1])[0]
            err = (out[row] - expected).abs().max().item()
            moved = (expected - base(idx[row:row + 1])[0]).abs().max().item()
            print(f"row {row} (adapter {n}): max abs diff {err:.2e} vs merged alone (adapter moves logits by {moved:.2f})")
            assert err <= 1e-4
            assert n is None or moved > 0.1


def test_kv_cache_generation_rows_equal_adapters_merged_alone(setup):
    multi, refs, base = setup
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, multi.config.vocab_size, (n,), generator=g) for n in (7, 3, 5, 6)]  # left-padded batch
    ids = [2, 0, None, 1]
    got = generate_with_adapters(multi, prompts, ids, max_new_tokens=10, temperature=0.0)
    for prompt, n, out in zip(prompts, ids, got):
        expected = generate(refs[n] if n is not None else base, [prompt], 10, temperature=0.0)[0]
        assert torch.equal(out, expected), (n, out, expected)
    # The KV cache path's logits, not only the argmax: prefill + one decoding step per row.
    set_adapter_ids(multi, ids[:1])
    idx = prompts[0][None]
    multi.set_kv_cache(1, 16)
    refs[2].set_kv_cache(1, 16)
    with torch.no_grad():
        for model in (multi, refs[2]):
            model(idx, torch.arange(idx.shape[1]))
        step = torch.tensor([idx.shape[1]])
        a, b = multi(idx[:, -1:], step), refs[2](idx[:, -1:], step)
    assert (a - b).abs().max() <= 1e-4


def test_packed_base_layers_keep_every_row_equal_to_its_adapter_merged_alone(tmp_path):
    """generate/lora.py with several adapters packs the layers no adapter wraps (generation.py
    `pack_linear_weights`); each row must still continue as its adapter merged into an unpacked base.
    Adapters 0 (Q, V) and 2 (Q, V, projection) leave the MLP and the head packable."""
    if not can_pack_linear(torch.ones(1)):
        pytest.skip("this torch build has no oneDNN")
    base_dir, paths = make_setup(tmp_path, "tiny-gqa")
    chosen = [paths[0], paths[2]]
    multi, _ = load_multi_lora_model(base_dir, chosen)
    assert pack_linear_weights(multi.eval()) == 3 * multi.config.n_layer + 1
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, multi.config.vocab_size, (n,), generator=g) for n in (4, 8, 6)]
    ids = [1, 0, None]
    got = generate_with_adapters(multi, prompts, ids, max_new_tokens=10, temperature=0.0)
    for prompt, n, out in zip(prompts, ids, got):
        if n is None:
            ref = load_model(base_dir)
        else:
            ref = load_lora_model(base_dir, load_adapter(chosen[n])[1].lora)
            apply_adapter(ref, chosen[n])
            ref = merged_model(ref)
        assert torch.equal(out, generate(ref, [prompt], 10, temperature=0.0)[0]), n


def test_parallel_mode_returns_k_answers_per_prompt(setup):
    multi, refs, _ = setup
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, multi.config.vocab_size, (n,), generator=g) for n in (4, 6)]
    answers = generate_parallel(multi, prompts, max_new_tokens=6, temperature=0.0)
    assert len(answers) == len(refs) and all(len(row) == len(prompts) for row in answers)  # K x B, never K*B flat
    for k, row in enumerate(answers):
        for b, out in enumerate(row):
            assert torch.equal(out, generate(refs[k], [prompts[b]], 6, temperature=0.0)[0]), (k, b)
    idx = torch.stack([prompts[1][:4], prompts[0]])
    logits = forward_parallel(multi, idx, adapters=[1, None])
    assert logits.shape == (2, 2, 4, multi.config.padded_vocab_size)  # (K, B, T, V)
    with torch.no_grad():
        assert (logits[0] - refs[1](idx)).abs().max() <= 1e-4


def test_wrong_adapter_ids_are_one_line_errors(setup, tmp_path):
    multi, _, _ = setup
    with pytest.raises(ValueError, match="adapter id 3 does not exist; use 0..2"):
        set_adapter_ids(multi, [0, 3])
    set_adapter_ids(multi, [0, 1])
    with pytest.raises(ValueError, match="the batch has 3 rows but set_adapter_ids named 2"):
        multi(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="3 prompts but 2 adapter ids"):
        generate_with_adapters(multi, [torch.tensor([1])] * 3, [0, 1], max_new_tokens=1)


def test_adapter_with_full_trained_head_is_refused(tmp_path):
    base_dir, _ = make_setup(tmp_path, "tiny")
    lora = LoRAConfig(r=2, train_head=True)
    path = save_adapter(load_lora_model(base_dir, lora), tmp_path / "full.lora.safetensors", lora)
    with pytest.raises(ValueError, match="trains or grows the embedding/head in full"):
        load_multi_lora_model(base_dir, [path])


def test_benchmark_function_reports_both_rates():
    result = benchmark_multi_adapter("tiny", n_rows=4, n_adapters=4, prompt_length=4, max_new_tokens=4, repeats=1)
    print(f"multi {result['multi_tokens_per_s']:.0f} tokens/s, merged {result['merged_tokens_per_s']:.0f} tokens/s, "
          f"ratio {result['ratio']:.2f}")
    assert result["multi_tokens_per_s"] > 0 and result["merged_tokens_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["multi_tokens_per_s"] / result["merged_tokens_per_s"])
