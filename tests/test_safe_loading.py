"""Every file the repo reads is read safely: a planted pickle that would run code is refused with a
clear error, and its code never runs.

The plant is a real torch.save file whose unpickling calls `exec`; the test first proves it is
armed (plain `torch.load(weights_only=False)` in a subprocess runs it and creates the marker file),
then feeds it to each reader: the library functions and the command line scripts."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_llama.checkpoint import CheckpointError, load_weights, save_checkpoint
from lit_llama.model import LLaMA, LLaMAConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER = DATA / "tok512.model"


class Payload:
    """Unpickling this calls exec(code): what a malicious checkpoint does."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def plant(path: Path, marker: Path, wrap=lambda evil: {"weight": evil}) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(Payload(f"open({str(marker)!r}, 'w').write('code ran')")), path)
    return path


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


def test_the_planted_pickle_is_armed(tmp_path, marker):
    """Without weights_only the file runs its code: the refusals below are not vacuous."""
    path = plant(tmp_path / "evil.pth", marker)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"], check=True)
    assert marker.read_text() == "code ran"


# ------------------------------------------------------------------------ library readers
def test_load_weights_refuses_a_pickle_with_code(tmp_path, marker):
    path = plant(tmp_path / "lit_model.pth", marker)
    with pytest.raises(CheckpointError, match=r"cannot read weights from .*lit_model\.pth") as refused:
        load_weights(path)
    assert not marker.exists()
    # Said plainly, without torch's advice to retry with weights_only=False.
    assert "loading it could run code" in str(refused.value) and "weights_only=False" not in str(refused.value)


def test_load_adapter_refuses_a_pickle_with_code(tmp_path, marker):
    from lit_llama.adapter import load_adapter

    path = plant(tmp_path / "lit_model.lora.pth", marker, wrap=lambda evil: {"lora": {"x.lora_A": evil}, "meta": {}})
    with pytest.raises(ValueError, match=r"cannot read adapter") as refused:
        load_adapter(path)
    assert not marker.exists()
    assert "loading it could run code" in str(refused.value) and "weights_only=False" not in str(refused.value)


def test_llama2c_checkpoint_loader_refuses_a_pickle_with_code(tmp_path, marker):
    from lit_llama.convert_llama2c import load_llama2c

    path = plant(tmp_path / "ckpt.pt", marker, wrap=lambda evil: {"model": evil, "model_args": {}})
    with pytest.raises(ValueError, match=r"cannot load .*ckpt\.pt safely"):
        load_llama2c(path)
    assert not marker.exists()


def test_pickled_datasets_from_old_lit_llama_are_never_opened(tmp_path, marker):
    from lit_llama.data import load_splits

    for split in ("train", "test"):
        plant(tmp_path / f"{split}.pt", marker, wrap=lambda evil: [evil])
    with pytest.raises(FileNotFoundError, match=r"pickles from an older lit-llama and are not loaded"):
        load_splits(tmp_path)
    assert not marker.exists()


def test_a_training_state_that_is_a_pickle_is_refused(tmp_path, marker):
    """Even with a manifest whose size and hash match the planted file (an attacker can compute both)."""
    from lit_llama import resume
    from lit_llama.resume import ResumeError, load_train_state, verify_state

    state_dir = tmp_path / "train_state"
    tensors = plant(state_dir / "state-000002.safetensors", marker)
    body = {"format": resume.FORMAT, "step": 2, "counters": {}, "optimizer": {"param_groups": [], "state": {}},
            "rng": {}, "scalars": [], "tensors": {"file": tensors.name, "bytes": tensors.stat().st_size,
                                                   "sha256": hashlib.sha256(tensors.read_bytes()).hexdigest()}}
    manifest = state_dir / "state-000002.json"
    manifest.write_text(json.dumps({**body, "body_sha256": resume._body_hash(body)}))
    doc = verify_state(manifest)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ResumeError, match=r"cannot read .*state-000002\.safetensors as safetensors"):
        load_train_state(manifest, doc, model, torch.optim.AdamW(model.parameters()))
    assert not marker.exists()


# ------------------------------------------------------------------------ command line scripts
def tiny_checkpoint(directory: Path) -> Path:
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=512))
    save_checkpoint(model, directory, tokenizer_path=TOKENIZER if TOKENIZER.is_file() else None)
    return directory


def evil_lit_checkpoint(tmp_path: Path, marker: Path) -> Path:
    d = tiny_checkpoint(tmp_path / "evil_ckpt")
    (d / "lit_model.safetensors").unlink()
    plant(d / "lit_model.pth", marker)
    return d


def evil_hf_checkpoint(tmp_path: Path, marker: Path) -> Path:
    from lit_llama.convert_hf import config_to_hf

    d = tmp_path / "evil_hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_to_hf(LLaMAConfig.from_name("tiny", vocab_size=512))))
    plant(d / "pytorch_model.bin", marker)
    return d


def evil_meta_checkpoint(tmp_path: Path, marker: Path) -> Path:
    d = tmp_path / "evil_meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5, "vocab_size": 512}))
    plant(d / "consolidated.00.pth", marker)
    return d


CASES = {
    "generate/base.py weights": lambda t, m: ["generate/base.py", "--checkpoint_dir", evil_lit_checkpoint(t, m),
                                             "--accelerator", "cpu", "--max_new_tokens", "2"],
    "generate/lora.py adapter": lambda t, m: ["generate/lora.py", "--checkpoint_dir", tiny_checkpoint(t / "base"),
                                             "--lora_path", plant(t / "a.lora.pth", m, lambda e: {"lora": {"x.lora_A": e}, "meta": {}}),
                                             "--accelerator", "cpu"],
    "scripts/merge_lora.py adapter": lambda t, m: ["scripts/merge_lora.py", "--checkpoint_dir", tiny_checkpoint(t / "base"),
                                                  "--lora_path", plant(t / "a.lora.pth", m, lambda e: {"lora": {"x.lora_A": e}, "meta": {}}),
                                                  "--output_dir", t / "merged"],
    "convert_llama2c_checkpoint.py .pt": lambda t, m: ["scripts/convert_llama2c_checkpoint.py", "--checkpoint_path",
                                                       plant(t / "ckpt.pt", m, lambda e: {"model": e, "model_args": {}}),
                                                       "--output_dir", t / "out"],
    "convert_checkpoint.py consolidated.00.pth": lambda t, m: ["scripts/convert_checkpoint.py", "--checkpoint_dir",
                                                               evil_meta_checkpoint(t, m), "--output_dir", t / "out"],
    "convert_lit_checkpoint.py lit_model.pth": lambda t, m: ["scripts/convert_lit_checkpoint.py", "--checkpoint_dir",
                                                             evil_lit_checkpoint(t, m), "--output_dir", t / "out"],
    "convert_hf_checkpoint.py pytorch_model.bin": lambda t, m: ["scripts/convert_hf_checkpoint.py", "--checkpoint_dir",
                                                                evil_hf_checkpoint(t, m), "--output_dir", t / "out"],
}
# Scripts that refuse the pickle (nothing runs) but let the UnpicklingError through as a traceback.


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="needs ../shared/data/tok512.model")
@pytest.mark.parametrize(
    "case", CASES
)
def test_cli_refuses_a_pickle_with_code_in_one_line(tmp_path, marker, case):
    args = [str(a) for a in CASES[case](tmp_path, marker)]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "the planted code ran"
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), proc.stderr[-1500:]
