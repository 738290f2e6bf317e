"""Generated bad command lines and damaged files for the scripts (#18), from fixed seeds.

Flags: every numeric flag of finetune/lora.py, generate/base.py, pretrain/base.py, prepare_json.py and
prepare_text.py gets values drawn from what its range excludes: random garbage (letters, YAML
punctuation), NaN and infinities, zero or negatives where the range is positive, fractions for
integers, values above an upper bound. Each run must end with exit status 2 and exactly one `error:`
line that names the flag, no traceback, and no file under a final name in its output folder.

Files: a GGUF file, a PEFT adapter folder and pretraining token files get random byte flips and
truncations. Each script (or reader) must then either succeed or refuse in one line, writing nothing
under a final name; some of the damage must be refused.

The scripts' mains run in this process through lit_llama.cli.run (the command line's code path):
the whole module takes about 10-20 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import random
import re
import shutil
import string
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

from lit_llama import cli
from lit_llama.adapter import save_adapter
from lit_llama.checkpoint import save_checkpoint
from lit_llama.data import prepare_instruction_data
from lit_llama.lora import LoRAConfig, build_lora_model
from lit_llama.model import LLaMA, LLaMAConfig, init_weights
from lit_llama.pretrain_data import PretrainDataset

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TOKENIZER = DATA / "tok512.model"
ALPACA = DATA / "alpaca_data_first400.json"
CASES_PER_FLAG = 3
_MODULES: dict[str, ModuleType] = {}


def run_main(path: str, args: list[str]) -> SimpleNamespace:
    """`python PATH ARGS...` in this process: the exit code and stderr."""
    if path not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"_fuzz_{Path(path).stem}", ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # jsonargparse resolves the string annotations through sys.modules
        spec.loader.exec_module(module)
        _MODULES[path] = module
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.run(_MODULES[path].main, args=args)
        except SystemExit as e:
            code = e.code
    return SimpleNamespace(code=code, stderr=err.getvalue())


def final_files(folder: Path) -> list[Path]:
    """Files under their final names, and temporary files left behind; not a run's (empty) .run.lock."""
    if not folder.exists():
        return []
    return [p for p in folder.rglob("*") if p.is_file() and p.name != ".run.lock"]


def assert_one_error_line(proc: SimpleNamespace, mention: str | None = None) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.code == 2, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and lines, proc.stderr[-1500:]
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, proc.stderr[-1500:]
    if mention:
        assert re.search(mention, lines[-1]), f"{mention!r} not in {lines[-1]!r}"
    return lines[-1]


# ------------------------------------------------------------------------------------------- values
def garbage(rng: random.Random) -> str:
    """A short string that is no number and no YAML null (# starts a comment, ~ is null: left out)."""
    alphabet = string.ascii_letters + "!@$%^&*()[]{}<>,;:|=+?/-_." + "é中"
    while True:
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
        try:
            float(s)
        except ValueError:
            if s.lower() not in {"null", "none", "true", "false", "yes", "no", "on", "off", "y", "n", "nan", "inf"}:
                return s


def big() -> str:
    return "1e999"  # a float that overflows to inf


# What each kind of range excludes: generators of invalid values.
INVALID: dict[str, list[Callable[[random.Random], str]]] = {
    "positive int": [garbage, lambda r: "0", lambda r: str(-r.randint(1, 10**6)), lambda r: f"{r.randint(1, 99)}.5",
                     lambda r: "nan", lambda r: "inf", lambda r: str(-(10 ** r.randint(13, 30)))],
    "non-negative int": [garbage, lambda r: str(-r.randint(1, 10**6)), lambda r: f"{r.randint(0, 9)}.25", lambda r: "nan"],
    "positive float": [garbage, lambda r: "0", lambda r: f"-{r.random():.4f}", lambda r: "nan", lambda r: "inf",
                       lambda r: "-inf", lambda r: big()],
    "non-negative float": [garbage, lambda r: f"-{r.uniform(1e-6, 10):.6f}", lambda r: "nan", lambda r: "inf"],
    "[0, 1)": [garbage, lambda r: f"-{r.uniform(1e-3, 1):.4f}", lambda r: "1", lambda r: f"{r.uniform(1.01, 100):.3f}",
               lambda r: "nan"],
    "(0, 1]": [garbage, lambda r: "0", lambda r: f"-{r.uniform(1e-3, 1):.4f}", lambda r: f"{r.uniform(1.01, 100):.3f}",
               lambda r: "nan"],
    "(0, 1)": [garbage, lambda r: "0", lambda r: "1", lambda r: f"-{r.uniform(1e-3, 1):.4f}", lambda r: "nan"],
    "count or fraction": [garbage, lambda r: str(-r.randint(1, 1000)), lambda r: "nan", lambda r: f"-{r.random():.3f}"],
    "at least 2": [garbage, lambda r: str(r.randint(-10, 1)), lambda r: "nan", lambda r: "2.5"],
}

TRAIN_FLAGS = {
    "--train.learning_rate": "positive float", "--train.batch_size": "positive int",
    "--train.micro_batch_size": "positive int", "--train.epochs": "positive int", "--train.max_iters": "positive int",
    "--train.warmup_steps": "non-negative int", "--train.weight_decay": "non-negative float",
    "--train.grad_clip": "positive float", "--train.eval_interval": "positive int", "--train.eval_iters": "positive int",
    "--train.save_interval": "positive int", "--train.log_interval": "positive int",
    "--train.keep_last": "non-negative int", "--devices": "positive int",
}
# script -> {flag: the kind of its range}
FLAGS: dict[str, dict[str, str]] = {
    "finetune/lora.py": {**TRAIN_FLAGS, "--train.min_lr": "non-negative float", "--lora.r": "positive int",
                         "--lora.alpha": "positive float", "--lora.dropout": "[0, 1)"},
    "generate/base.py": {"--max_new_tokens": "positive int", "--num_samples": "positive int",
                         "--temperature": "non-negative float", "--top_k": "positive int", "--top_p": "(0, 1]"},
    "pretrain/base.py": {"--n_layer": "positive int", "--n_head": "positive int", "--n_embd": "positive int",
                         "--block_size": "positive int", "--n_query_groups": "positive int",
                         "--intermediate_size": "positive int", "--devices": "positive int",
                         "--train.learning_rate": "positive float", "--train.batch_size": "positive int"},
    "scripts/prepare_json.py": {"--test_size": "count or fraction", "--max_seq_length": "at least 2"},
    "scripts/prepare_text.py": {"--vocab_size": "positive int", "--val_fraction": "(0, 1)"},
}


def mention(flag: str) -> str:
    """How an error line names the flag: --train.min_lr, "train.min_lr" (jsonargparse), or "lora r" (LoRAConfig)."""
    name = flag.removeprefix("--")
    last = name.rsplit(".", 1)[-1]
    return rf"{re.escape(name)}|{re.escape(name.replace('.', ' '))}|\b{re.escape(last)}\b"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    if not (TOKENIZER.is_file() and ALPACA.is_file()):
        pytest.skip("needs ../shared/data (tok512.model, the Alpaca sample)")
    t = tmp_path_factory.mktemp("fuzz_cli")
    e = SimpleNamespace(tmp=t)
    torch.manual_seed(0)
    config = LLaMAConfig.from_name("tiny", vocab_size=512, block_size=64)
    model = LLaMA(config)
    init_weights(model)
    e.base = t / "base"
    save_checkpoint(model, e.base, tokenizer_path=TOKENIZER)
    records = json.loads(ALPACA.read_text())[:20]
    e.records = t / "records.json"
    e.records.write_text(json.dumps(records))
    e.data = t / "data"
    prepare_instruction_data(records, e.data, e.base, test_size=4, max_seq_length=64)
    e.text = t / "story.txt"
    e.text.write_text("\n\n".join(r["output"] for r in records))
    e.text_data = t / "text_data"
    assert run_main("scripts/prepare_text.py", ["--input_file", str(e.text), "--destination_path", str(e.text_data),
                                                "--tokenizer_path", str(TOKENIZER)]).code == 0
    lora = LoRAConfig(r=2, alpha=4)
    lora_model = build_lora_model(config, lora)
    for name, p in lora_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    e.adapter = save_adapter(lora_model, t / "a.lora.safetensors", lora)
    e.peft = t / "peft"
    assert run_main("scripts/convert_lora_to_peft.py", ["--lora_path", str(e.adapter), "--output_dir", str(e.peft)]).code == 0
    e.gguf = t / "tiny.f32.gguf"
    proc = run_main("scripts/convert_lit_to_gguf.py", ["--checkpoint_dir", str(e.base), "--output_path", str(e.gguf),
                                                       "--outtype", "f32"])
    assert proc.code == 0, proc.stderr[-1500:]
    return e


def command(script: str, flag: str, e: SimpleNamespace, out: Path) -> list[str]:
    """A command line of `script` that runs when no flag is broken (the flag under test is appended)."""
    if script == "finetune/lora.py":
        return ["--data_dir", str(e.data), "--checkpoint_dir", str(e.base), "--out_dir", str(out), "--accelerator", "cpu",
                "--train.max_iters", "1", "--train.batch_size", "2", "--train.micro_batch_size", "2"]
    if script == "generate/base.py":
        return ["--checkpoint_dir", str(e.base), "--accelerator", "cpu", "--max_new_tokens", "2"]
    if script == "pretrain/base.py":
        return ["--data_dir", str(e.text_data), "--out_dir", str(out), "--accelerator", "cpu", "--block_size", "16",
                "--train.max_iters", "1"]
    if script == "scripts/prepare_json.py":
        return ["--data_file", str(e.records), "--checkpoint_dir", str(e.base), "--destination_path", str(out)]
    # --vocab_size is the size of a tokenizer to train: it counts only without --tokenizer_path.
    tokenizer = [] if flag == "--vocab_size" else ["--tokenizer_path", str(TOKENIZER)]
    return ["--input_file", str(e.text), *tokenizer, "--destination_path", str(out)]


def flag_cases() -> list[tuple[str, str, int]]:
    return [(script, flag, i) for script, flags in FLAGS.items() for flag in flags for i in range(CASES_PER_FLAG)]


@pytest.mark.parametrize("script", list(FLAGS))
def test_out_of_range_and_garbage_flags_give_one_line(env, tmp_path, script):
    rng = random.Random(f"fuzz-cli-{script}")
    tried = []
    for flag, kind in FLAGS[script].items():
        for i in range(CASES_PER_FLAG):
            value = rng.choice(INVALID[kind])(rng)
            out = tmp_path / f"{flag.strip('-')}-{i}"
            argv = [*command(script, flag, env, out), f"{flag}={value}"]  # =: a value starting with - is not a flag
            proc = run_main(script, argv)
            try:
                assert_one_error_line(proc, mention(flag))
                assert final_files(out) == [], final_files(out)
            except AssertionError as e:
                raise AssertionError(f"{script} {flag}={value!r}: {e}") from None
            tried.append(value)
    assert len(tried) == CASES_PER_FLAG * len(FLAGS[script])


def damage(original: bytes, rng: random.Random) -> bytes:
    """Cut at a random byte, or 1-8 random bit flips."""
    if rng.random() < 0.5:
        return original[: rng.randrange(len(original))]
    data = bytearray(original)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def check_run(proc: SimpleNamespace, out: Path) -> bool:
    """True when refused (in one line, nothing written); a run that succeeded must have exit status 0."""
    if proc.code == 0:
        return False
    assert_one_error_line(proc)
    assert final_files(out) == [], final_files(out)
    return True


def test_damaged_gguf_files_convert_or_are_refused_in_one_line(env, tmp_path):
    rng = random.Random("fuzz-gguf")
    original = env.gguf.read_bytes()
    refused = 0
    for i in range(16):
        path = tmp_path / f"{i}.gguf"
        path.write_bytes(damage(original, rng))
        out = tmp_path / f"out{i}"
        refused += check_run(run_main("scripts/convert_gguf_checkpoint.py", ["--gguf_path", str(path), "--output_dir", str(out)]), out)
    assert refused >= 4, f"only {refused} of 16 damaged GGUF files were refused"


def test_damaged_peft_adapters_convert_or_are_refused_in_one_line(env, tmp_path):
    rng = random.Random("fuzz-peft")
    refused = 0
    for i in range(16):
        folder = tmp_path / f"peft{i}"
        shutil.copytree(env.peft, folder)
        name = "adapter_config.json" if i % 2 else "adapter_model.safetensors"
        (folder / name).write_bytes(damage((env.peft / name).read_bytes(), rng))
        out = tmp_path / f"out{i}"
        proc = run_main("scripts/convert_peft_to_lora.py", ["--peft_dir", str(folder), "--checkpoint_dir", str(env.base),
                                                            "--output_path", str(out / "x.lora.safetensors")])
        refused += check_run(proc, out)
    assert refused >= 6, f"only {refused} of 16 damaged PEFT adapters were refused"


def test_damaged_token_files_are_read_or_refused_in_one_line(env, tmp_path):
    rng = random.Random("fuzz-tokens")
    original = (env.text_data / "train.bin").read_bytes()
    refused = 0
    for i in range(16):
        folder = tmp_path / f"tokens{i}"
        shutil.copytree(env.text_data, folder)
        (folder / "train.bin").write_bytes(damage(original, rng))
        try:
            dataset = PretrainDataset.from_dir(folder, "train", 16, vocab_size=512)
        except cli.USER_ERRORS as e:
            assert str(e).strip() and "\n" not in str(e).strip(), e
            refused += 1
            continue
        ids = np.asarray(dataset.tokens)
        assert ids.max() < 512 and ids.min() >= 0  # what was read is usable: every id is a row of the embedding
    assert refused >= 4, f"only {refused} of 16 damaged token files were refused"
