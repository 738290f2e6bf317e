"""PEFT interop: our adapters as PEFT adapters of the Hugging Face export of the base, and back.

The reference is PEFT itself: `peft.PeftModel.from_pretrained` on the transformers model that
scripts/convert_lit_checkpoint.py writes, and adapters that PEFT's own `save_pretrained` writes.
"""

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lit_llama.adapter import apply_adapter, load_adapter, save_adapter
from lit_llama.checkpoint import save_checkpoint
from lit_llama.lora import LoRAConfig, full_trained_parameters, load_lora_model, lora_state_dict
from lit_llama.model import LLaMA, LLaMAConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name -> (lit checkpoint dir, HF folder written by convert_lit_checkpoint.py), random weights."""
    out = {}
    for name in ("tiny-gqa", "tiny-tied"):
        root = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        model = LLaMA(LLaMAConfig.from_name(name))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        save_checkpoint(model, root / "lit")
        script("convert_lit_checkpoint")(checkpoint_dir=root / "lit", output_dir=root / "hf")
        out[name] = (root / "lit", root / "hf")
    return out


def trained_adapter(checkpoint_dir: Path, lora: LoRAConfig, path: Path) -> tuple[LLaMA, Path]:
    """A LoRA model with random non-zero LoRA (and trained-in-full) weights, saved as an adapter.
    Columns of lora_B beyond a smaller slice rank stay zero, as training leaves them."""
    model = load_lora_model(checkpoint_dir, lora)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for v in lora_state_dict(model).values():
            v.copy_(torch.randn(v.shape, generator=g) * 0.3)
        for p in full_trained_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ranks = [r for r in lora.slice_ranks if r]
        if len(set(ranks)) > 1:
            hs, c = model.config.head_size, model.config
            rows = [n * hs for n, on in zip((c.n_head, c.n_query_groups, c.n_query_groups), lora.enable_lora) if on]
            for block in model.transformer.h:
                b0 = 0
                for n_rows, rank in zip(rows, ranks):
                    block.attn.c_attn.lora_B[b0:b0 + n_rows, rank:] = 0
                    b0 += n_rows
    return model.eval(), save_adapter(model, path, lora, prompt_style="alpaca")


CASES = {
    "qkv-ranks": ("tiny-gqa", LoRAConfig(r=4, alpha=8, dropout=0.0, key=True, r_query=2, r_value=3)),
    "proj-mlp-head-emb": ("tiny-gqa", LoRAConfig(r=4, alpha=8, dropout=0.0, projection=True, mlp=True, head=True, embedding=True)),
    "full-head-emb": ("tiny-gqa", LoRAConfig(r=4, alpha=8, dropout=0.0, train_embedding=True, train_head=True)),
    "tied-shared": ("tiny-tied", LoRAConfig(r=4, alpha=8, dropout=0.0, embedding=True)),
    "tied-full": ("tiny-tied", LoRAConfig(r=4, alpha=8, dropout=0.0, train_embedding=True)),
    "untied": ("tiny-tied", LoRAConfig(r=4, alpha=8, dropout=0.0, mlp=True, head=True, embedding=True, untie_embeddings=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_from_pretrained_on_our_export_gives_our_logits(bases, tmp_path, case):
    name, lora = CASES[case]
    lit_dir, hf_dir = bases[name]
    ours, adapter = trained_adapter(lit_dir, lora, tmp_path / "a.lora.safetensors")
    script("convert_lora_to_peft")(lora_path=adapter, output_dir=tmp_path / "peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    with warnings.catch_warnings():  # PEFT warns about a tied layer in an untied adapter: the case under test
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=idx).logits
        with model.disable_adapter():
            base = model(input_ids=idx).logits
        got = ours(idx)
    err = (got - expected).abs().max().item()
    print(f"{case}: max abs logit diff vs PEFT {err:.2e} (the adapter moves PEFT's logits by {(expected - base).abs().max():.2f})")
    assert (expected - base).abs().max() > 0.1  # the adapter is not a no-op in PEFT either
    assert err < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_lit_to_peft_to_lit_is_bit_exact(bases, tmp_path, case):
    name, lora = CASES[case]
    lit_dir, _ = bases[name]
    _, adapter = trained_adapter(lit_dir, lora, tmp_path / "a.lora.safetensors")
    script("convert_lora_to_peft")(lora_path=adapter, output_dir=tmp_path / "peft")
    back = script("convert_peft_to_lora")(peft_dir=tmp_path / "peft", checkpoint_dir=lit_dir, output_path=tmp_path / "b.lora.safetensors")
    (sd_a, meta_a), (sd_b, meta_b) = load_adapter(adapter), load_adapter(back)
    assert meta_a == meta_b
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        assert sd_a[k].dtype == sd_b[k].dtype and torch.equal(sd_a[k], sd_b[k]), k
    with safe_open(adapter, "pt") as fa, safe_open(back, "pt") as fb:
        assert fa.metadata() == fb.metadata()


def test_adapter_trained_in_peft_converts_to_ours(bases, tmp_path):
    """An adapter PEFT made and saved itself: attention (per-module ranks), MLP, head and embedding."""
    lit_dir, hf_dir = bases["tiny-gqa"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, rank_pattern={"q_proj": 2, "k_proj": 3},
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"],
    )
    model = peft.get_peft_model(hf, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    with warnings.catch_warnings():  # "setting save_embedding_layers to True": PEFT's choice, not ours
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "peft")
    path = script("convert_peft_to_lora")(peft_dir=tmp_path / "peft", checkpoint_dir=lit_dir, output_path=tmp_path / "p.lora.safetensors")
    _, meta = load_adapter(path)
    assert meta.lora.slice_ranks == (2, 3, 4) and meta.lora.targets == "query,key,value,projection,mlp,head,embedding"
    ours = load_lora_model(lit_dir, meta.lora)
    apply_adapter(ours, path)
    idx = torch.randint(0, ours.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=idx).logits
        with model.disable_adapter():
            base = model(input_ids=idx).logits
        got = ours.eval()(idx)
    err = (got - expected).abs().max().item()
    print(f"PEFT-made adapter: max abs logit diff {err:.2e} (moves logits by {(expected - base).abs().max():.2f})")
    assert (expected - base).abs().max() > 0.1
    assert err < 1e-4


# --------------------------------------------------------------------------------------------- CLI
def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_converter_clis_help_and_one_line_errors(bases, tmp_path):
    lit_dir, _ = bases["tiny-gqa"]
    for name in ("convert_lora_to_peft", "convert_peft_to_lora"):
        assert run(f"scripts/{name}.py", "--help").returncode == 0
    missing = run("scripts/convert_lora_to_peft.py", "--lora_path", str(tmp_path / "nope.safetensors"), "--output_dir", str(tmp_path / "o"))
    assert missing.returncode != 0 and missing.stderr.count("error:") == 1 and "Traceback" not in missing.stderr
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True, "r": 4}))
    torch.save({}, tmp_path / "dora" / "adapter_model.bin")
    dora = run("scripts/convert_peft_to_lora.py", "--peft_dir", str(tmp_path / "dora"), "--checkpoint_dir", str(lit_dir),
               "--output_path", str(tmp_path / "d.safetensors"))
    assert dora.returncode != 0 and "DoRA" in dora.stderr and "Traceback" not in dora.stderr
