"""Broken files and output paths of the wrong kind, given to the converters, inspect_adapter.py, the data
scripts and pretraining (#18). Each case runs a script's `main` in this process through lit_llama.cli.run,
the command line's own code path (a new interpreter per case would cost seconds), and must end with
exit status 2 and exactly one `error:` line that names the problem, without a traceback, and with no
file added under a final name anywhere in the test's folders.

The cases are rows of the table in howto/troubleshooting.md; tests/test_bad_input.py has the others.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import tokenizers
import torch

from lit_llama import cli
from lit_llama.adapter import save_adapter
from lit_llama.checkpoint import save_checkpoint
from lit_llama.lora import LoRAConfig, build_lora_model
from lit_llama.model import LLaMA, LLaMAConfig, init_weights

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TOKENIZER = DATA / "tok512.model"
_MODULES: dict[str, ModuleType] = {}


def script(path: str) -> ModuleType:
    """A script as a module, loaded once (registered in sys.modules: jsonargparse resolves its annotations there)."""
    if path not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"_bad_files_{Path(path).stem}", ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _MODULES[path] = module
    return _MODULES[path]


POSITIONAL = {"scripts/inspect_adapter.py", "scripts/verify_checkpoint.py"}


def run_main(path: str, args: list[str]) -> SimpleNamespace:
    """`python PATH ARGS...`, in this process: exit code and stderr."""
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.run(script(path).main, args=args, positional=path in POSITIONAL)
        except SystemExit as e:
            code = e.code
    return SimpleNamespace(code=code, stderr=err.getvalue())


def files_under(*folders: Path) -> set[Path]:
    """Every file, temporary ones included; not a training run's .run.lock (held while it runs, empty)."""
    return {p for f in folders if f.exists() for p in f.rglob("*") if p.is_file() and p.name != ".run.lock"}


# ------------------------------------------------------------------------------- the files the cases use
def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def tiny_hf_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer.json with its tokenizer_config.json and generation_config.json."""
    folder.mkdir()
    words = ["<unk>", "<s>", "</s>", "name", "a", "color", "blue", "."]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    write_json(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return folder


def variant(e: SimpleNamespace, of: Path, name: str, file: str, content: bytes | object) -> Path:
    """A copy of folder `of` whose `file` holds `content` (bytes as they are, else as JSON)."""
    folder = e.tmp / name
    shutil.copytree(of, folder)
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (folder / file).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} not found")
    t = tmp_path_factory.mktemp("bad_files")
    e = SimpleNamespace(tmp=t)
    torch.manual_seed(0)
    config = LLaMAConfig.from_name("tiny", vocab_size=512, block_size=64)
    model = LLaMA(config)
    init_weights(model)
    e.base = t / "base"
    save_checkpoint(model, e.base, tokenizer_path=TOKENIZER)
    e.other_base = t / "other_base"  # another model size: the adapter does not belong to it
    save_checkpoint(LLaMA(LLaMAConfig.from_name("tiny-gqa", vocab_size=512, block_size=64)), e.other_base)
    lora = LoRAConfig(r=2, alpha=4)
    lora_model = build_lora_model(config, lora)
    for name, p in lora_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    e.adapter = save_adapter(lora_model, t / "a.lora.safetensors", lora)
    e.peft = t / "peft"
    assert run_main("scripts/convert_lora_to_peft.py", ["--lora_path", str(e.adapter), "--output_dir", str(e.peft)]).code == 0
    peft_config = json.loads((e.peft / "adapter_config.json").read_text())
    peft_bytes = (e.peft / "adapter_model.safetensors").read_bytes()

    # PEFT adapters
    e.peft_pickle = t / "peft_pickle"  # adapter_model.bin holding an object that is not a tensor
    shutil.copytree(e.peft, e.peft_pickle)
    (e.peft_pickle / "adapter_model.safetensors").unlink()
    torch.save({"w": torch.zeros(1), "obj": SimpleNamespace(a=1)}, e.peft_pickle / "adapter_model.bin")
    e.peft_bin_list = t / "peft_bin_list"  # a .bin of plain tensors, but a list, not a state dict
    shutil.copytree(e.peft_pickle, e.peft_bin_list)
    torch.save([torch.zeros(1)], e.peft_bin_list / "adapter_model.bin")
    e.peft_truncated = variant(e, e.peft, "peft_truncated", "adapter_model.safetensors", peft_bytes[: len(peft_bytes) // 2])
    e.peft_garbage = variant(e, e.peft, "peft_garbage", "adapter_model.safetensors", b"\x00garbage" * 16)
    nan = bytearray(peft_bytes)
    nan[-4:] = np.array([np.nan], dtype="<f4").tobytes()  # the last float of the last tensor
    e.peft_nan = variant(e, e.peft, "peft_nan", "adapter_model.safetensors", bytes(nan))
    e.peft_config_invalid = variant(e, e.peft, "peft_config_invalid", "adapter_config.json", b'{"r": 2,')
    e.peft_config_latin1 = variant(e, e.peft, "peft_config_latin1", "adapter_config.json", '{"r": "é"}'.encode("latin-1"))
    e.peft_config_list = variant(e, e.peft, "peft_config_list", "adapter_config.json", ["r", 2])
    e.peft_config_alpha_list = variant(e, e.peft, "peft_config_alpha_list", "adapter_config.json", {**peft_config, "lora_alpha": [4]})
    e.peft_config_targets_int = variant(e, e.peft, "peft_config_targets_int", "adapter_config.json",
                                        {**peft_config, "target_modules": 5})
    e.peft_config_r_string = variant(e, e.peft, "peft_config_r_string", "adapter_config.json", {**peft_config, "r": "two"})

    # checkpoint configs and tokenizer files
    cfg = json.loads((e.base / "lit_config.json").read_text())
    e.config_latin1 = variant(e, e.base, "config_latin1", "lit_config.json", b'{"n_embd": "\xe9"}')
    e.config_invalid = variant(e, e.base, "config_invalid", "lit_config.json", b'{"n_embd": 32,,}')
    e.config_wrong_type = variant(e, e.base, "config_wrong_type", "lit_config.json", {**cfg, "n_layer": "two"})
    e.config_list = variant(e, e.base, "config_list", "lit_config.json", [cfg])
    e.special_invalid = variant(e, e.base, "special_invalid", "special_tokens.json", b'["<|user|>", ')
    e.special_latin1 = variant(e, e.base, "special_latin1", "special_tokens.json", '["<|caf\u00e9|>"]'.encode("latin-1"))
    e.special_object = variant(e, e.base, "special_object", "special_tokens.json", {"<|user|>": 512})
    e.special_number = variant(e, e.base, "special_number", "special_tokens.json", ["<|user|>", 7])
    e.hf = tiny_hf_tokenizer(t / "hf_tokenizer")
    e.tokcfg_invalid = variant(e, e.hf, "tokcfg_invalid", "tokenizer_config.json", b'{"eos_token": ')
    e.tokcfg_latin1 = variant(e, e.hf, "tokcfg_latin1", "tokenizer_config.json", '{"eos_token": "é"}'.encode("latin-1"))
    e.tokcfg_list = variant(e, e.hf, "tokcfg_list", "tokenizer_config.json", ["</s>"])
    e.tokcfg_added_list = variant(e, e.hf, "tokcfg_added_list", "tokenizer_config.json",
                                  {"eos_token": "</s>", "added_tokens_decoder": ["<|user|>"]})
    e.tokcfg_added_key = variant(e, e.hf, "tokcfg_added_key", "tokenizer_config.json",
                                 {"eos_token": "</s>", "added_tokens_decoder": {"eight": {"content": "<|user|>"}}})
    e.gencfg_invalid = variant(e, e.hf, "gencfg_invalid", "generation_config.json", b"{eos_token_id: 2}")
    e.gencfg_latin1 = variant(e, e.hf, "gencfg_latin1", "generation_config.json", b'{"x": "\xff"}')
    e.gencfg_number = variant(e, e.hf, "gencfg_number", "generation_config.json", 2)
    e.records = write_json(t / "records.json", [{"instruction": "name a color .", "output": "blue ."}] * 4)

    # pretraining data: one id past the vocabulary, and a broken metadata file
    text = t / "story.txt"
    text.write_text("\n\n".join(f"Once upon a time there was a story number {i}, and it went on." for i in range(200)))
    e.text_data = t / "text_data"
    assert run_main("scripts/prepare_text.py", ["--input_file", str(text), "--destination_path", str(e.text_data),
                                                "--tokenizer_path", str(TOKENIZER)]).code == 0
    e.ids_outside = t / "ids_outside"
    shutil.copytree(e.text_data, e.ids_outside)
    for split in ("train", "val"):
        tokens = np.fromfile(e.ids_outside / f"{split}.bin", dtype="<u2")
        tokens[len(tokens) // 2] = 512 + 77  # the vocabulary has 512 ids
        tokens.tofile(e.ids_outside / f"{split}.bin")
    e.meta_invalid = variant(e, e.text_data, "meta_invalid", "prepare_text_meta.json", b'{"format": "lit_llama.tok')

    # paths of the wrong kind
    e.a_file = t / "a_file"
    e.a_file.write_text("not a folder")
    e.foreign = t / "foreign"  # a folder of the user's own files
    e.foreign.mkdir()
    (e.foreign / "notes.txt").write_text("mine")
    e.folder_named_file = t / "folder.safetensors"
    e.folder_named_file.mkdir()
    e.folder_named_gguf = t / "folder.gguf"
    e.folder_named_gguf.mkdir()
    e.weights_copy = t / "weights_copy.safetensors"  # a base model's weights, passed by mistake as an output
    shutil.copyfile(e.base / "lit_model.safetensors", e.weights_copy)
    e.hf_export = t / "hf_export"
    assert run_main("scripts/convert_lit_checkpoint.py", ["--checkpoint_dir", str(e.base), "--output_dir", str(e.hf_export)]).code == 0
    e.hf_config_latin1 = variant(e, e.hf_export, "hf_config_latin1", "config.json", b'{"model_type": "llama\xe9"}')
    e.hf_index_no_map = variant(e, e.hf_export, "hf_index_no_map", "model.safetensors.index.json", {"metadata": {}})
    e.meta = t / "meta"  # Meta's layout (params.json, consolidated.00.pth)
    assert run_main("scripts/slice_checkpoint.py", ["--checkpoint_dir", str(e.base), "--output_dir", str(e.meta),
                                                    "--shards", "1"]).code == 0
    e.meta_params_latin1 = variant(e, e.meta, "meta_params_latin1", "params.json", b'{"dim": "\xe9"}')
    return e


# ------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    script: str
    argv: Callable[[SimpleNamespace, Path], list[str]]  # (env, a fresh output path) -> flags
    expect: tuple[str, ...]  # each in the error line
    absent: tuple[str, ...] = ()  # none of them in it


def peft_to_lora(peft: str, checkpoint: str = "base") -> Case:
    return Case("scripts/convert_peft_to_lora.py",
                lambda e, o: ["--peft_dir", str(getattr(e, peft)), "--checkpoint_dir", str(getattr(e, checkpoint)),
                              "--output_path", str(o / "x.lora.safetensors")], ())


def with_expect(case: Case, *expect: str) -> Case:
    case.expect = expect
    return case


def prepare_json(checkpoint: str, *expect: str) -> Case:
    return Case("scripts/prepare_json.py", lambda e, o: ["--data_file", str(e.records), "--checkpoint_dir",
                                                         str(getattr(e, checkpoint)), "--destination_path", str(o),
                                                         "--test_size", "1"], expect)


def lora_to_peft(output: Callable[[SimpleNamespace, Path], Path], *expect: str, checkpoint: str | None = None) -> Case:
    return Case("scripts/convert_lora_to_peft.py", lambda e, o: [
        "--lora_path", str(e.adapter), "--output_dir", str(output(e, o)),
        *(["--checkpoint_dir", str(getattr(e, checkpoint))] if checkpoint else [])], expect)


def inspect(checkpoint: Callable[[SimpleNamespace], Path], *expect: str) -> Case:
    return Case("scripts/inspect_adapter.py", lambda e, o: [str(e.adapter), "--checkpoint_dir", str(checkpoint(e))], expect)


def output_dir(path: str, output: Callable[[SimpleNamespace, Path], Path], *expect: str, source: str = "base") -> Case:
    return Case(path, lambda e, o: ["--checkpoint_dir", str(getattr(e, source)), "--output_dir", str(output(e, o))], expect)


def gguf(path: str, output: Callable[[SimpleNamespace, Path], Path], *expect: str) -> Case:
    extra = (lambda e: ["--lora_path", str(e.adapter)]) if "lora" in path else (lambda e: ["--outtype", "f32"])
    return Case(path, lambda e, o: ["--checkpoint_dir", str(e.base), "--output_path", str(output(e, o)), *extra(e)], expect)


def pretrain(data: str, *expect: str) -> Case:
    return Case("pretrain/base.py", lambda e, o: ["--data_dir", str(getattr(e, data)), "--out_dir", str(o), "--accelerator",
                                                  "cpu", "--block_size", "32", "--train.max_iters", "1"], expect)


INSIDE_A_FILE = ("a_file' is a file, so nothing can be written inside it",)
FOREIGN = ("exists and holds other files than", "pass a new folder")
CASES: dict[str, Case] = {
    # 1. PEFT adapters
    "PEFT adapter_model.bin holding a Python object": with_expect(peft_to_lora("peft_pickle"), "refused: it is a pickle", "could run code"),
    "PEFT adapter_model.bin holding a list": with_expect(peft_to_lora("peft_bin_list"), "not a dict of tensors"),
    "PEFT adapter_model.safetensors truncated": with_expect(peft_to_lora("peft_truncated"), "adapter_model.safetensors", "damaged or incomplete"),
    "PEFT adapter_model.safetensors garbage": with_expect(peft_to_lora("peft_garbage"), "adapter_model.safetensors", "damaged or incomplete"),
    "PEFT adapter with a NaN": with_expect(peft_to_lora("peft_nan"), "non-finite values", "lora_B.weight"),
    "PEFT adapter_config.json invalid JSON": with_expect(peft_to_lora("peft_config_invalid"), "adapter_config.json' is not valid JSON"),
    "PEFT adapter_config.json not UTF-8": with_expect(peft_to_lora("peft_config_latin1"), "adapter_config.json' is not UTF-8"),
    "PEFT adapter_config.json a list": with_expect(peft_to_lora("peft_config_list"), "adapter_config.json' holds a list", "not an object"),
    "PEFT lora_alpha a list": with_expect(peft_to_lora("peft_config_alpha_list"), "lora_alpha is [4]; it must be"),
    "PEFT target_modules a number": with_expect(peft_to_lora("peft_config_targets_int"), "target_modules is 5; it must be"),
    "PEFT r a string": with_expect(peft_to_lora("peft_config_r_string"), "r is 'two'; it must be an integer"),
    "PEFT adapter onto another base": with_expect(peft_to_lora("peft", "other_base"), "is --checkpoint_dir the base model"),
    # 2. JSON files of checkpoints and tokenizers
    "lit_config.json not UTF-8": output_dir("scripts/convert_lit_checkpoint.py", lambda e, o: o, "lit_config.json' is not UTF-8",
                                            source="config_latin1"),
    "lit_config.json invalid JSON": output_dir("scripts/convert_lit_checkpoint.py", lambda e, o: o,
                                               "lit_config.json' is not valid JSON", source="config_invalid"),
    "lit_config.json a field of the wrong type": output_dir("scripts/convert_lit_checkpoint.py", lambda e, o: o,
                                                            "lit_config.json is not a valid LLaMA config", "n_layer",
                                                            source="config_wrong_type"),
    "lit_config.json a list": output_dir("scripts/convert_lit_checkpoint.py", lambda e, o: o, "lit_config.json' holds a list",
                                         source="config_list"),
    "special_tokens.json invalid JSON": prepare_json("special_invalid", "special_tokens.json' is not valid JSON"),
    "special_tokens.json not UTF-8": prepare_json("special_latin1", "special_tokens.json' is not UTF-8"),
    "special_tokens.json an object": prepare_json("special_object", "special_tokens.json' holds an object", "not a list"),
    "special_tokens.json with a number": prepare_json("special_number", "special_tokens.json' must list the special tokens"),
    "tokenizer_config.json invalid JSON": prepare_json("tokcfg_invalid", "tokenizer_config.json' is not valid JSON"),
    "tokenizer_config.json not UTF-8": prepare_json("tokcfg_latin1", "tokenizer_config.json' is not UTF-8"),
    "tokenizer_config.json a list": prepare_json("tokcfg_list", "tokenizer_config.json' holds a list"),
    "tokenizer_config.json added_tokens_decoder a list": prepare_json("tokcfg_added_list", "added_tokens_decoder in",
                                                                      "tokenizer_config.json"),
    "tokenizer_config.json added_tokens_decoder id not a number": prepare_json("tokcfg_added_key", "added_tokens_decoder in"),
    "generation_config.json invalid JSON": prepare_json("gencfg_invalid", "generation_config.json' is not valid JSON"),
    "generation_config.json not UTF-8": prepare_json("gencfg_latin1", "generation_config.json' is not UTF-8"),
    "generation_config.json a number": prepare_json("gencfg_number", "generation_config.json' holds a number"),
    "HF config.json not UTF-8": output_dir("scripts/convert_hf_checkpoint.py", lambda e, o: o, "config.json' is not UTF-8",
                                           source="hf_config_latin1"),
    "HF index without weight_map": output_dir("scripts/convert_hf_checkpoint.py", lambda e, o: o, "has no weight_map",
                                              source="hf_index_no_map"),
    "Meta params.json not UTF-8": output_dir("scripts/convert_checkpoint.py", lambda e, o: o, "params.json' is not UTF-8",
                                             source="meta_params_latin1"),
    "prepare_text_meta.json invalid JSON": pretrain("meta_invalid", "prepare_text_meta.json' is not valid JSON"),
    # 3. inspect_adapter.py and convert_lora_to_peft.py with a bad base
    "inspect_adapter: base config broken": inspect(lambda e: e.config_invalid, "lit_config.json' is not valid JSON"),
    "inspect_adapter: base missing": inspect(lambda e: e.tmp / "nope", "checkpoint directory", "does not exist"),
    "inspect_adapter: another base": inspect(lambda e: e.other_base, "trained for another base model"),
    "lora_to_peft: base config broken": lora_to_peft(lambda e, o: o, "lit_config.json' is not UTF-8", checkpoint="config_latin1"),
    "lora_to_peft: base missing": Case("scripts/convert_lora_to_peft.py", lambda e, o: [
        "--lora_path", str(e.adapter), "--output_dir", str(o), "--checkpoint_dir", str(e.tmp / "nope")], ("does not exist",)),
    "lora_to_peft: another base": lora_to_peft(lambda e, o: o, "trained for another base model", checkpoint="other_base"),
    # 4. pretraining data with ids outside the vocabulary
    "pretrain: token ids outside the vocabulary": pretrain("ids_outside", "holds token id 589", "vocabulary of 512 ids"),
    "evaluate: token ids outside the vocabulary": Case("scripts/evaluate.py", lambda e, o: [
        "--checkpoint_dir", str(e.base), "--tokens_dir", str(e.ids_outside)], ("holds token id 589",)),
    # 5. outputs of the wrong kind, per writer
    "lora_to_peft --output_dir a file": lora_to_peft(lambda e, o: e.a_file, *FOREIGN),
    "lora_to_peft --output_dir a folder of other files": lora_to_peft(lambda e, o: e.foreign, *FOREIGN),
    "lora_to_peft --output_dir inside a file": lora_to_peft(lambda e, o: e.a_file / "peft", *INSIDE_A_FILE),
    "peft_to_lora --output_path a folder": Case("scripts/convert_peft_to_lora.py", lambda e, o: [
        "--peft_dir", str(e.peft), "--checkpoint_dir", str(e.base), "--output_path", str(e.folder_named_file)],
        ("Is a directory: '", "folder.safetensors'; that path is a folder"), (".tmp",)),
    "peft_to_lora --output_path inside a file": Case("scripts/convert_peft_to_lora.py", lambda e, o: [
        "--peft_dir", str(e.peft), "--checkpoint_dir", str(e.base), "--output_path", str(e.a_file / "x.lora.safetensors")],
        INSIDE_A_FILE),
    "peft_to_lora --output_path a model's weights": Case("scripts/convert_peft_to_lora.py", lambda e, o: [
        "--peft_dir", str(e.peft), "--checkpoint_dir", str(e.base), "--output_path", str(e.weights_copy)],
        ("is not a lit_llama adapter; it is not overwritten",)),
    "lit_to_hf --output_dir a file": output_dir("scripts/convert_lit_checkpoint.py", lambda e, o: e.a_file, "is not a folder"),
    "lit_to_hf --output_dir a folder of other files": output_dir("scripts/convert_lit_checkpoint.py", lambda e, o: e.foreign, *FOREIGN),
    "hf_to_lit --output_dir a file": output_dir("scripts/convert_hf_checkpoint.py", lambda e, o: e.a_file, "is not a folder",
                                                source="hf_export"),
    "hf_to_lit --output_dir a folder of other files": output_dir("scripts/convert_hf_checkpoint.py", lambda e, o: e.foreign,
                                                                 *FOREIGN, source="hf_export"),
    "slice --output_dir a file": output_dir("scripts/slice_checkpoint.py", lambda e, o: e.a_file, "is not a folder"),
    "slice --output_dir a folder of other files": output_dir("scripts/slice_checkpoint.py", lambda e, o: e.foreign, *FOREIGN),
    "merge --output_dir inside a file": Case("scripts/merge_lora.py", lambda e, o: [
        "--checkpoint_dir", str(e.base), "--lora_path", str(e.adapter), "--output_dir", str(e.a_file / "merged")], INSIDE_A_FILE),
    "lit_to_gguf --output_path a folder": gguf("scripts/convert_lit_to_gguf.py", lambda e, o: e.folder_named_gguf, "is a folder"),
    "lit_to_gguf --output_path inside a file": gguf("scripts/convert_lit_to_gguf.py", lambda e, o: e.a_file / "x.gguf", *INSIDE_A_FILE),
    "lora_to_gguf --output_path a folder": Case("scripts/convert_lora_to_gguf.py", lambda e, o: [
        "--checkpoint_dir", str(e.base), "--lora_path", str(e.adapter), "--output_path", str(e.folder_named_gguf)],
        ("Is a directory: '", "folder.gguf'; that path is a folder"), (".tmp",)),
    "lora_to_gguf --output_path inside a file": gguf("scripts/convert_lora_to_gguf.py", lambda e, o: e.a_file / "x.gguf", *INSIDE_A_FILE),
    "prepare_text --destination_path a file": Case("scripts/prepare_text.py", lambda e, o: [
        "--input_file", str(e.records), "--tokenizer_path", str(TOKENIZER), "--destination_path", str(e.a_file)], ("is a file",)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_broken_file_or_output_gives_one_line_and_writes_nothing(env, tmp_path, name):
    case = CASES[name]
    out = tmp_path / "out"
    before = files_under(env.tmp, tmp_path)
    proc = run_main(case.script, case.argv(env, out))
    lines = proc.stderr.strip().splitlines()
    assert proc.code == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and lines, proc.stderr[-2000:]
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, proc.stderr[-2000:]
    for expected in case.expect:
        assert expected in lines[-1], lines[-1]
    for unexpected in case.absent:
        assert unexpected not in lines[-1], lines[-1]
    assert files_under(env.tmp, tmp_path) == before, "a file was written (or removed) by a refused run"
