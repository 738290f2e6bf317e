"""Instruction data: tokenization and masking compared with SentencePiece and Stanford Alpaca's template
written out here; the prepare scripts end to end on the real 400-record Alpaca sample; error handling."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lit_llama import cli
from lit_llama.data import (
    IGNORE_INDEX,
    InstructionDataset,
    collate,
    load_records,
    load_splits,
    prepare_instruction_data,
    save_dataset,
    split_train_test,
    tokenize_sample,
)
from lit_llama.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = DATA / "alpaca_data_first400.json"
LLAMA_TOKENIZER = DATA / "llama-tokenizer.model"

# tatsu-lab/stanford_alpaca train.py PROMPT_DICT, filled by hand below (independent of lit_llama.prompts)
STANFORD_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
STANFORD_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def needs(*paths: Path) -> None:
    for p in paths:
        if not p.is_file():
            pytest.skip(f"{p} not found")


def hand_prompt(rec: dict) -> str:
    return (STANFORD_PROMPT_INPUT if rec.get("input", "") != "" else STANFORD_PROMPT_NO_INPUT).format_map(rec)


def reference_sample(sp, rec: dict, max_seq_length: int, mask_inputs: bool = True) -> tuple[list[int], list[int], bool]:
    """What a sample must be, computed with SentencePiece directly: BOS + prompt + output + EOS, the
    first 1 + len(encode(prompt)) labels ignored, then cut to max_seq_length."""
    prompt = hand_prompt(rec)
    ids = [sp.bos_id()] + sp.encode(prompt + rec["output"]) + [sp.eos_id()]
    n_prompt = 1 + len(sp.encode(prompt))
    labels = [-100] * n_prompt + ids[n_prompt:] if mask_inputs else list(ids)
    return ids[:max_seq_length], labels[:max_seq_length], len(ids) > max_seq_length


def run_scripts(*argvs: list[str], env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Run several script invocations at once (each pays the torch import) and wait for all of them."""
    procs = [
        subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
        for argv in argvs
    ]
    results = []
    for argv, p in zip(argvs, procs):
        out, err = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(argv, p.returncode, out, err))
    return results


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# ------------------------------------------------------------------------------------ tokenization
def test_tokenize_sample_matches_sentencepiece_and_hand_filled_alpaca_template():
    needs(ALPACA, LLAMA_TOKENIZER)
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(LLAMA_TOKENIZER))
    tok = Tokenizer(LLAMA_TOKENIZER)
    records = json.loads(ALPACA.read_text())
    n_truncated = 0
    for rec in records:
        ids, labels, truncated = tokenize_sample(tok, rec, "alpaca", max_seq_length=256)
        ref_ids, ref_labels, ref_truncated = reference_sample(sp, rec, 256)
        assert ids.dtype == labels.dtype == torch.long
        assert ids.tolist() == ref_ids and labels.tolist() == ref_labels and truncated == ref_truncated
        n_truncated += truncated
    assert n_truncated == sum(len(sp.encode(hand_prompt(r) + r["output"])) + 2 > 256 for r in records)
    # without masking the labels are the ids
    ids, labels, _ = tokenize_sample(tok, records[0], "alpaca", max_seq_length=256, mask_inputs=False)
    assert torch.equal(ids, labels)


# ------------------------------------------------------------------------------------ end to end
def test_prepare_alpaca_defaults_work_on_the_repos_own_sample(tmp_path):
    """The default --test_size is a fraction: 5% of the 400-record sample (a count of 2000 failed on it)."""
    needs(ALPACA, LLAMA_TOKENIZER)
    (result,) = run_scripts(["scripts/prepare_alpaca.py", "--data_file", str(ALPACA), "--tokenizer_path",
                             str(LLAMA_TOKENIZER), "--destination_path", str(tmp_path / "alpaca")])
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "alpaca" / "prepare_meta.json").read_text())
    assert meta["splits"]["test"]["num_samples"] == 20 and meta["splits"]["train"]["num_samples"] == 380


def test_prepare_alpaca_end_to_end_on_real_sample(tmp_path):
    needs(ALPACA, LLAMA_TOKENIZER)
    from sentencepiece import SentencePieceProcessor

    dest = tmp_path / "alpaca"
    (result,) = run_scripts(["scripts/prepare_alpaca.py", "--data_file", str(ALPACA), "--tokenizer_path",
                             str(LLAMA_TOKENIZER), "--destination_path", str(dest), "--test_size", "40",
                             "--max_seq_length", "256", "--seed", "42"])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in files_under(dest)) == ["prepare_meta.json", "test.safetensors", "train.safetensors"]

    sp = SentencePieceProcessor(model_file=str(LLAMA_TOKENIZER))
    records = json.loads(ALPACA.read_text())
    expected = Counter()  # every record's reference sample, as hashable (ids, labels)
    ref_truncated = 0
    for rec in records:
        ids, labels, truncated = reference_sample(sp, rec, 256)
        expected[(tuple(ids), tuple(labels))] += 1
        ref_truncated += truncated

    got = Counter()
    sizes = {}
    for split in ("train", "test"):
        # safe_open reads the file without unpickling anything
        with safe_open(str(dest / f"{split}.safetensors"), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        assert set(t) == {"input_ids", "labels", "offsets"}
        assert (t["input_ids"].dtype, t["labels"].dtype, t["offsets"].dtype) == (torch.int32, torch.int32, torch.int64)
        offsets = t["offsets"].tolist()
        assert offsets[0] == 0 and offsets[-1] == len(t["input_ids"]) == len(t["labels"])
        assert meta["prompt_style"] == "alpaca" and meta["max_seq_length"] == "256" and meta["mask_inputs"] == "true"
        assert meta["tokenizer_vocab_size"] == "32000" and meta["source"] == ALPACA.name
        assert int(meta["num_samples"]) == len(offsets) - 1
        sizes[split] = len(offsets) - 1
        for a, b in zip(offsets[:-1], offsets[1:]):
            got[(tuple(t["input_ids"][a:b].tolist()), tuple(t["labels"][a:b].tolist()))] += 1
    assert sizes == {"train": 360, "test": 40}
    assert got == expected  # all 400 records, each exactly once, ids and masks as SentencePiece says

    summary = json.loads((dest / "prepare_meta.json").read_text())
    assert summary["splits"]["train"]["num_truncated"] + summary["splits"]["test"]["num_truncated"] == ref_truncated
    assert f"truncated to 256 tokens: {ref_truncated} of 400 samples" in result.stdout
    assert "train: 360 samples" in result.stdout and "test: 40 samples" in result.stdout

    train, test = load_splits(dest)
    assert (len(train), len(test)) == (360, 40)
    assert train.metadata["max_seq_length"] == 256 and train.metadata["mask_inputs"] is True
    item = test[0]
    assert set(item) == {"input_ids", "labels"} and item["input_ids"].dtype == torch.long
    assert int(train.lengths.max()) <= 256


def test_prepare_dolly_and_json_scripts(tmp_path, capsys):
    needs(LLAMA_TOKENIZER)
    from sentencepiece import SentencePieceProcessor

    dolly = tmp_path / "dolly.jsonl"
    rows = [{"instruction": f"Question {i}?", "context": "Some context." if i % 2 else "",
             "response": f"Answer {i}.", "category": "open_qa"} for i in range(10)]
    dolly.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plain_json = tmp_path / "mine.jsonl"  # "input" is optional
    plain_json.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) for i in range(10)))
    common = ["--tokenizer_path", str(LLAMA_TOKENIZER), "--test_size", "2"]
    code, out, err = run_cli("scripts/prepare_dolly.py", ["--data_file", str(dolly), "--destination_path",
                                                          str(tmp_path / "d"), *common], capsys)
    assert code == 0 and "train: 8 samples" in out, err
    code, out, err = run_cli("scripts/prepare_json.py", ["--data_file", str(plain_json), "--destination_path",
                                                         str(tmp_path / "j"), "--prompt_style", "plain", *common], capsys)
    assert code == 0 and "test: 2 samples" in out, err

    sp = SentencePieceProcessor(model_file=str(LLAMA_TOKENIZER))
    train, test = load_splits(tmp_path / "d")
    got = sorted(tuple(s["input_ids"].tolist()) for s in [*train, *test])
    ref = sorted(tuple(reference_sample(sp, {"instruction": r["instruction"], "input": r["context"],
                                             "output": r["response"]}, 512)[0]) for r in rows)
    assert got == ref  # context became the Alpaca "### Input:" block, response the output

    train, test = load_splits(tmp_path / "j")
    assert train.metadata["prompt_style"] == "plain"
    got = sorted(tuple(s["labels"].tolist()) for s in [*train, *test])
    ref = []
    for i in range(10):
        prompt = f"Say {i}.\n"  # the plain style, filled by hand
        ids = [1] + sp.encode(prompt + str(i)) + [2]
        n = 1 + len(sp.encode(prompt))
        ref.append(tuple([-100] * n + ids[n:]))
    assert got == sorted(ref)


def test_split_is_seeded_deterministic_and_disjoint():
    records = [{"instruction": str(i), "output": ""} for i in range(100)]
    train, test = split_train_test(records, 10, seed=42)
    again = split_train_test(records, 10, seed=42)
    other = split_train_test(records, 10, seed=43)
    assert (train, test) == again
    assert test != other[1]
    ids = lambda rs: [r["instruction"] for r in rs]
    assert len(test) == 10 and len(train) == 90
    assert not set(ids(train)) & set(ids(test)) and sorted(ids(train) + ids(test), key=int) == ids(records)
    assert len(split_train_test(records, 0.25, seed=0)[1]) == 25
    for bad in (0, 100, 1.0, 0.0):
        with pytest.raises(ValueError, match="--test_size"):
            split_train_test(records, bad, seed=0)


def test_prepare_is_deterministic_for_a_seed(tmp_path):
    needs(ALPACA, LLAMA_TOKENIZER)
    records = load_records(ALPACA)[:60]
    args = dict(checkpoint_dir=tmp_path, tokenizer_path=LLAMA_TOKENIZER, test_size=10, max_seq_length=128)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare_instruction_data(records, tmp_path / name, seed=seed, **args)
    read = lambda name, split: (tmp_path / name / f"{split}.safetensors").read_bytes()
    assert read("a", "train") == read("b", "train") and read("a", "test") == read("b", "test")
    assert read("a", "test") != read("c", "test")


# ------------------------------------------------------------------------------------ bad input
BAD_INPUTS = {
    # name: (file name, bytes, expected text in the error line)
    "missing_file": ("absent.json", None, "does not exist"),
    "empty_file": ("empty.json", b"  \n", "is empty"),
    "invalid_json": ("bad.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
                     "is not valid JSON: Expecting ',' delimiter at line 2, column 22"),
    "invalid_jsonl": ("bad.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": \n',
                      "line 2 of"),
    "not_utf8": ("latin1.json", '[{"instruction": "caf\u00e9", "output": "x"}]'.encode("latin-1"),
                 "is not UTF-8 text: byte 0xe9 at line 1"),
    "not_an_object": ("list.json", b'[{"instruction": "a", "output": "b"}, ["a", "b"]]', "record 1 of"),
    "missing_key": ("nokey.json", json.dumps([{"instruction": "a", "output": "b"}] * 12 + [{"instruction": "c"}]).encode(),
                    'record 12 of'),
    "wrong_type": ("type.json", b'[{"instruction": "a", "output": 3}]', '"output" is a int, expected a string'),
    "empty_dataset": ("none.json", b"[]", "holds no records"),
}


def run_cli(script: str, args: list[str], capsys) -> tuple[int, str, str]:
    """Run scripts/<script>'s main through lit_llama.cli.run in this process (the same code path as the
    command line, without paying a new interpreter and torch import per case): (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(f"_script_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # jsonargparse resolves the string annotations through sys.modules
    spec.loader.exec_module(module)
    capsys.readouterr()
    try:
        cli.run(module.main, args=args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, message: str, dest: Path) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and "Traceback" not in err, err
    assert len(errors) == 1 and message in errors[0], err
    assert files_under(dest) == []


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_data_file_gives_one_error_line_and_leaves_no_files(tmp_path, capsys, name):
    needs(LLAMA_TOKENIZER)
    fname, content, message = BAD_INPUTS[name]
    path = tmp_path / fname
    if content is not None:
        path.write_bytes(content)
    dest = tmp_path / "out"
    code, _, err = run_cli("scripts/prepare_json.py", ["--data_file", str(path), "--tokenizer_path", str(LLAMA_TOKENIZER),
                                                       "--destination_path", str(dest), "--test_size", "1"], capsys)
    assert_one_error_line(code, err, message, dest)


def test_bad_arguments_give_one_error_line_and_leave_no_files(tmp_path, capsys):
    needs(ALPACA, LLAMA_TOKENIZER)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n")
    cases = {
        "test_size_too_large": ("scripts/prepare_alpaca.py", ["--data_file", str(ALPACA), "--tokenizer_path",
                                str(LLAMA_TOKENIZER), "--test_size", "100000"], "--test_size 100000"),
        "no_tokenizer": ("scripts/prepare_alpaca.py", ["--data_file", str(ALPACA), "--checkpoint_dir",
                         str(tmp_path / "nockpt")], "tokenizer.model"),
        "max_seq_length": ("scripts/prepare_alpaca.py", ["--data_file", str(ALPACA), "--tokenizer_path",
                           str(LLAMA_TOKENIZER), "--max_seq_length", "1"], "--max_seq_length must be at least 2"),
        "dolly_without_context": ("scripts/prepare_dolly.py", ["--data_file", str(nokey), "--tokenizer_path",
                                  str(LLAMA_TOKENIZER)], 'record 0 (line 1) of'),
        "json_without_data_file": ("scripts/prepare_json.py", [], "pass --data_file"),
    }
    for name, (script, args, message) in cases.items():
        dest = tmp_path / "out" / name
        code, _, err = run_cli(script, [*args, "--destination_path", str(dest)], capsys)
        assert_one_error_line(code, err, message, dest)
        if name == "dolly_without_context":
            assert 'has no "context" key' in err


def test_cli_subprocess_help_bad_record_and_offline(tmp_path):
    """The scripts as commands: --help, a record without "output", and no network for the download."""
    needs(LLAMA_TOKENIZER)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 12 + [{"instruction": "c"}]))
    dest_bad, dest_offline = tmp_path / "bad_out", tmp_path / "offline_out"
    # no --data_file: prepare_alpaca downloads; a proxy that refuses connections stands in for being offline
    results = run_scripts(
        ["scripts/prepare_alpaca.py", "--help"], ["scripts/prepare_dolly.py", "--help"], ["scripts/prepare_json.py", "--help"],
        ["scripts/prepare_alpaca.py", "--data_file", str(bad), "--tokenizer_path", str(LLAMA_TOKENIZER),
         "--destination_path", str(dest_bad)],
        ["scripts/prepare_alpaca.py", "--tokenizer_path", str(LLAMA_TOKENIZER), "--destination_path", str(dest_offline)],
        env={"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"},
    )
    for h in results[:3]:
        assert h.returncode == 0 and "--destination_path" in h.stdout and "--prompt_style" in h.stdout, h.stderr
    assert_one_error_line(results[3].returncode, results[3].stderr, f'record 12 of {bad} has no "output" key', dest_bad)
    assert_one_error_line(results[4].returncode, results[4].stderr, "cannot download https://raw.githubusercontent.com/"
                          "gururise/AlpacaDataCleaned/main/alpaca_data_cleaned.json", dest_offline)


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_load_records_errors(tmp_path, name):
    fname, content, message = BAD_INPUTS[name]
    path = tmp_path / fname
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_records(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    if name == "missing_key":
        assert str(info.value).startswith(f'record 12 of {path} has no "output" key')


def test_load_records_json_and_jsonl(tmp_path):
    recs = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": None, "output": "d"},
            {"instruction": "e", "input": "f", "output": "g", "extra": 1}]
    (tmp_path / "r.json").write_text(json.dumps(recs, indent=4), encoding="utf-8-sig")  # with a BOM
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert load_records(tmp_path / "r.json") == recs
    assert load_records(tmp_path / "r.jsonl") == recs


# ------------------------------------------------------------------------------------ files and batches
def test_dataset_round_trip_and_missing_split_error(tmp_path):
    samples = [(torch.tensor([1, 5, 6, 2]), torch.tensor([-100, -100, 6, 2])), (torch.tensor([1, 7]), torch.tensor([-100, 7]))]
    save_dataset(tmp_path / "train.safetensors", samples, {"prompt_style": "plain", "max_seq_length": 8, "mask_inputs": False})
    ds = InstructionDataset(tmp_path / "train.safetensors")
    assert len(ds) == 2 and ds.metadata["num_samples"] == 2 and ds.metadata["mask_inputs"] is False
    for (ids, labels), item in zip(samples, ds):
        assert torch.equal(item["input_ids"], ids) and torch.equal(item["labels"], labels)
    assert torch.equal(ds[-1]["input_ids"], samples[-1][0])
    with pytest.raises(FileNotFoundError, match=r"no test.safetensors in .*; run scripts/prepare_alpaca.py first"):
        load_splits(tmp_path)
    (tmp_path / "test.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="cannot read"):
        load_splits(tmp_path)


def test_collate_matches_pad_sequence():
    samples = [{"input_ids": torch.arange(1, n + 1), "labels": torch.arange(101, 101 + n)} for n in (5, 2, 7)]
    batch = collate(samples, pad_id=0)
    ref_ids = torch.nn.utils.rnn.pad_sequence([s["input_ids"] for s in samples], batch_first=True, padding_value=0)
    ref_labels = torch.nn.utils.rnn.pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=-100)
    assert torch.equal(batch["input_ids"], ref_ids) and torch.equal(batch["labels"], ref_labels)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long

    cut = collate(samples, pad_id=0, max_seq_length=4)
    assert torch.equal(cut["input_ids"], ref_ids[:, :4]) and torch.equal(cut["labels"], ref_labels[:, :4])
    padded = collate(samples, pad_id=9, pad_to_multiple_of=4)
    assert padded["input_ids"].shape == (3, 8)
    assert padded["input_ids"][1].tolist() == [1, 2] + [9] * 6 and padded["labels"][1].tolist() == [101, 102] + [IGNORE_INDEX] * 6
    assert collate(samples, pad_id=0, max_seq_length=6, pad_to_multiple_of=4)["input_ids"].shape == (3, 6)


def _serve(body: bytes, declared_length: int):
    """A local HTTP server that answers every GET with `body` and a Content-Length of `declared_length`."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(declared_length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_writes_the_served_bytes_and_discards_a_cut_download(tmp_path, monkeypatch):
    from lit_llama.data import download

    monkeypatch.setenv("no_proxy", "127.0.0.1")  # reach the local server even where a proxy is configured

    body = "[{\"instruction\": \"héllo\", \"output\": \"🦙\"}]".encode() * 1000
    server = _serve(body, len(body))
    try:
        url = f"http://127.0.0.1:{server.server_port}/data.json"
        assert download(url, tmp_path / "ok" / "data.json").read_bytes() == body
    finally:
        server.shutdown()
    server = _serve(body[:100], len(body))  # the connection ends before the promised length
    try:
        with pytest.raises(ValueError, match=r"cannot download .* got 100 of \d+ bytes\); if you are offline"):
            download(f"http://127.0.0.1:{server.server_port}/data.json", tmp_path / "cut" / "data.json")
    finally:
        server.shutdown()
    assert files_under(tmp_path / "cut") == []


# ------------------------------------------------------------------ the checkpoint's own chat template
CHAT_RECORDS = [
    {"instruction": "Name three primary colors.", "input": "", "output": "Red, yellow and blue."},
    {"instruction": "Translate to French.", "input": "Good morning, café 🦙", "output": " Bonjour !\n"},
]


@pytest.mark.parametrize("folder, end_token", [("smollm2_chat_dir", "<|im_end|>"), ("llama3_chat_dir", "<|eot_id|>")])
def test_chat_template_data_matches_apply_chat_template(folder, end_token, request, tmp_path):
    """The prompt is apply_chat_template(user turn, add_generation_prompt=True)'s ids; the learned
    labels are exactly the answer and the end token, as apply_chat_template writes the whole exchange."""
    folder = request.getfixturevalue(folder)
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer = Tokenizer.from_checkpoint(folder)
    end_id = auto.convert_tokens_to_ids(end_token)
    for rec in CHAT_RECORDS:
        user = {"role": "user", "content": rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")}
        prompt = auto.apply_chat_template([user], tokenize=True, add_generation_prompt=True, return_dict=False)
        full = auto.apply_chat_template([user, {"role": "assistant", "content": rec["output"]}], tokenize=True,
                                        add_generation_prompt=False, return_dict=False)
        assert full[: len(prompt)] == prompt
        expected = full[: full.index(end_id, len(prompt)) + 1]  # what follows the end token is not learned
        ids, labels, truncated = tokenize_sample(tokenizer, rec, "chat_template", 512)
        assert ids.tolist() == expected and not truncated
        assert labels[: len(prompt)].eq(IGNORE_INDEX).all()
        assert labels[len(prompt):].tolist() == expected[len(prompt):] and labels[-1] == end_id
        # cut short, the end token is the first thing lost
        ids, labels, truncated = tokenize_sample(tokenizer, rec, "chat_template", len(expected) - 1)
        assert truncated and end_id not in labels.tolist()

    summary = prepare_instruction_data(CHAT_RECORDS * 2, tmp_path / "data", folder, test_size=1, prompt_style="chat_template")
    assert summary["prompt_style"] == "chat_template" and summary["tokenizer_path"] == str(folder / "tokenizer.json")
    assert summary["tokenizer_sha256"] == hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    assert summary["chat_template_sha256"] == hashlib.sha256(auto.chat_template.encode()).hexdigest()
    train, _ = load_splits(tmp_path / "data")
    assert train.metadata["prompt_style"] == "chat_template" and train.metadata["tokenizer_vocab_size"] == len(auto)
