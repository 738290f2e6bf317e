"""Bad input to the command line tools: every case exits non-zero with one line that names the
problem (and the fix), no traceback, and nothing partial left behind. The cases are the rows of the
table in howto/troubleshooting.md.

Each case runs the real script in its own process. Starting Python with torch and lightning takes
seconds per process on a small machine, so the processes are forked from one "zygote" that has
paid for those imports once: the child redirects stdout/stderr to files, sets sys.argv and runs
the script as `__main__` (runpy), exactly as `python script.py ...` would. One case is also run
with a plain subprocess to show both give the same result.
"""

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = DATA / "alpaca_data_first400.json"
TOKENIZER = DATA / "tok512.model"
OTHER_TOKENIZER = DATA / "llama-tokenizer.model"
pytestmark = pytest.mark.skipif(
    not (ALPACA.is_file() and TOKENIZER.is_file() and OTHER_TOKENIZER.is_file()),
    reason="needs ../shared/data (Alpaca sample, tok512.model, llama-tokenizer.model)",
)

ZYGOTE = r"""
import json, os, runpy, sys, traceback
import torch, lightning, jsonargparse, safetensors, sentencepiece  # the slow imports, paid once
import lit_llama.cli, lit_llama.training, lit_llama.lora, lit_llama.data, lit_llama.generation  # noqa
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
        os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        sys.argv = req["argv"]
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # what `python script.py` puts first
        code = 0
        try:
            exec(req["prelude"], {})
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:  # what the interpreter does with it
            if isinstance(e.code, int) or e.code is None:
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], workdir: Path, prelude: str = "") -> SimpleNamespace:
        out, err = workdir / "stdout.txt", workdir / "stderr.txt"
        self.proc.stdin.write(json.dumps({"argv": argv, "stdout": str(out), "stderr": str(err), "prelude": prelude}) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the zygote process died"
        return SimpleNamespace(returncode=json.loads(reply)["rc"], stdout=out.read_text(), stderr=err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ------------------------------------------------------------------------ the files the cases use
@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory, zygote):
    from lit_llama.adapter import save_adapter
    from lit_llama.checkpoint import save_checkpoint
    from lit_llama.data import prepare_instruction_data
    from lit_llama.lora import LoRAConfig, build_lora_model
    from lit_llama.model import LLaMA, LLaMAConfig, init_weights

    t = tmp_path_factory.mktemp("bad_input")
    e = SimpleNamespace(tmp=t)
    torch.manual_seed(0)
    config = LLaMAConfig.from_name("tiny", vocab_size=512, block_size=256)
    model = LLaMA(config)
    init_weights(model)
    e.base = t / "base"
    save_checkpoint(model, e.base, tokenizer_path=TOKENIZER)
    records = json.loads(ALPACA.read_text())[:60]
    e.data = t / "data"
    prepare_instruction_data(records, e.data, e.base, test_size=10, max_seq_length=256)
    e.data_no_target = t / "data_no_target"  # every sample cut inside its prompt: nothing to learn
    prepare_instruction_data(records, e.data_no_target, e.base, test_size=10, max_seq_length=8)
    e.data_truncated = t / "data_truncated"
    shutil.copytree(e.data, e.data_truncated)
    cut(e.data_truncated / "train.safetensors")

    e.base_other_config = t / "base_other_config"  # lit_config.json of another model size
    shutil.copytree(e.base, e.base_other_config)
    cfg = json.loads((e.base / "lit_config.json").read_text())
    (e.base_other_config / "lit_config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    e.base_other_tokenizer = t / "base_other_tokenizer"  # the same model with another tokenizer than the data's
    shutil.copytree(e.base, e.base_other_tokenizer)
    shutil.copyfile(OTHER_TOKENIZER, e.base_other_tokenizer / "tokenizer.model")
    e.base_truncated = t / "base_truncated"
    shutil.copytree(e.base, e.base_truncated)
    cut(e.base_truncated / "lit_model.safetensors")

    lora = LoRAConfig(r=2, alpha=4)
    e.adapter = save_adapter(build_lora_model(config, lora), t / "good.lora.safetensors", lora)
    other = build_lora_model(LLaMAConfig.from_name("tiny-gqa", vocab_size=512, block_size=256), lora)
    e.adapter_other_base = save_adapter(other, t / "other.lora.safetensors", lora)
    e.adapter_truncated = t / "truncated.lora.safetensors"
    shutil.copy(e.adapter, e.adapter_truncated)
    cut(e.adapter_truncated)

    e.a_file = t / "a_file"
    e.a_file.write_text("not a folder")
    write_data_files(e)

    # A finished short LoRA run, to resume with other settings.
    e.run = t / "run"
    proc = zygote.run(finetune(e, e.run), t)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = t / "story.txt"
    text.write_text("\n\n".join(r["output"] for r in records))
    e.text_data = t / "text_data"
    proc = zygote.run(["scripts/prepare_text.py", "--input_file", str(text), "--destination_path", str(e.text_data),
                       "--tokenizer_path", str(TOKENIZER)], t)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return e


def cut(path: Path) -> None:
    """Truncate a file to half its size, as an interrupted copy or download would."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def write_data_files(e: SimpleNamespace) -> None:
    d = e.tmp / "files"
    d.mkdir()
    e.empty = d / "empty.json"
    e.empty.write_text("")
    e.malformed = d / "malformed.json"
    e.malformed.write_text('[{"instruction": "Name a color.", "output": "Blue"},\n {"instruction": ')
    e.bad_jsonl = d / "bad.jsonl"
    e.bad_jsonl.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    e.missing_key = d / "missing_key.json"
    e.missing_key.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": ""}]))
    e.not_object = d / "not_object.json"
    e.not_object.write_text(json.dumps(["Name a color.", "Blue"]))
    e.latin1 = d / "latin1.json"
    e.latin1.write_bytes('[{"instruction": "Name a café.", "output": "Flore"}]'.encode("latin-1"))
    e.three = d / "three.json"
    e.three.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]))
    e.empty_text = d / "empty.txt"
    e.empty_text.write_text("\n\n  \n")


def finetune(e: SimpleNamespace, out: Path, *extra: str, script: str = "finetune/lora.py", data: Path | None = None,
             checkpoint: Path | None = None) -> list[str]:
    return [script, "--data_dir", str(data or e.data), "--checkpoint_dir", str(checkpoint or e.base),
            "--out_dir", str(out), "--accelerator", "cpu", "--precision", "32-true", "--train.max_iters", "2",
            "--train.batch_size", "2", "--train.micro_batch_size", "2", "--train.eval_iters", "1",
            "--train.save_interval", "1", "--train.warmup_steps", "1", *extra]


def generate(e: SimpleNamespace, *extra: str, checkpoint: Path | None = None) -> list[str]:
    return ["generate/base.py", "--checkpoint_dir", str(checkpoint or e.base), "--accelerator", "cpu",
            "--max_new_tokens", "4", *extra]


def generate_lora(e: SimpleNamespace, adapter: Path, *extra: str) -> list[str]:
    return ["generate/lora.py", "--checkpoint_dir", str(e.base), "--lora_path", str(adapter), "--accelerator", "cpu",
            "--max_new_tokens", "4", *extra]


def prepare_json(e: SimpleNamespace, data_file: Path, out: Path, *extra: str) -> list[str]:
    return ["scripts/prepare_json.py", "--data_file", str(data_file), "--checkpoint_dir", str(e.base),
            "--destination_path", str(out), *extra]


# A write that fails half-way: the bytes written so far land in the temporary file.
DISK_FULL = """
import errno, lit_llama.checkpoint as c
def write(tensors, specs, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"the first half of a file")
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
c.write_safetensors_streaming = write
"""
CTRL_C = DISK_FULL.replace('raise OSError(errno.ENOSPC, "No space left on device", str(path))', "raise KeyboardInterrupt")


# Another process's run holding out_dir's lock (kept referenced for the life of this process).
HOLD_LOCK = """
import builtins, fcntl, sys
out = sys.argv[sys.argv.index("--out_dir") + 1]
builtins._held_lock = open(out + "/.run.lock", "a")
fcntl.flock(builtins._held_lock, fcntl.LOCK_EX)
"""


@dataclass
class Case:
    argv: Callable[[SimpleNamespace, Path], list[str]]  # (env, a fresh output folder) -> script and flags
    expect: str | tuple[str, ...]  # in the error line (each of them)
    prelude: str = ""
    rc: int | None = None  # the exit status, when it matters
    fix_needed: str | None = None  # a known gap, fixed outside the files this test owns: strict xfail
    marks: list = field(default_factory=list)


READ_ONLY = Path("/sys/lit_llama_out")  # sysfs: nobody can create a folder there, root included


def _writable(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return False
    path.rmdir()
    return True


CASES: dict[str, Case] = {
    # ---- preparing instruction data
    "data file missing": Case(lambda e, o: prepare_json(e, e.tmp / "nope.json", o), "does not exist"),
    "data file empty": Case(lambda e, o: prepare_json(e, e.empty, o), "is empty"),
    "data file malformed JSON": Case(lambda e, o: prepare_json(e, e.malformed, o), "is not valid JSON"),
    "JSONL line malformed": Case(lambda e, o: prepare_json(e, e.bad_jsonl, o), "line 2 of"),
    "record missing a key": Case(lambda e, o: prepare_json(e, e.missing_key, o), 'has no "output" key'),
    "record not an object": Case(lambda e, o: prepare_json(e, e.not_object, o), "not an object"),
    "non-UTF-8 text": Case(lambda e, o: prepare_json(e, e.latin1, o), "is not UTF-8"),
    "test split larger than the data": Case(lambda e, o: prepare_json(e, e.three, o, "--test_size", "5"), "--test_size"),
    "max_seq_length below 2": Case(lambda e, o: prepare_json(e, e.three, o, "--test_size", "1", "--max_seq_length", "1"),
                                   "--max_seq_length"),
    "prepare with a wrong checkpoint_dir": Case(
        lambda e, o: ["scripts/prepare_alpaca.py", "--data_file", str(e.three), "--checkpoint_dir", str(e.tmp / "nope"),
                      "--destination_path", str(o)], "--checkpoint_dir"),
    # ---- finetuning
    "data_dir not prepared": Case(lambda e, o: finetune(e, o, data=e.tmp / "nope"), "prepare_alpaca.py"),
    "dataset file truncated": Case(lambda e, o: finetune(e, o, data=e.data_truncated), "cannot read"),
    "samples longer than max_seq_length: no target left": Case(
        lambda e, o: finetune(e, o, data=e.data_no_target), "larger --max_seq_length"),
    "wrong checkpoint_dir": Case(lambda e, o: finetune(e, o, checkpoint=e.tmp / "nope"), "checkpoint directory"),
    "data tokenized with another tokenizer than the model's": Case(
        lambda e, o: finetune(e, o, checkpoint=e.base_other_tokenizer), "tokenized with another tokenizer"),
    "data tokenized with another tokenizer (full finetune)": Case(
        lambda e, o: finetune(e, o, checkpoint=e.base_other_tokenizer, script="finetune/full.py"),
        "tokenized with another tokenizer"),
    "checkpoint for another config": Case(
        lambda e, o: finetune(e, o, checkpoint=e.base_other_config), ("does not match", "convert")),
    "truncated weights": Case(lambda e, o: finetune(e, o, checkpoint=e.base_truncated), ("cannot read weights", "again")),
    "LoRA rank 0": Case(lambda e, o: finetune(e, o, "--lora.r", "0"), "lora r must be a positive integer"),
    "LoRA rank negative": Case(lambda e, o: finetune(e, o, "--lora.r", "-4"), "lora r must be a positive integer"),
    "LoRA dropout 1": Case(lambda e, o: finetune(e, o, "--lora.dropout", "1.0"), "lora dropout"),
    "micro_batch_size > batch_size": Case(
        lambda e, o: finetune(e, o, "--train.micro_batch_size", "4", "--train.batch_size", "2"), "try --train.batch_size 4"),
    "micro_batch_size not dividing batch_size": Case(
        lambda e, o: finetune(e, o, "--train.micro_batch_size", "3", "--train.batch_size", "4"), "multiple of micro_batch_size"),
    "batch_size 0 (full finetune)": Case(
        lambda e, o: finetune(e, o, "--train.batch_size", "0", script="finetune/full.py"), "--train.batch_size"),
    "learning_rate 0": Case(lambda e, o: finetune(e, o, "--train.learning_rate", "0"), "--train.learning_rate"),
    "learning_rate inf": Case(lambda e, o: finetune(e, o, "--train.learning_rate", "inf"), "train.learning_rate"),
    "min_lr nan": Case(lambda e, o: finetune(e, o, "--train.min_lr", "nan"), "train.min_lr"),
    "min_lr above learning_rate": Case(lambda e, o: finetune(e, o, "--train.min_lr", "1"), "--train.min_lr must be between"),
    "a misspelt flag": Case(lambda e, o: finetune(e, o, "--train.learnig_rate", "1e-3"), "unrecognized arguments"),
    "grad_clip negative": Case(lambda e, o: finetune(e, o, "--train.grad_clip", "-1"), "--train.grad_clip"),
    "LoRA alpha nan": Case(lambda e, o: finetune(e, o, "--lora.alpha", "nan"), "lora.alpha"),
    "LoRA alpha 0": Case(lambda e, o: finetune(e, o, "--lora.alpha", "0"), "lora alpha must be a positive number"),
    "devices 0": Case(lambda e, o: finetune(e, o, "--devices", "0"), "--devices must be at least 1"),
    "training diverges to a non-finite loss": Case(
        lambda e, o: finetune(e, o, "--train.learning_rate", "1e30", "--train.grad_clip", "null", "--train.max_iters", "4"),
        "loss became"),
    "precision the CPU lacks": Case(lambda e, o: finetune(e, o, "--precision", "16-mixed"), "needs a GPU"),
    "no CUDA device": Case(lambda e, o: finetune(e, o, "--accelerator", "cuda"), "no CUDA device",
                           marks=[pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")]),
    "out_dir inside a file": Case(lambda e, o: finetune(e, e.a_file / "out"), "is not writable"),
    "out_dir on a read-only file system": Case(
        lambda e, o: finetune(e, READ_ONLY), "is not writable",
        marks=[pytest.mark.skipif(_writable(READ_ONLY), reason="no read-only place to test with")]),
    "disk full during a save": Case(lambda e, o: finetune(e, o), "No space left on device", prelude=DISK_FULL),
    "Ctrl-C during a save": Case(lambda e, o: finetune(e, o), "interrupted", prelude=CTRL_C, rc=130),
    "--resume from a folder without state": Case(lambda e, o: finetune(e, o, "--resume", str(e.tmp / "data")),
                                                  "holds no training state"),
    "a fresh run into an out_dir that holds an earlier run": Case(lambda e, o: finetune(e, e.run), "holds an earlier run"),
    "--resume auto with another learning rate": Case(
        lambda e, o: finetune(e, e.run, "--resume", "auto", "--train.learning_rate", "1e-2"),
        "train.learning_rate changed since it was saved"),
    "a second run into an out_dir another run is writing to": Case(
        lambda e, o: finetune(e, e.run, "--resume", "auto"), "another run is writing",
        prelude=HOLD_LOCK),
    "--resume with another micro_batch_size": Case(
        lambda e, o: finetune(e, e.run, "--resume", "auto", "--train.micro_batch_size", "1"), "changed since it was saved"),
    "full finetune: data_dir not prepared": Case(
        lambda e, o: finetune(e, o, script="finetune/full.py", data=e.tmp / "nope"), "prepare_alpaca.py"),
    # ---- generating
    "prompt longer than the context": Case(lambda e, o: generate(e, "--prompt=" + "word " * 300), "exceeds the model's context"),
    "temperature < 0": Case(lambda e, o: generate(e, "--temperature", "-0.5"), "temperature must be >= 0"),
    "top_k 0": Case(lambda e, o: generate(e, "--top_k", "0"), "top_k must be a positive"),
    "top_p -1": Case(lambda e, o: generate(e, "--top_p", "-1"), "top_p must be in (0, 1]"),
    "top_p 1.5": Case(lambda e, o: generate(e, "--top_p", "1.5"), "top_p must be in (0, 1]"),
    "16-true on CPU": Case(lambda e, o: generate(e, "--precision", "16-true"), "needs a GPU"),
    "generate: wrong checkpoint_dir": Case(
        lambda e, o: generate(e, checkpoint=e.tmp / "nope"), "checkpoint directory"),
    "generate: truncated weights": Case(lambda e, o: generate(e, checkpoint=e.base_truncated),
                                        ("cannot read weights", "again")),
    "adapter for another base": Case(lambda e, o: generate_lora(e, e.adapter_other_base), "another base model"),
    "adapter file missing": Case(lambda e, o: generate_lora(e, e.tmp / "nope.lora.safetensors"), "does not exist"),
    "adapter truncated": Case(
        lambda e, o: generate_lora(e, e.adapter_truncated), ("cannot read adapter", "again")),
    "compile with several adapters": Case(
        lambda e, o: generate_lora(e, e.adapter, "--lora_path", str(e.adapter), "--compile", "true"), "one adapter"),
    "compile: prompt longer than the context": Case(
        lambda e, o: generate(e, "--compile", "true", "--prompt=" + "word " * 300), "exceeds the model's context"),
    # ---- merging
    "merge --output_dir an existing file": Case(
        lambda e, o: ["scripts/merge_lora.py", "--checkpoint_dir", str(e.base), "--lora_path", str(e.adapter),
                      "--output_dir", str(e.a_file)], "holds other files than a checkpoint's"),
    "evaluate --out_file a directory": Case(
        lambda e, o: ["scripts/evaluate.py", "--checkpoint_dir", str(e.base), "--tokens_dir", str(e.text_data),
                      "--out_file", str(e.tmp)], ("Is a directory", "pass a file path")),
    "llama2c --output_dir an existing file": Case(
        lambda e, o: ["scripts/convert_llama2c_checkpoint.py", "--checkpoint_path", str(DATA / "stories260K.bin"),
                      "--output_dir", str(e.a_file)], ("File exists", "pass a new one")),
    "merge into the base folder": Case(
        lambda e, o: ["scripts/merge_lora.py", "--checkpoint_dir", str(e.base), "--lora_path", str(e.adapter),
                      "--output_dir", str(e.base)], "must differ"),
    "merge: disk full": Case(
        lambda e, o: ["scripts/merge_lora.py", "--checkpoint_dir", str(e.base), "--lora_path", str(e.adapter),
                      "--output_dir", str(o)], "No space left on device", prelude=DISK_FULL),
    # ---- pretraining
    "model n_head 0": Case(lambda e, o: ["pretrain/base.py", "--data_dir", str(e.text_data), "--n_head", "0",
                                         "--out_dir", str(o), "--accelerator", "cpu"], "n_head must be a positive integer"),
    "model n_embd negative": Case(lambda e, o: ["pretrain/base.py", "--data_dir", str(e.text_data), "--n_embd", "-64",
                                                "--out_dir", str(o), "--accelerator", "cpu"], "n_embd must be a positive integer"),
    "model block_size 0": Case(lambda e, o: ["pretrain/base.py", "--data_dir", str(e.text_data), "--block_size", "0",
                                             "--out_dir", str(o), "--accelerator", "cpu"], "block_size must be a positive integer"),
    "unknown preset": Case(lambda e, o: ["pretrain/base.py", "--data_dir", str(e.text_data), "--model_name", "7b-typo",
                                         "--out_dir", str(o), "--accelerator", "cpu"], "unknown model preset"),
    "pretrain data_dir not prepared": Case(
        lambda e, o: ["pretrain/base.py", "--data_dir", str(e.tmp / "nope"), "--out_dir", str(o)], "prepare_text.py"),
    "text file with no text": Case(
        lambda e, o: ["scripts/prepare_text.py", "--input_file", str(e.empty_text), "--destination_path", str(o),
                      "--tokenizer_path", str(TOKENIZER)], "holds no text"),
}


def nothing_partial(folder: Path) -> None:
    """No temporary file is left, and every file under a final name is complete."""
    from safetensors.torch import load_file

    if not folder.is_dir():
        return
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    for p in folder.rglob("*.safetensors"):
        load_file(p)
    for p in folder.rglob("*.json"):
        json.loads(p.read_text())


def param(name: str, case: Case):
    marks = list(case.marks)
    if case.fix_needed:
        marks.append(pytest.mark.xfail(strict=True, reason=case.fix_needed))
    return pytest.param(name, marks=marks, id=name)


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", [param(n, c) for n, c in CASES.items()])
def test_bad_input_gives_one_clear_line_and_leaves_nothing_partial(env, zygote, tmp_path, name):
    case = CASES[name]
    out = tmp_path / "out"
    argv = case.argv(env, out)
    proc = zygote.run(argv, tmp_path, case.prelude)
    assert proc.returncode != 0, proc.stdout[-1000:] + proc.stderr[-1000:]
    if case.rc is not None:
        assert proc.returncode == case.rc
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    for expected in (case.expect,) if isinstance(case.expect, str) else case.expect:
        assert expected in last, proc.stderr[-2000:]
    if case.rc != 130:  # Ctrl-C says "interrupted; ..." rather than "error: ..."
        assert last.startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, proc.stderr[-2000:]
    nothing_partial(out)
    if name == "Ctrl-C during a save" or name == "disk full during a save":
        assert not list(out.glob("*.safetensors")), "the interrupted save must not leave an adapter"


def test_zygote_matches_a_plain_subprocess(env, zygote, tmp_path):
    argv = finetune(env, tmp_path / "out", "--lora.r", "0")
    forked = zygote.run(argv, tmp_path)
    plain = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (forked.returncode, forked.stderr.strip().splitlines()[-1]) == (plain.returncode, plain.stderr.strip().splitlines()[-1])
