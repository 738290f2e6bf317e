"""Meta's model-parallel format: shards cut HERE with torch.chunk along the dims of Meta's fairscale
layers (written out below, independently of lit_llama.convert_meta) convert back bit-exactly, our
slicer writes the same shards as that independent cut, and bad input is one error line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_llama.checkpoint import load_config, save_checkpoint
from lit_llama.convert_meta import expected_shapes
from lit_llama.model import LLaMA, LLaMAConfig

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "mha": LLaMAConfig.from_name("tiny"),  # 4 heads, 4 kv heads
    "gqa": LLaMAConfig(block_size=128, vocab_size=256, n_layer=2, n_head=8, n_embd=64, n_query_groups=4, multiple_of=16),
}

# Meta's model.py: which fairscale layer each weight is, hence the dim its rank slices cut
# (ColumnParallelLinear: output rows; RowParallelLinear: input columns; ParallelEmbedding: embedding
# dim; RMSNorm weights are replicated).
META_SPLIT_DIM = {
    "tok_embeddings": 1, "output": 0, "norm": None, "attention_norm": None, "ffn_norm": None,
    "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1,
}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{script}.py", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "LIT_LLAMA_DEBUG": ""},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def random_checkpoint(config: LLaMAConfig, path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint of random weights (norms too, so no two tensors are alike); returns its tensors."""
    torch.manual_seed(0)
    model = LLaMA(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    save_checkpoint(model, path)
    return load_file(path / "lit_model.safetensors")


def to_meta_full(sd: dict[str, torch.Tensor], config: LLaMAConfig) -> dict[str, torch.Tensor]:
    """Our tensors under Meta's names, written out here from Meta's model.py: c_attn = [wq | wk | wv]
    rows; c_fc1 = w1, c_fc2 = w3, mlp.c_proj = w2."""
    hs = config.head_size
    meta = {"tok_embeddings.weight": sd["transformer.wte.weight"], "norm.weight": sd["transformer.ln_f.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        wq, wk, wv = sd[p + "attn.c_attn.weight"].split(
            [config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs]
        )
        meta.update({
            f"layers.{i}.attention_norm.weight": sd[p + "rms_1.weight"],
            f"layers.{i}.attention.wq.weight": wq, f"layers.{i}.attention.wk.weight": wk,
            f"layers.{i}.attention.wv.weight": wv, f"layers.{i}.attention.wo.weight": sd[p + "attn.c_proj.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "rms_2.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.c_fc1.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.c_fc2.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.c_proj.weight"],
        })
    return meta


def cut_shards(meta: dict[str, torch.Tensor], n: int, split_dims: dict | None = None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in meta.items():
        kind = name.split(".")[-2]
        dim = (split_dims or META_SPLIT_DIM)[kind]
        pieces = [t] * n if dim is None else torch.chunk(t, n, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    return shards


def write_meta_dir(path: Path, config: LLaMAConfig, shards: list[dict[str, torch.Tensor]], **extra) -> None:
    path.mkdir(parents=True)
    params = {"dim": config.n_embd, "multiple_of": config.multiple_of, "n_heads": config.n_head,
              "n_layers": config.n_layer, "norm_eps": config.norm_eps, "vocab_size": -1, **extra}
    if config.n_query_groups != config.n_head:
        params["n_kv_heads"] = config.n_query_groups
    (path / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(shards):
        # Early LLaMA-1 shards also carry RoPE frequencies, which the converter must ignore.
        torch.save({**shard, "rope.freqs": torch.randn(config.head_size // 2)}, path / f"consolidated.{rank:02d}.pth")


@pytest.mark.parametrize("n_shards", [2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_independently_cut_shards_convert_bit_exact_and_our_slicer_cuts_the_same(tmp_path, name, n_shards):
    config = CONFIGS[name]
    original = random_checkpoint(config, tmp_path / "lit")
    reference_shards = cut_shards(to_meta_full(original, config), n_shards)
    write_meta_dir(tmp_path / "meta", config, reference_shards)
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece stand-in")  # Meta's layout: next to the model dirs

    convert = load_script("convert_checkpoint").main
    convert(checkpoint_dir=tmp_path / "meta", output_dir=tmp_path / "back", block_size=config.block_size)
    back = load_file(tmp_path / "back" / "lit_model.safetensors")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert load_config(tmp_path / "back") == config
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == b"sentencepiece stand-in"

    load_script("slice_checkpoint").main(checkpoint_dir=tmp_path / "lit", output_dir=tmp_path / "ours", shards=n_shards)
    for rank, reference in enumerate(reference_shards):
        ours = torch.load(tmp_path / "ours" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[k], reference[k]) for k in reference)
        # each slice owns exactly its bytes (torch.save of a view would store the whole tensor)
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in ours.values())
    convert(checkpoint_dir=tmp_path / "ours", output_dir=tmp_path / "back2", block_size=config.block_size)
    back2 = load_file(tmp_path / "back2" / "lit_model.safetensors")
    assert all(torch.equal(back2[k], original[k]) for k in original) and back2.keys() == original.keys()
    assert load_config(tmp_path / "back2") == config


def test_dtype_cast_and_expected_shapes_match_the_model(tmp_path):
    config = CONFIGS["gqa"]
    original = random_checkpoint(config, tmp_path / "lit")
    write_meta_dir(tmp_path / "meta", config, cut_shards(to_meta_full(original, config), 2))
    load_script("convert_checkpoint").main(
        checkpoint_dir=tmp_path / "meta", output_dir=tmp_path / "bf16", dtype="bfloat16", block_size=config.block_size
    )
    back = load_file(tmp_path / "bf16" / "lit_model.safetensors")
    assert all(torch.equal(back[k], original[k].to(torch.bfloat16)) for k in original)
    with torch.device("meta"):
        model_shapes = {k: tuple(v.shape) for k, v in LLaMA(config).state_dict().items()}
    assert expected_shapes(config) == model_shapes


def test_llama3_vocab_parallel_embedding_converts_bit_exact(tmp_path):
    # Llama 3's model.py uses VocabParallelEmbedding: tok_embeddings is cut along the vocabulary.
    config = LLaMAConfig(**{**CONFIGS["gqa"].to_dict(), "rope_base": 500000.0})
    original = random_checkpoint(config, tmp_path / "lit")
    shards = cut_shards(to_meta_full(original, config), 4, {**META_SPLIT_DIM, "tok_embeddings": 0})
    write_meta_dir(tmp_path / "meta", config, shards, vocab_size=config.vocab_size, rope_theta=500000.0)
    load_script("convert_checkpoint").main(checkpoint_dir=tmp_path / "meta", output_dir=tmp_path / "back", block_size=128)
    back = load_file(tmp_path / "back" / "lit_model.safetensors")
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert load_config(tmp_path / "back") == config


def test_pth_checkpoint_slices_like_the_independent_cut(tmp_path):
    config = CONFIGS["gqa"]
    original = random_checkpoint(config, tmp_path / "lit")
    model = LLaMA(config)
    model.load_state_dict(original)
    save_checkpoint(model, tmp_path / "pth", weights_name="lit_model.pth")
    load_script("slice_checkpoint").main(checkpoint_dir=tmp_path / "pth", output_dir=tmp_path / "meta", shards=2)
    for rank, reference in enumerate(cut_shards(to_meta_full(original, config), 2)):
        ours = torch.load(tmp_path / "meta" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in reference)


def test_tied_model_slices_into_an_untied_meta_checkpoint_with_the_same_head(tmp_path):
    config = LLaMAConfig.from_name("tiny-tied")
    original = random_checkpoint(config, tmp_path / "lit")
    load_script("slice_checkpoint").main(checkpoint_dir=tmp_path / "lit", output_dir=tmp_path / "meta", shards=1)
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert torch.equal(shard["output.weight"], original["transformer.wte.weight"])


def test_end_to_end_cli_and_help(tmp_path):
    config = CONFIGS["mha"]
    original = random_checkpoint(config, tmp_path / "lit")
    proc = run_script("slice_checkpoint", "--checkpoint_dir", tmp_path / "lit", "--output_dir", tmp_path / "meta", "--shards", 2)
    assert proc.returncode == 0, proc.stderr
    proc = run_script("convert_checkpoint", "--checkpoint_dir", tmp_path / "meta", "--output_dir", tmp_path / "back",
                      "--block_size", config.block_size)
    assert proc.returncode == 0, proc.stderr
    assert "MiB" in proc.stderr
    back = load_file(tmp_path / "back" / "lit_model.safetensors")
    assert all(torch.equal(back[k], original[k]) for k in original)
    for script, flag in [("convert_checkpoint", "--tokenizer_path"), ("slice_checkpoint", "--shards")]:
        proc = run_script(script, "--help")
        assert proc.returncode == 0 and flag in proc.stdout


def test_bad_input_is_one_error_line(tmp_path):
    config = LLaMAConfig.from_name("tiny-gqa")  # 2 kv heads
    random_checkpoint(config, tmp_path / "lit")
    proc = run_script("slice_checkpoint", "--checkpoint_dir", tmp_path / "lit", "--output_dir", tmp_path / "meta", "--shards", 4)
    assert_one_line_error(proc, "do not divide n_kv_heads")
    assert not (tmp_path / "meta" / "consolidated.00.pth").exists()

    (tmp_path / "meta").mkdir(exist_ok=True)
    torch.save({}, tmp_path / "meta" / "consolidated.00.pth")
    proc = run_script("convert_checkpoint", "--checkpoint_dir", tmp_path / "meta", "--output_dir", tmp_path / "out")
    assert_one_line_error(proc, "no params.json")
