"""lit_llama/adapter.py refuses damaged or lying adapter files before anything is built from them:
metadata that disagrees with the tensors (checked on the meta device), non-finite weights, and
bytes changed after saving (the stored checksum). Each case fails on an adapter reader that trusts
the file."""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lit_llama.adapter import load_adapter, save_adapter, tensors_sha256
from lit_llama.checkpoint import save_checkpoint
from lit_llama.lora import LoRAConfig, build_lora_model
from lit_llama.model import LLaMA, LLaMAConfig, init_weights

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "tok512.model"
CONFIG = LLaMAConfig.from_name("tiny", vocab_size=512)


def saved_adapter(path: Path, lora: LoRAConfig) -> Path:
    torch.manual_seed(0)
    model = build_lora_model(CONFIG, lora)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("lora_B"):
                p.normal_()
    return save_adapter(model, path, lora, prompt_style="alpaca")


def rewrite(path: Path, out: Path, tensors=None, **meta_changes: str) -> Path:
    """The same file with some metadata strings or tensors replaced, written as safetensors."""
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_file(tensors or load_file(path), out, metadata=meta)
    return out


def test_a_saved_adapter_loads(tmp_path):
    path = saved_adapter(tmp_path / "a.safetensors", LoRAConfig(r=4))
    state_dict, meta = load_adapter(path)
    assert meta.lora.r == 4 and set(state_dict) == set(load_file(path))


def lying_config(lora: LoRAConfig, **changes) -> str:
    fields = json.loads(json.dumps(lora.__dict__))
    fields.update(changes)
    return json.dumps(fields)


@pytest.mark.parametrize("claim", [dict(r=10_000_000), dict(resize_vocab=10**9)], ids=["rank-1e7", "vocab-1e9"])
def test_metadata_that_disagrees_with_the_tensors_is_refused_before_allocating(tmp_path, claim):
    lora = LoRAConfig(r=4)
    good = saved_adapter(tmp_path / "good.safetensors", lora)
    bad = rewrite(good, tmp_path / "bad.safetensors", lora_config=lying_config(lora, **claim))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="does not fit|claims resize_vocab"):
        load_adapter(bad)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200  # building the claimed model for real would take 3.8 GB (r) or 256 GB (vocab)


def test_an_adapter_with_nan_weights_is_refused(tmp_path):
    good = saved_adapter(tmp_path / "good.safetensors", LoRAConfig(r=4))
    tensors = load_file(good)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    # A checksum over the NaN tensors, as a run that diverged would have written it.
    bad = rewrite(good, tmp_path / "nan.safetensors", tensors, tensors_sha256=tensors_sha256(tensors))
    with pytest.raises(ValueError, match="non-finite"):
        load_adapter(bad)


def test_a_flipped_data_byte_is_detected_by_the_checksum(tmp_path):
    good = saved_adapter(tmp_path / "good.safetensors", LoRAConfig(r=4))
    raw = bytearray(good.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    raw[8 + header_len + 5] ^= 0x10  # a mantissa bit of the first tensor's second value: still finite
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    torch.testing.assert_close(load_file(bad)[sorted(load_file(good))[0]], load_file(good)[sorted(load_file(good))[0]],
                               atol=1e-2, rtol=1e-2)  # safetensors itself reads it without complaint
    with pytest.raises(ValueError, match="fails its checksum"):
        load_adapter(bad)


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="needs ../shared/data/tok512.model")
def test_generate_lora_refuses_a_lying_adapter_in_one_line(tmp_path):
    torch.manual_seed(0)
    base = LLaMA(CONFIG)
    init_weights(base)
    save_checkpoint(base, tmp_path / "base", tokenizer_path=TOKENIZER)
    lora = LoRAConfig(r=4)
    good = saved_adapter(tmp_path / "good.safetensors", lora)
    bad = rewrite(good, tmp_path / "bad.safetensors", lora_config=lying_config(lora, r=10_000_000))
    run = lambda adapter: subprocess.run(  # noqa: E731
        [sys.executable, "generate/lora.py", "--checkpoint_dir", str(tmp_path / "base"), "--lora_path", str(adapter),
         "--accelerator", "cpu", "--max_new_tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run(good).returncode == 0  # the same command with the honest file works
    proc = run(bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not fit" in errors[0], proc.stderr
