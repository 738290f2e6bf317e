"""Generated damage to every file reader: truncations, flipped bytes, empty files and random JSON in place of
a config, from a fixed seed. Each reader must either read the file or raise one of the errors the scripts
print as one `error:` line (lit_llama.cli.USER_ERRORS), with a message; never another exception type,
which the scripts would show as a traceback. Bounded: 25 cases per reader, a few seconds in all."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import pytest
import torch

from lit_llama.adapter import load_adapter, save_adapter
from lit_llama.checkpoint import find_weights, load_config, load_weights, save_checkpoint
from lit_llama.cli import USER_ERRORS
from lit_llama.data import InstructionDataset, save_dataset
from lit_llama.lora import LoRAConfig, build_lora_model
from lit_llama.model import LLaMA, LLaMAConfig

CASES = 25
CONFIG = LLaMAConfig.from_name("tiny")


def damaged(original: bytes, rng: random.Random) -> bytes:
    """One of: cut at a random byte, a few random bytes flipped, empty, or the bytes reversed in a span."""
    kind = rng.choice(["truncate", "flip", "empty", "reverse"])
    if kind == "empty" or not original:
        return b""
    if kind == "truncate":
        return original[: rng.randrange(len(original))]
    data = bytearray(original)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(2, 64))
    data[a:b] = data[a:b][::-1]
    return bytes(data)


def random_json(rng: random.Random) -> str:
    """A JSON document of the wrong shape or with wrong values for a config."""
    values = [None, -1, 0, 1.5, float("inf"), "x", [], {}, True, 10**12]
    good = {k: v for k, v in json.loads(json.dumps(CONFIG.__dict__)).items()}
    choice = rng.choice(["list", "string", "wrong value", "unknown key", "missing key"])
    if choice == "list":
        return "[1, 2, 3]"
    if choice == "string":
        return '"a config"'
    if choice == "wrong value":
        good[rng.choice(sorted(good))] = rng.choice(values)
    elif choice == "unknown key":
        good["no_such_field"] = 1
    else:
        good.pop(rng.choice(sorted(good)))
    return json.dumps(good, allow_nan=True)


def assert_reads_or_refuses(read: Callable[[], object], what: str) -> bool:
    """True when the reader refused the file (in one of the one-line error types)."""
    try:
        read()
    except USER_ERRORS as e:
        assert str(e).strip(), f"{what}: {type(e).__name__} without a message"
        return True
    return False  # read fine; any other exception type fails the test with its traceback: that is the bug


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    t = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    save_checkpoint(LLaMA(CONFIG), t / "ckpt")
    lora = LoRAConfig(r=2)
    adapter = save_adapter(build_lora_model(CONFIG, lora), t / "adapter.safetensors", lora, prompt_style="alpaca")
    samples = [(torch.randint(0, 256, (9,)), torch.randint(0, 256, (9,))) for _ in range(3)]
    dataset = t / "train.safetensors"
    save_dataset(dataset, samples, {"prompt_style": "alpaca"})
    return {"weights": find_weights(t / "ckpt"), "adapter": adapter, "dataset": dataset, "ckpt": t / "ckpt"}


@pytest.mark.parametrize("reader", ["weights", "adapter", "dataset"])
def test_damaged_files_are_read_or_refused_in_one_line(files, tmp_path, reader):
    rng = random.Random(f"fuzz-{reader}")
    original = files[reader].read_bytes()
    read = {"weights": load_weights, "adapter": load_adapter, "dataset": InstructionDataset}[reader]
    refused = 0
    for i in range(CASES):
        path = tmp_path / f"{i}{files[reader].suffix}"
        path.write_bytes(damaged(original, rng))
        refused += assert_reads_or_refuses(lambda: read(path), f"{reader} case {i}")
    assert refused >= CASES // 3, f"only {refused} of {CASES} damaged {reader} files were refused"  # the damage reaches the reader


def test_random_configs_are_read_or_refused_in_one_line(files, tmp_path):
    rng = random.Random("fuzz-config")
    refused = 0
    for i in range(CASES):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "lit_config.json").write_text(random_json(rng))
        refused += assert_reads_or_refuses(lambda: load_config(folder), f"config case {i}")
    # Some of them are valid (a missing key takes its default, "source" is free text): only some are refused.
    assert refused >= CASES // 5, f"only {refused} of {CASES} broken configs were refused"
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "lit_config.json").write_bytes(b"\xff\xfe\x00not utf-8")
    assert assert_reads_or_refuses(lambda: load_config(tmp_path / "binary"), "a non-UTF-8 config")
