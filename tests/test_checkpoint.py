import gc
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lit_llama.checkpoint as ckpt
from lit_llama.checkpoint import (
    CheckpointError,
    atomic_path,
    load_model,
    load_weights,
    save_checkpoint,
    save_weights,
    write_safetensors_streaming,
)
from lit_llama.model import LLaMA, LLaMAConfig


def random_model(name: str) -> LLaMA:
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name(name))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def test_streaming_safetensors_writer_is_read_back_by_the_safetensors_library(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "half": torch.randn(2, 2).half(),
    }
    path = tmp_path / "x.safetensors"
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    write_safetensors_streaming(((k, lambda v=v: v) for k, v in tensors.items()), specs, path, {"note": "hi"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"note": "hi"}


def test_streaming_writer_rejects_a_tensor_that_breaks_its_promise(tmp_path):
    specs = {"a": (torch.float32, (2,))}
    with pytest.raises(ValueError, match="promised"):
        write_safetensors_streaming(iter([("a", lambda: torch.zeros(3))]), specs, tmp_path / "x.safetensors")


def test_streaming_writer_rejects_tensors_out_of_header_order(tmp_path):
    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))}
    tensors = iter([("b", lambda: torch.zeros(2)), ("a", lambda: torch.ones(2))])
    with pytest.raises(ValueError, match="out of order"):
        write_safetensors_streaming(tensors, specs, tmp_path / "x.safetensors")


def test_atomic_path_leaves_nothing_behind_on_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "weights.pth"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash during save")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["weights.pth"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["weights.pth"]


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-tied"])
@pytest.mark.parametrize("weights_name", ["lit_model.safetensors", "lit_model.pth"])
@pytest.mark.parametrize("mmap", [True, False])
def test_checkpoint_round_trip_is_bit_exact(tmp_path, name, weights_name, mmap):
    model = random_model(name)
    save_checkpoint(model, tmp_path, weights_name=weights_name)
    loaded = load_model(tmp_path, mmap=mmap)
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert "lm_head.weight" not in load_weights(tmp_path / weights_name)
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("weights_name", ["lit_model.safetensors", "lit_model.pth"])
def test_load_without_mmap_leaves_the_file_unmapped(tmp_path, weights_name):
    """mmap=False (what the packing generate path uses) holds the tensors in memory of their own:
    the weights file is not mapped into the process once loading returns; mmap=True keeps it mapped."""
    save_checkpoint(random_model("tiny"), tmp_path, weights_name=weights_name)
    path = str((tmp_path / weights_name).resolve())

    def mapped() -> bool:
        return path in Path("/proc/self/maps").read_text()

    lazy = load_model(tmp_path, mmap=True)
    assert mapped()
    del lazy
    gc.collect()  # the lazy model's tensors, and with them the map, are gone
    eager = load_model(tmp_path, mmap=False)
    assert not mapped()
    assert eager.lm_head.weight.abs().sum() > 0


def test_load_model_casts_to_the_requested_dtype(tmp_path):
    save_checkpoint(random_model("tiny"), tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = random_model("tiny")
    sd = model.state_dict()
    sd.pop("transformer.h.1.mlp.c_fc2.weight")
    sd["transformer.h.9.attn.bogus"] = torch.zeros(1)
    save_checkpoint(model, tmp_path)
    save_weights(sd, tmp_path / "lit_model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): transformer.h.1.mlp.c_fc2.weight.*unexpected 1 key\(s\): transformer.h.9.attn.bogus"):
        load_model(tmp_path)


def test_a_checkpoint_for_another_config_is_a_shape_error(tmp_path):
    save_checkpoint(random_model("tiny"), tmp_path)
    (tmp_path / "lit_config.json").write_text((tmp_path / "lit_config.json").read_text().replace('"n_embd": 32', '"n_embd": 64'))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(tmp_path)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_runs_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "lit_model.pth"
    with open(path, "wb") as f:
        pickle.dump({"transformer.wte.weight": _Exploit(marker)}, f)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_weights(path)
    assert not marker.exists()


def test_truncated_weights_are_a_clear_error(tmp_path):
    save_checkpoint(random_model("tiny"), tmp_path)
    path = tmp_path / "lit_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_model(tmp_path)


def test_missing_directory_says_how_to_fix_it(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_a_checkpoint_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure after the weights (the disk fills while the config or tokenizer is written) leaves no
    folder under the final name and no temporary one; a folder with a user's other files is never replaced."""
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_config", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(random_model("tiny"), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_checkpoint(random_model("tiny"), tmp_path / "ckpt")
    save_checkpoint(random_model("tiny"), tmp_path / "ckpt")  # a re-save replaces its own checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~umask  # a normal folder, not mkdtemp's 0700
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files"):
        save_checkpoint(random_model("tiny"), tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
