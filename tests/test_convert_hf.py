"""The Hugging Face converters against transformers' own files: HF -> lit -> HF is bit-exact for
every input layout transformers and the Hub use (single and sharded safetensors, pytorch_model.bin
with and without an index), the result loads in transformers, and bad input is one error line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_llama.checkpoint import load_config, load_model
from lit_llama.cli import run as cli_run
from lit_llama.convert_hf import (
    config_from_hf,
    config_to_hf,
    hf_shapes,
    hf_to_lit_state_dict,
    lit_shapes,
    lit_to_hf_state_dict,
)
from lit_llama.model import LLaMA, LLaMAConfig

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
BASE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=32, rms_norm_eps=1e-5,
)
GQA = dict(num_key_value_heads=2, rope_theta=20000.0)
TIED = dict(num_key_value_heads=1, tie_word_embeddings=True)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # jsonargparse resolves the postponed annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def random_hf_llama(**overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # norm weights too, so that no two tensors are alike
    return model.eval()


def write_hf_dir(model, path: Path, layout: str) -> dict[str, torch.Tensor]:
    """Write `model` the way `layout` says; return the tensors as stored (what must come back)."""
    if layout == "safetensors":
        model.save_pretrained(path)
    elif layout == "safetensors-sharded":
        model.save_pretrained(path, max_shard_size="20KB")
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    else:
        # pytorch_model.bin, as older transformers versions and many Hub repos have it. A tied model's
        # state_dict holds lm_head.weight as well, which the converter must tolerate.
        model.config.save_pretrained(path)
        state_dict = {k: v.clone() for k, v in model.state_dict().items()}
        if layout == "bin":
            torch.save(state_dict, path / "pytorch_model.bin")
        else:  # bin-sharded: two files and an index, plus the RoPE buffers old versions stored
            for i in range(model.config.num_hidden_layers):
                state_dict[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
            names = sorted(state_dict)
            shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                      "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
            for file, keys in shards.items():
                torch.save({k: state_dict[k] for k in keys}, path / file)
            index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
            (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    stored = {}
    for file in list(path.glob("*.safetensors")) + list(path.glob("*.bin")):
        stored.update(load_file(file) if file.suffix == ".safetensors" else torch.load(file, weights_only=True))
    stored = {k: v for k, v in stored.items() if "rotary_emb" not in k}
    if model.config.tie_word_embeddings:
        stored.pop("lm_head.weight", None)
    return stored


@pytest.mark.parametrize(
    "layout,overrides",
    [("safetensors", GQA), ("safetensors-sharded", TIED), ("bin", GQA), ("bin", TIED), ("bin-sharded", GQA),
     ("safetensors", TIED)],
)
def test_hf_to_lit_to_hf_round_trip_is_bit_exact(layout, overrides, tmp_path):
    hf = random_hf_llama(**overrides)
    original = write_hf_dir(hf, tmp_path / "hf", layout)
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"not a real tokenizer, only copied")
    load_script("convert_hf_checkpoint").main(checkpoint_dir=tmp_path / "hf", output_dir=tmp_path / "lit")
    assert (tmp_path / "lit" / "tokenizer.model").read_bytes() == b"not a real tokenizer, only copied"
    assert load_model(tmp_path / "lit").config.n_query_groups == overrides["num_key_value_heads"]
    # The way back turns a tokenizer.model into tokenizer.json & co (tests/test_hf_tokenizer_export.py): a real one.
    (tmp_path / "lit" / "tokenizer.model").unlink()
    load_script("convert_lit_checkpoint").main(checkpoint_dir=tmp_path / "lit", output_dir=tmp_path / "back")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


LLAMA3_HEAD_DIM = dict(
    num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=100.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8,
    ),
)
LINEAR = dict(num_key_value_heads=4, rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=2.0))


@pytest.mark.parametrize("overrides", [GQA, TIED, LLAMA3_HEAD_DIM, LINEAR])
def test_lit_to_hf_output_loads_in_transformers_with_identical_logits(overrides, tmp_path):
    hf = random_hf_llama(**overrides)
    hf.save_pretrained(tmp_path / "hf")
    load_script("convert_hf_checkpoint").main(checkpoint_dir=tmp_path / "hf", output_dir=tmp_path / "lit")
    load_script("convert_lit_checkpoint").main(checkpoint_dir=tmp_path / "lit", output_dir=tmp_path / "back")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert reloaded.config.num_key_value_heads == hf.config.num_key_value_heads
    assert (reloaded.config.head_dim, reloaded.config.rope_parameters) == (hf.config.head_dim, hf.config.rope_parameters)
    idx = torch.randint(0, BASE["vocab_size"], (1, BASE["max_position_embeddings"]))
    with torch.no_grad():
        assert torch.equal(reloaded(idx).logits, hf(idx).logits)  # same weights, same config: same numbers


def test_dtype_and_pth_format(tmp_path):
    hf = random_hf_llama(**GQA)
    hf.save_pretrained(tmp_path / "hf")
    script = load_script("convert_hf_checkpoint")
    script.main(checkpoint_dir=tmp_path / "hf", output_dir=tmp_path / "bf16", dtype="bfloat16")
    script.main(checkpoint_dir=tmp_path / "hf", output_dir=tmp_path / "pth", format="pth")
    bf16 = load_file(tmp_path / "bf16" / "lit_model.safetensors")
    pth = torch.load(tmp_path / "pth" / "lit_model.pth", weights_only=True)
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16} and {t.dtype for t in pth.values()} == {torch.float32}
    assert sorted(bf16) == sorted(pth)
    for name in pth:
        assert torch.equal(bf16[name], pth[name].to(torch.bfloat16)), name
    load_model(tmp_path / "pth")


def test_config_from_hf_reads_transformers_config():
    hf_config = transformers.LlamaConfig(**BASE, **GQA).to_dict()
    config = config_from_hf(hf_config)
    assert (config.n_layer, config.n_head, config.n_embd, config.n_query_groups) == (2, 4, 32, 2)
    assert (config.vocab_size, config.padded_vocab_size, config.intermediate_size) == (96, 96, 40)
    assert (config.block_size, config.norm_eps, config.rope_base, config.tie_embeddings) == (32, 1e-5, 20000.0, False)
    # Older config.json files keep rope_theta at the top level.
    legacy = {k: v for k, v in hf_config.items() if k != "rope_parameters"} | {"rope_theta": 30000.0}
    assert config_from_hf(legacy).rope_base == 30000.0


TRANSFORMERS4_LLAMA31 = {  # meta-llama/Llama-3.1-8B's config.json as transformers 4.43 wrote it (sizes shrunk)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", **BASE, "num_key_value_heads": 2, "head_dim": 16,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "rope_scaling": {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_config_from_hf_reads_head_dim_and_rope_scaling(layout):
    hf_config = TRANSFORMERS4_LLAMA31
    if layout == "transformers5":
        hf_config = {k: v for k, v in hf_config.items() if k not in ("rope_theta", "rope_scaling")}
        hf_config["rope_parameters"] = {**TRANSFORMERS4_LLAMA31["rope_scaling"], "rope_theta": 500000.0}
    config = config_from_hf(hf_config)
    assert (config.head_size, config.n_head, config.n_embd, config.rope_base) == (16, 4, 32, 500000.0)
    assert config.rope_scaling == dict(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    # transformers' fallbacks: no original_max_position_embeddings -> max_position_embeddings; the
    # pre-4.43 spelling "type" of linear scaling.
    scaling = {k: v for k, v in TRANSFORMERS4_LLAMA31["rope_scaling"].items() if k != "original_max_position_embeddings"}
    assert config_from_hf({**TRANSFORMERS4_LLAMA31, "rope_scaling": scaling}).rope_scaling[
        "original_max_position_embeddings"] == BASE["max_position_embeddings"]
    linear = config_from_hf({**TRANSFORMERS4_LLAMA31, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"type": "linear", "factor": 2.0} and linear.rope_base == 500000.0


UNSUPPORTED = {  # config.json change -> what the one error line names
    "yarn": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}}, "'yarn'"),
    "dynamic": ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    "longrope": ({"rope_scaling": None, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
    "attention_bias": ({"attention_bias": True}, "attention_bias=true"),
    "mlp_bias": ({"mlp_bias": True}, "mlp_bias=true"),
    "architecture": ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model_type 'qwen2'"),
    "head": ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    "sliding_window": ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 16},
                       "sliding_window 16 < max_position_embeddings 32"),
    # MistralConfig's default window (4096) is shorter than Mistral's default context (131072).
    "mistral defaults": ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "max_position_embeddings": None},
                         "sliding_window 4096 < max_position_embeddings 131072"),
    "partial rotary": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    "incomplete llama3": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor, high_freq_factor"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_config_from_hf_unsupported_is_one_line_value_error(case):
    change, needle = UNSUPPORTED[case]
    hf_config = {k: v for k, v in (TRANSFORMERS4_LLAMA31 | change).items() if v is not None}
    with pytest.raises(ValueError) as error:
        config_from_hf(hf_config)
    assert needle in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_config_to_hf_builds_a_matching_llama_config():
    config = LLaMAConfig.from_name("tiny-gqa", padded_vocab_size=256, norm_eps=1e-6, rope_base=5e5)
    hf_config = transformers.LlamaConfig(**config_to_hf(config))
    assert (hf_config.hidden_size, hf_config.num_attention_heads, hf_config.num_key_value_heads) == (32, 4, 2)
    assert (hf_config.intermediate_size, hf_config.vocab_size, hf_config.max_position_embeddings) == (
        config.intermediate_size, 256, 128,
    )
    assert hf_config.rms_norm_eps == 1e-6 and not hf_config.tie_word_embeddings
    back = config_from_hf(config_to_hf(config))
    for field in ("block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "n_query_groups",
                  "intermediate_size", "norm_eps", "rope_base", "tie_embeddings"):
        assert getattr(back, field) == getattr(config, field), field
    # head_size and rope_scaling too, in both of the layouts config_to_hf writes at once.
    config = LLaMAConfig.from_name("Llama-3.2-1B", head_size=96, n_layer=2)
    hf_dict = config_to_hf(config)
    assert hf_dict["rope_scaling"]["rope_type"] == hf_dict["rope_parameters"]["rope_type"] == "llama3"
    transformers4 = {k: v for k, v in hf_dict.items() if k != "rope_parameters"}
    transformers5 = {k: v for k, v in hf_dict.items() if k not in ("rope_scaling", "rope_theta")}
    for hf_config in (hf_dict, transformers4, transformers5):
        back = config_from_hf(hf_config)
        assert (back.head_size, back.rope_base, back.rope_scaling) == (96, 500000.0, config.rope_scaling)
    assert transformers.LlamaConfig(**hf_dict).rope_parameters == {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


@pytest.mark.parametrize("overrides", [GQA, TIED])
def test_shape_tables_match_transformers_and_our_model(overrides):
    hf = random_hf_llama(**overrides)
    config = config_from_hf(hf.config.to_dict())
    expected_hf = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if config.tie_embeddings:
        del expected_hf["lm_head.weight"]
    assert hf_shapes(config) == expected_hf
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in LLaMA(config).state_dict().items()}
    if config.tie_embeddings:
        del ours["lm_head.weight"]
    assert lit_shapes(config) == ours
    # The in-memory functions agree with each other (the PEFT tests use lit_to_hf_state_dict).
    hf_sd = {k: v for k, v in hf.state_dict().items() if k in expected_hf}
    lit_sd = dict(hf_to_lit_state_dict(hf_sd.__getitem__, config))
    assert all(torch.equal(lit_to_hf_state_dict(lit_sd, config)[k], v) for k, v in hf_sd.items())


# ------------------------------------------------------------------------------------------- CLI
def run_script(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{script}.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def cli_error(main, args: list[str], capsys) -> str:
    """Run `main` through lit_llama.cli.run in-process (the command line's code path, without the
    seconds a subprocess costs) and return its one error line."""
    with pytest.raises(SystemExit) as exit_info:
        cli_run(main, args=args)
    assert exit_info.value.code != 0
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.mark.parametrize("script", ["convert_hf_checkpoint", "convert_lit_checkpoint", "download"])
def test_help(script):
    proc = run_script(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--checkpoint_dir" in proc.stdout


def make_bad_hf_dir(tmp_path: Path, problem: str) -> Path:
    path = tmp_path / "hf"
    path.mkdir()
    if problem == "no config.json":
        return path
    hf = random_hf_llama(**GQA)
    if problem == "no weights":
        hf.config.save_pretrained(path)
    elif problem == "not llama":
        hf.save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config | {"model_type": "qwen2"}))
    elif problem == "rope scaling":
        hf.save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}
        (path / "config.json").write_text(json.dumps(config))
    elif problem == "sliding window":
        hf.save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        config |= {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 8}
        (path / "config.json").write_text(json.dumps(config))
    elif problem == "missing tensor":
        hf.save_pretrained(path)
        tensors = load_file(path / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


BAD_INPUTS = {
    "no config.json": "no config.json",
    "no weights": "no *.safetensors or pytorch_model*.bin",
    "not llama": "model_type 'qwen2'",
    "rope scaling": "RoPE scaling 'yarn' is not supported",
    "sliding window": "sliding_window 8 < max_position_embeddings 32",
    "missing tensor": "model.layers.1.mlp.up_proj.weight",
}


def test_convert_hf_missing_dir_is_one_error_line(tmp_path):
    proc = run_script("convert_hf_checkpoint", "--checkpoint_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "lit"))
    assert_one_line_error(proc, "does not exist", "download.py")


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_convert_hf_bad_input_is_one_error_line(problem, tmp_path, capsys):
    hf_dir = make_bad_hf_dir(tmp_path, problem)
    main = load_script("convert_hf_checkpoint").main
    assert BAD_INPUTS[problem] in cli_error(main, ["--checkpoint_dir", str(hf_dir), "--output_dir", str(tmp_path / "lit")], capsys)
    assert not (tmp_path / "lit" / "lit_model.safetensors").exists()


def test_convert_lit_bad_input_is_one_error_line(tmp_path, capsys):
    main = load_script("convert_lit_checkpoint").main
    assert "does not exist" in cli_error(main, ["--checkpoint_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "hf")], capsys)
    (tmp_path / "empty").mkdir()
    assert "lit_config.json" in cli_error(main, ["--checkpoint_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "hf")], capsys)


def test_download_without_huggingface_hub_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    error = cli_error(load_script("download").main, ["--repo_id", "org/name", "--checkpoint_dir", str(tmp_path)], capsys)
    assert "huggingface_hub is not installed" in error and "pip install" in error


def test_download_offline_is_one_error_line(tmp_path):
    pytest.importorskip("huggingface_hub")
    proc = run_script("download", "--repo_id", "org/name", "--checkpoint_dir", str(tmp_path), env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "could not download org/name", "network")


def test_download_without_network_says_so_once(tmp_path):
    """No network: one line at once, not the Hub client's half-minute of retries printed one by one
    (a closed local port stands in for an unreachable Hub)."""
    pytest.importorskip("huggingface_hub")
    proc = run_script("download", "--repo_id", "org/name", "--checkpoint_dir", str(tmp_path),
                      env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_one_line_error(proc, "could not download org/name", "cannot be reached")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # said once, nothing before it
    assert not (tmp_path / "org").exists()


def test_download_bad_repo_id_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="ORG/NAME"):
        load_script("download").main(repo_id="just-a-name", checkpoint_dir=tmp_path)


def test_converted_config_is_written(tmp_path):
    hf = random_hf_llama(**TIED)
    hf.save_pretrained(tmp_path / "hf")
    load_script("convert_hf_checkpoint").main(checkpoint_dir=tmp_path / "hf", output_dir=tmp_path / "lit")
    config = load_config(tmp_path / "lit")
    assert config.tie_embeddings and config.n_query_groups == 1 and config.padded_vocab_size == BASE["vocab_size"]
