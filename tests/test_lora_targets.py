"""LoRA targets beyond Q/V, tied embeddings, vocabulary growth and adapter file hygiene.

References are independent of lit_llama/lora.py's merge code: weights merged by hand in the test
(plain matmuls on the raw A/B tensors), base tensors read back from the base checkpoint, and
Hugging Face transformers loading our exported checkpoints.
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lit_llama.adapter import apply_adapter, load_adapter, save_adapter
from lit_llama.checkpoint import load_into, load_weights, model_state_dict, save_checkpoint
from lit_llama.lora import (
    LoRAConfig,
    add_lora,
    build_lora_model,
    load_lora_model,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora_weights,
    merged_model,
    unmerge_lora_weights,
)
from lit_llama.model import LLaMA, LLaMAConfig

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_base(name: str, seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    model = LLaMA(LLaMAConfig.from_name(name))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def randomize_lora_(model: LLaMA, lora: LoRAConfig, seed: int = 1) -> None:
    """Random non-zero A and B everywhere (B too: a no-op adapter must not pass). Per-slice ranks
    below the largest leave the columns they do not use at zero, as training does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in lora_state_dict(model).items():
            v.copy_(torch.randn(v.shape, generator=g) * 0.3)
        if any(lora.enable_lora):
            ranks = [r for r in lora.slice_ranks if r]
            rows = slice_rows(model.config, lora)
            for block in model.transformer.h:
                b0 = 0
                for n_rows, rank in zip(rows, ranks):
                    block.attn.c_attn.lora_B[b0:b0 + n_rows, rank:] = 0
                    b0 += n_rows


def lora_model(name: str, lora: LoRAConfig) -> LLaMA:
    model = add_lora(random_base(name), lora)
    randomize_lora_(model, lora)
    return model


def slice_rows(config: LLaMAConfig, lora: LoRAConfig) -> list[int]:
    hs = config.head_size
    sizes = (config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs)
    return [size for size, on in zip(sizes, lora.enable_lora) if on]


def hand_merged(model: LLaMA, lora: LoRAConfig) -> LLaMA:
    """A plain LLaMA whose weights are the LoRA model's W + (alpha / r) B A, merged here by hand."""
    sd = model.state_dict()
    c = model.config
    hs = c.head_size
    W = {k: v.detach().clone().double() for k, v in sd.items() if "lora_" not in k}
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        if any(lora.enable_lora):
            A, B = sd[p + "attn.c_attn.lora_A"].double(), sd[p + "attn.c_attn.lora_B"].double()
            out_row = a = b = 0
            for name, size in zip(("query", "key", "value"), (c.n_head * hs, c.n_query_groups * hs, c.n_query_groups * hs)):
                if getattr(lora, name):
                    r = getattr(lora, f"r_{name}") or lora.r
                    W[p + "attn.c_attn.weight"][out_row:out_row + size] += (lora.alpha / r) * B[b:b + size, :r] @ A[a:a + r]
                    a, b = a + r, b + size
                out_row += size
        modules = (["attn.c_proj"] if lora.projection else []) + (["mlp.c_fc1", "mlp.c_fc2", "mlp.c_proj"] if lora.mlp else [])
        for m in modules:
            W[p + m + ".weight"] += (lora.alpha / lora.r) * sd[p + m + ".lora_B"].double() @ sd[p + m + ".lora_A"].double()
    tied = c.tie_embeddings and not lora.untie_embeddings
    if "transformer.wte.lora_A" in sd:  # embedding LoRA: E += s (B A)^T, A (r, V), B (C, r)
        delta = (lora.alpha / lora.r) * (sd["transformer.wte.lora_B"].double() @ sd["transformer.wte.lora_A"].double()).T
        W["transformer.wte.weight"] += delta
        if tied:
            W["lm_head.weight"] = W["transformer.wte.weight"]
    if "lm_head.lora_A" in sd:
        W["lm_head.weight"] += (lora.alpha / lora.r) * sd["lm_head.lora_B"].double() @ sd["lm_head.lora_A"].double()
    config = LLaMAConfig(**{**c.to_dict(), "tie_embeddings": tied})
    plain = LLaMA(config)
    state = {k: v.float() for k, v in W.items()}
    if tied:
        state.pop("lm_head.weight")
    plain.load_state_dict(state, strict=not tied)
    if tied:
        plain.tie_weights()
    return plain.eval()


def tokens(config: LLaMAConfig, B: int = 2, T: int = 10, vocab: int | None = None) -> torch.Tensor:
    return torch.randint(0, vocab or config.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))


def train_steps(model: LLaMA, steps: int = 3, lr: float = 0.05, weight_decay: float = 0.0, vocab: int | None = None) -> None:
    mark_only_lora_as_trainable(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        idx = torch.randint(0, vocab or model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(step))
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# ------------------------------------------------------------------------------------ names/shapes
def test_parameter_names_and_shapes_for_every_target():
    lora = LoRAConfig(r=4, key=True, r_query=2, r_value=3, projection=True, mlp=True, head=True, embedding=True)
    with torch.device("meta"):
        model = build_lora_model(LLaMAConfig.from_name("tiny-gqa"), lora)
    shapes = {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    C, H, V, kv = 32, 96, 256, 16  # tiny-gqa: n_embd, intermediate (MLP hidden), vocab, ng * hs
    expected = {"transformer.wte.lora_A": (4, V), "transformer.wte.lora_B": (C, 4),
                "lm_head.lora_A": (4, C), "lm_head.lora_B": (V, 4)}
    for i in range(2):
        p = f"transformer.h.{i}."
        expected.update({
            p + "attn.c_attn.lora_A": (2 + 4 + 3, C), p + "attn.c_attn.lora_B": (C + 2 * kv, 4),  # Q, K, V rows; max rank
            p + "attn.c_proj.lora_A": (4, C), p + "attn.c_proj.lora_B": (C, 4),
            p + "mlp.c_fc1.lora_A": (4, C), p + "mlp.c_fc1.lora_B": (H, 4),
            p + "mlp.c_fc2.lora_A": (4, C), p + "mlp.c_fc2.lora_B": (H, 4),
            p + "mlp.c_proj.lora_A": (4, H), p + "mlp.c_proj.lora_B": (C, 4),
        })
    assert shapes == expected
    assert lora.targets == "query,key,value,projection,mlp,head,embedding"


def test_lora_config_rejects_a_rank_for_a_slice_that_is_off():
    with pytest.raises(ValueError, match="r_key=4 is set but key is off"):
        LoRAConfig(r_key=4)
    with pytest.raises(ValueError, match="pad_id"):
        LoRAConfig(pad_id=3)
    LoRAConfig(query=False, value=False, mlp=True)  # an MLP-only LoRA is a valid config


# ----------------------------------------------------------------------------------------- forward
TARGET_CASES = {
    "qkv-ranks": ("tiny-gqa", LoRAConfig(r=4, alpha=8, dropout=0.0, key=True, r_query=2, r_value=3)),
    "proj-mlp": ("tiny-gqa", LoRAConfig(r=4, alpha=8, dropout=0.0, query=False, value=False, projection=True, mlp=True)),
    "head": ("tiny", LoRAConfig(r=4, alpha=8, dropout=0.0, head=True)),
    "embedding": ("tiny", LoRAConfig(r=4, alpha=8, dropout=0.0, embedding=True)),
    "tied-embedding": ("tiny-tied", LoRAConfig(r=4, alpha=8, dropout=0.0, embedding=True)),
    "tied-head": ("tiny-tied", LoRAConfig(r=4, alpha=8, dropout=0.0, head=True)),
    "untied-both": ("tiny-tied", LoRAConfig(r=4, alpha=8, dropout=0.0, head=True, embedding=True, untie_embeddings=True)),
}


@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_forward_and_merge_equal_weights_merged_by_hand(case):
    name, lora = TARGET_CASES[case]
    model = lora_model(name, lora)
    reference = hand_merged(model, lora)
    idx = tokens(model.config)
    with torch.no_grad():
        base = random_base(name)(idx)
        unmerged = model(idx)
        expected = reference(idx)
        merge_lora_weights(model)
        merged = model(idx)
        unmerge_lora_weights(model)
        again = model(idx)
    err = (unmerged - expected).abs().max().item()
    print(f"{case}: unmerged vs hand-merged {err:.2e}, LoRA moves logits by {(expected - base).abs().max():.2f}")
    assert (expected - base).abs().max() > 0.1  # the update is not a no-op
    assert err < 1e-4
    assert (merged - expected).abs().max() < 1e-4
    assert (again - unmerged).abs().max() < 1e-4


def test_only_lora_and_declared_full_modules_train():
    lora = LoRAConfig(r=4, mlp=True, head=True, train_embedding=True)
    model = lora_model("tiny", lora)
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.wte.weight" in trainable and "lm_head.weight" not in trainable
    assert all(n.endswith((".lora_A", ".lora_B")) for n in trainable - {"transformer.wte.weight"})
    assert {n.rsplit(".", 2)[-2] for n in trainable if "lora" in n} == {"c_attn", "c_fc1", "c_fc2", "c_proj", "lm_head"}


# ------------------------------------------------------------------------------------------- tied
def convert_to_hf(checkpoint_dir: Path, output_dir: Path):
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("convert_lit_checkpoint", REPO / "scripts" / "convert_lit_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(checkpoint_dir=checkpoint_dir, output_dir=output_dir)
    return transformers.AutoModelForCausalLM.from_pretrained(output_dir).eval()


@pytest.mark.parametrize("lora", [
    LoRAConfig(r=4, alpha=8, dropout=0.0, head=True),  # a LoRA on the tied head = on the embedding
    LoRAConfig(r=4, alpha=8, dropout=0.0, query=False, value=False, train_head=True),  # full training
], ids=["lora", "full"])
def test_tied_embedding_and_head_stay_one_matrix_through_training_merge_save_and_hf_export(tmp_path, lora):
    save_checkpoint(random_base("tiny-tied"), tmp_path / "base")
    model = load_lora_model(tmp_path / "base", lora)
    randomize_lora_(model, lora)
    train_steps(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = tokens(model.config)
    with torch.no_grad():
        trained = model(idx)
    adapter = save_adapter(model, tmp_path / "a.lora.safetensors", lora)

    fresh = load_lora_model(tmp_path / "base", load_adapter(adapter)[1].lora)
    apply_adapter(fresh, adapter)
    merged = merged_model(fresh)
    assert merged.config.tie_embeddings and merged.lm_head.weight is merged.transformer.wte.weight
    save_checkpoint(merged, tmp_path / "merged")
    assert "lm_head.weight" not in load_weights(tmp_path / "merged" / "lit_model.safetensors")  # stored once
    hf = convert_to_hf(tmp_path / "merged", tmp_path / "hf")
    assert hf.config.tie_word_embeddings
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    base_embedding = load_weights(tmp_path / "base" / "lit_model.safetensors")["transformer.wte.weight"]
    assert (hf.model.embed_tokens.weight - base_embedding).abs().max() > 1e-3  # the shared matrix did change
    with torch.no_grad():
        err = (hf(input_ids=idx).logits - trained).abs().max().item()
    print(f"tied {lora.targets or lora.train_modules}: HF export vs trained LoRA model, max abs logit diff {err:.2e}")
    assert err < 1e-4


def test_untie_embeddings_gives_two_different_matrices(tmp_path):
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, head=True, embedding=True, untie_embeddings=True)
    save_checkpoint(random_base("tiny-tied"), tmp_path / "base")
    model = load_lora_model(tmp_path / "base", lora)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # a copy, before training
    randomize_lora_(model, lora)
    train_steps(model)
    idx = tokens(model.config)
    with torch.no_grad():
        trained = model(idx)
    merged = merged_model(model)
    assert not merged.config.tie_embeddings
    save_checkpoint(merged, tmp_path / "merged")
    hf = convert_to_hf(tmp_path / "merged", tmp_path / "hf")
    assert not hf.config.tie_word_embeddings
    assert (hf.lm_head.weight - hf.model.embed_tokens.weight).abs().max() > 1e-3
    with torch.no_grad():
        assert (hf(input_ids=idx).logits - trained).abs().max() < 1e-4


@pytest.mark.parametrize("untie", [False, True], ids=["tied", "untied"])
def test_stories260k_lora_on_its_tied_head_through_merge_and_hf_export(tmp_path, untie):
    """The real tied model (llama2.c stories260K): one shared update by default, two when untied."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "stories260K.bin"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    from lit_llama.convert_llama2c import load_llama2c

    config, state_dict = load_llama2c(path)
    with torch.device("meta"):
        base = LLaMA(config)
    load_into(base, state_dict)  # strict; ties the head to the embedding
    save_checkpoint(base, tmp_path / "base")
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, mlp=True, head=True, embedding=untie, untie_embeddings=untie)
    model = load_lora_model(tmp_path / "base", lora)
    train_steps(model, steps=2, lr=0.02)
    idx = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286]])  # BOS "Once upon a time, there was"
    with torch.no_grad():
        trained = model(idx)
    save_checkpoint(merged_model(model), tmp_path / "merged")
    hf = convert_to_hf(tmp_path / "merged", tmp_path / "hf")
    head_vs_embedding = (hf.lm_head.weight - hf.model.embed_tokens.weight).abs().max().item()
    assert hf.config.tie_word_embeddings is not untie
    assert (head_vs_embedding > 1e-4) if untie else head_vs_embedding == 0.0
    with torch.no_grad():
        err = (hf(input_ids=idx).logits - trained).abs().max().item()
    print(f"stories260K {'untied' if untie else 'tied'}: |head - embedding| {head_vs_embedding:.2e}, HF vs ours {err:.2e}")
    assert err < 1e-4


# -------------------------------------------------------------------------------- vocabulary growth
def test_grown_vocabulary_rows_start_at_the_mean_and_pad_row_stays_zero(tmp_path):
    base = random_base("tiny")
    save_checkpoint(base, tmp_path / "base")
    old, new, pad = 256, 260, 259
    lora = LoRAConfig(r=4, head=True, embedding=True, train_embedding=True, train_head=True, resize_vocab=new, pad_id=pad)
    model = load_lora_model(tmp_path / "base", lora)
    E = base.transformer.wte.weight.detach().numpy()
    H = base.lm_head.weight.detach().numpy()
    wte, head = model.transformer.wte.weight.detach(), model.lm_head.weight.detach()
    assert wte.shape == head.shape == (new, 32)
    np.testing.assert_allclose(wte[old:pad].numpy(), np.broadcast_to(E.mean(0), (pad - old, 32)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(head[old:pad].numpy(), np.broadcast_to(H.mean(0), (pad - old, 32)), rtol=0, atol=1e-6)
    assert not wte[pad].any() and not head[pad].any()

    randomize_lora_(model, lora)
    with torch.no_grad():  # LoRA codes of the pad token start at zero, like its rows
        model.transformer.wte.lora_A[:, pad] = 0
        model.lm_head.lora_B[pad] = 0
    train_steps(model, weight_decay=0.1, vocab=new)  # the batches use the new tokens, pad included
    wte, head = model.transformer.wte.weight.detach(), model.lm_head.weight.detach()
    assert not wte[pad].any() and not head[pad].any()  # exactly zero after AdamW with weight decay
    assert not model.transformer.wte.lora_A[:, pad].any() and not model.lm_head.lora_B[pad].any()
    assert (wte[old:pad] - torch.from_numpy(E.mean(0))).abs().max() > 1e-3  # the other new rows trained

    path = save_adapter(model, tmp_path / "grown.lora.safetensors", lora)
    fresh = load_lora_model(tmp_path / "base", load_adapter(path)[1].lora)
    apply_adapter(fresh, path)
    idx = tokens(base.config, vocab=new)
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))
    merged = merged_model(fresh)
    assert merged.config.vocab_size == new and merged.transformer.wte.weight.shape == (new, 32)


def test_grown_but_frozen_embedding_saves_only_its_new_rows(tmp_path):
    save_checkpoint(random_base("tiny-tied"), tmp_path / "base")
    lora = LoRAConfig(r=4, resize_vocab=258)
    model = load_lora_model(tmp_path / "base", lora)
    path = save_adapter(model, tmp_path / "a.lora.safetensors", lora)
    with safe_open(path, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["transformer.wte.new_rows"] == (2, 32)
    assert "transformer.wte.weight" not in shapes and "lm_head.new_rows" not in shapes  # tied: one matrix


# ---------------------------------------------------------------------------------- adapter files
HYGIENE_CASES = {
    "default": ("tiny", LoRAConfig(r=4)),
    "all-targets": ("tiny-gqa", LoRAConfig(r=4, key=True, projection=True, mlp=True, head=True, embedding=True)),
    "tied": ("tiny-tied", LoRAConfig(r=4, head=True)),
    "untied": ("tiny-tied", LoRAConfig(r=4, head=True, untie_embeddings=True)),
    "train-head": ("tiny", LoRAConfig(r=4, train_head=True)),
    "grown": ("tiny", LoRAConfig(r=4, resize_vocab=300, pad_id=299)),
    "grown-train-embedding": ("tiny", LoRAConfig(r=4, resize_vocab=300, train_embedding=True)),
}


@pytest.mark.parametrize("case", list(HYGIENE_CASES))
def test_adapter_holds_no_frozen_base_tensor(tmp_path, case):
    name, lora = HYGIENE_CASES[case]
    save_checkpoint(random_base(name), tmp_path / "base")
    model = load_lora_model(tmp_path / "base", lora)
    train_steps(model, steps=1, vocab=lora.resize_vocab)
    path = save_adapter(model, tmp_path / "a.lora.safetensors", lora)
    frozen = load_weights(tmp_path / "base" / "lit_model.safetensors")  # the base, as its checkpoint stores it
    trained = {"transformer.wte.weight"} if lora.train_embedding else set()
    if lora.train_head:
        trained.add("lm_head.weight" if "lm_head.weight" in frozen else "transformer.wte.weight")
    frozen = {k: v for k, v in frozen.items() if k not in trained}
    with safe_open(path, "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            for base_name, w in frozen.items():
                same_shape = tuple(t.shape) == tuple(w.shape)
                assert not same_shape or key in trained, f"{key} is shaped like the frozen {base_name}"
                if t.shape[-1:] == w.shape[-1:] and t.shape[0] <= w.shape[0]:  # any run of frozen rows
                    assert not any(torch.equal(t, w[s:s + t.shape[0]]) for s in range(w.shape[0] - t.shape[0] + 1)), (
                        f"{key} copies rows of the frozen {base_name}"
                    )


def test_save_embedding_layers_true_false_auto(tmp_path):
    lora = LoRAConfig(r=4, train_head=True)
    model = lora_model("tiny", lora)
    keys = {}
    for mode in ("auto", "true"):
        with safe_open(save_adapter(model, tmp_path / f"{mode}.safetensors", lora, save_embedding_layers=mode), "pt") as f:
            keys[mode] = {k for k in f.keys() if "lora_" not in k}
    assert keys == {"auto": {"lm_head.weight"}, "true": {"lm_head.weight", "transformer.wte.weight"}}
    with pytest.raises(ValueError, match="would drop the trained lm_head.weight"):
        save_adapter(model, tmp_path / "false.safetensors", lora, save_embedding_layers="false")
    # A grown, frozen vocabulary saved without its rows: the load re-creates them (mean rows).
    grown = LoRAConfig(r=4, resize_vocab=260)
    model = add_lora(random_base("tiny"), grown)
    path = save_adapter(model, tmp_path / "grown.safetensors", grown, save_embedding_layers=False)
    state, meta = load_adapter(path)
    assert set(state) == set(lora_state_dict(model)) and meta.embedding_layers == ()


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_inspect_adapter_cli_lists_tensors_and_flags_frozen_copies(tmp_path):
    lora = LoRAConfig(r=4, mlp=True)
    model = lora_model("tiny", lora)
    clean = save_adapter(model, tmp_path / "clean.safetensors", lora, prompt_style="alpaca")
    bloated = save_adapter(model, tmp_path / "bloated.safetensors", lora, save_embedding_layers="true")
    help = run_script("scripts/inspect_adapter.py", "--help")
    assert help.returncode == 0 and "positional arguments:\n  path " in help.stdout  # as the docs call it
    ok = run_script("scripts/inspect_adapter.py", str(clean), "--strict", "true")
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"transformer\.h\.1\.mlp\.c_fc1\.lora_B\s+\(96, 4\)\s+float32\s+1,536\s", ok.stdout)  # 96*4*4 bytes
    assert "targets: query,value,mlp" in ok.stdout and "prompt_style: alpaca" in ok.stdout and "FLAG" not in ok.stdout
    flagged = run_script("scripts/inspect_adapter.py", str(bloated))
    assert flagged.returncode == 0 and "FLAG: shaped like the frozen base weight transformer.wte.weight" in flagged.stdout
    strict = run_script("scripts/inspect_adapter.py", str(bloated), "--strict", "true")
    assert strict.returncode != 0 and strict.stderr.count("error:") == 1 and "Traceback" not in strict.stderr
    missing = run_script("scripts/inspect_adapter.py", str(tmp_path / "nope.safetensors"))
    assert missing.returncode != 0 and "error:" in missing.stderr and "Traceback" not in missing.stderr


def test_v1_adapter_file_still_loads(tmp_path):
    """A file as the previous save_adapter wrote it (format v1, no new metadata keys)."""
    lora = LoRAConfig(r=4, alpha=8, key=True)
    model = lora_model("tiny", lora)
    from lit_llama.adapter import base_fingerprint, base_shape

    meta = {
        "format": "lit_llama.lora.v1", "r": "4", "alpha": "8.0", "dropout": "0.05", "targets": "query,key,value",
        "prompt_style": "alpaca", "base_fingerprint": base_fingerprint(model.config),
        "base_config": json.dumps(base_shape(model.config), sort_keys=True),
    }
    path = tmp_path / "v1.lora.safetensors"
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, path, metadata=meta)
    _, loaded = load_adapter(path)
    assert loaded.lora == lora and loaded.prompt_style == "alpaca"
    fresh = add_lora(random_base("tiny"), loaded.lora)
    apply_adapter(fresh, path)
    idx = tokens(model.config)
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))


def test_adapter_with_undeclared_full_weight_is_refused(tmp_path):
    model = lora_model("tiny", LoRAConfig(r=4))
    path = save_adapter(model, tmp_path / "a.safetensors", LoRAConfig(r=4))
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["transformer.wte.weight"] = model_state_dict(model)["transformer.wte.weight"].clone()
    save_file(tensors, tmp_path / "b.safetensors", metadata=meta)  # the metadata does not declare it
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        load_adapter(tmp_path / "b.safetensors")
