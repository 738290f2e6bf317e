"""Checksums of big checkpoint files (#18): save_checkpoint records the weights file's sha256 in
checksums.sha256, and verify_checkpoint (scripts/verify_checkpoint.py) detects a flipped data byte and
names a tensor holding NaN. The recorded sum is checked against hashlib over the file's bytes and, where
the tool exists, against coreutils' `sha256sum -c`: references independent of the code under test."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lit_llama import cli
from lit_llama.checkpoint import (
    CHECKSUMS_NAME,
    CheckpointError,
    save_checkpoint,
    save_config,
    save_weights,
    verify_checkpoint,
)
from lit_llama.model import LLaMA, LLaMAConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = LLaMAConfig.from_name("tiny")


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(LLaMA(CONFIG), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def data_start(path: Path) -> int:
    """Where a safetensors file's tensor bytes begin (after the u64 header length and the JSON header)."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def run_script(args: list[str]) -> tuple[int, str]:
    spec = importlib.util.spec_from_file_location("_verify_checkpoint", ROOT / "scripts" / "verify_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            cli.run(module.main, args=args, positional=True)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def test_recorded_checksum_is_the_files_sha256(checkpoint):
    weights = checkpoint / "lit_model.safetensors"
    digest, name = (checkpoint / CHECKSUMS_NAME).read_text().split()
    assert (digest, name) == (hashlib.sha256(weights.read_bytes()).hexdigest(), weights.name)
    if shutil.which("sha256sum"):  # the file is in the format coreutils checks
        assert subprocess.run(["sha256sum", "-c", CHECKSUMS_NAME], cwd=checkpoint, capture_output=True).returncode == 0
    result = verify_checkpoint(checkpoint)
    with safe_open(str(weights), "pt") as f:
        assert result["checksum"] == "matches" and result["tensors"] == len(f.keys())


def test_a_flipped_data_byte_fails_the_checksum(checkpoint):
    weights = checkpoint / "lit_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[data_start(weights) + 1001] ^= 0x04  # a mantissa bit of one weight: the file still parses, the value is finite
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        verify_checkpoint(checkpoint)
    code, err = run_script([str(checkpoint)])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and "fails its checksum" in err


def test_a_nan_is_reported_with_the_tensor_name(tmp_path):
    model = LLaMA(CONFIG)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[3, 5] = float("nan")
    save_checkpoint(model, tmp_path / "nan")  # its checksum matches: the damage is in what was saved
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN or inf\) in transformer\.h\.1\.mlp\.c_proj\.weight"):
        verify_checkpoint(tmp_path / "nan")
    # A converted checkpoint has no checksums file: the finiteness check still runs (and a .pth too).
    sd = {k: v for k, v in LLaMA(CONFIG).state_dict().items() if k != "lm_head.weight"}
    sd["transformer.ln_f.weight"] = torch.full_like(sd["transformer.ln_f.weight"], float("inf"))
    save_weights(sd, tmp_path / "pth" / "lit_model.pth")
    save_config(CONFIG, tmp_path / "pth")
    with pytest.raises(CheckpointError, match=r"in transformer\.ln_f\.weight"):
        verify_checkpoint(tmp_path / "pth")


def test_the_script_says_ok_for_an_intact_checkpoint(checkpoint):
    code, err = run_script([str(checkpoint)])
    assert code == 0 and "checksum matches" in err, err


def test_large_finite_weights_whose_sum_overflows_pass(tmp_path):
    model = LLaMA(CONFIG)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(3e38)  # finite, but 32 of them sum past float32's 3.4e38
    assert torch.isinf(model.transformer.ln_f.weight.sum()) and torch.isfinite(model.transformer.ln_f.weight).all()
    save_checkpoint(model, tmp_path / "big")
    assert verify_checkpoint(tmp_path / "big")["checksum"] == "matches"
