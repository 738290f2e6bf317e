"""Instruction data: records -> prompt + response tokens with the prompt masked -> dataset files -> batches.

A record is a dict with "instruction", "output" and an optional "input". It becomes
    input_ids = [BOS] + encode(prompt + output) + [EOS]        (cut to max_seq_length)
    labels    = input_ids with the first len([BOS] + encode(prompt)) positions set to IGNORE_INDEX
so the loss only counts the response (and its EOS). Labels are aligned with input_ids, not shifted:
the training loop compares logits[:, :-1] with labels[:, 1:].

SentencePiece may merge the last prompt character with the first response character into one token
(e.g. "### Response:" + "- a" gives the token ":-"); the mask boundary is still the length of the
prompt encoded alone, as in the original lit-llama, so such a merged token counts as prompt.

On disk a split is one .safetensors file (loading it cannot run code, unlike a pickle):
    input_ids  int32 (total_tokens,)  every sample's ids, concatenated
    labels     int32 (total_tokens,)  the same layout, IGNORE_INDEX where masked
    offsets    int64 (N + 1,)         sample i is [offsets[i], offsets[i + 1])
plus string metadata (prompt style, max_seq_length, counts, the tokenizer's vocab size and sha256).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lit_llama.checkpoint import atomic_path, atomic_write_text, save_weights
from lit_llama.generation import generate
from lit_llama.prompts import PromptStyle, TemplateStyle, get_prompt_style, user_content
from lit_llama.samplers import MicroBatchSampler
from lit_llama.tokenizer import Tokenizer

if TYPE_CHECKING:  # only for the annotation: importing lightning takes seconds, data preparation needs none of it
    import lightning as L

IGNORE_INDEX = -100  # the default ignore_index of torch.nn.functional.cross_entropy
SPLITS = ("train", "test")
META_NAME = "prepare_meta.json"
FORMAT_NAME = "lit_llama.instruction_dataset"
FORMAT_VERSION = "1"
_INT_METADATA = ("max_seq_length", "seed", "num_samples", "num_tokens", "num_truncated", "num_no_target", "tokenizer_vocab_size")
_BOOL_METADATA = ("mask_inputs",)


# ------------------------------------------------------------------------------------ tokenizing
def _prompt_and_target(tokenizer: Tokenizer, sample: dict, style: PromptStyle) -> tuple[str, str, bool]:
    """(prompt, target, append_eos): the prompt text, the text after it that is learned, and whether
    EOS follows the target.

    Instruction styles: the output, then EOS. Chat styles: the instruction (and input) is the user
    turn, the output the assistant's; the target is the output as the style writes it, up to and
    including the style's end token (<|im_end|>, <|eot_id|>, ...), which the model must learn to stop
    on. What the style writes after it (a newline, the next header) is dropped. EOS follows only when
    the tokenizer lacks the end token as one token.
    """
    instruction, input, output = sample["instruction"], sample.get("input") or "", sample["output"]
    prompt = style.format(instruction, input)
    if style.end_token is None:
        return prompt, output, True
    user = {"role": "user", "content": user_content(instruction, input)}
    full = style.render([user, {"role": "assistant", "content": output}], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError(f"prompt style {style.name!r} does not write a reply after its own generation prompt "
                         "(the conversation with the answer does not start with the prompt); choose another --prompt_style")
    rest = full[len(prompt):]
    answer_end = rest.find(output.strip()) + len(output.strip()) if output.strip() in rest else 0
    end = rest.find(style.end_token, answer_end)
    if end < 0:
        raise ValueError(f"prompt style {style.name!r} does not end the assistant's turn with {style.end_token!r}; "
                         "choose another --prompt_style")
    return prompt, rest[: end + len(style.end_token)], style.end_id(tokenizer) is None


def _tokenize(
    tokenizer: Tokenizer, sample: dict, style: PromptStyle, max_seq_length: int, mask_inputs: bool
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """(input_ids, labels) cut to max_seq_length, the length before the cut, and whether the prompt's
    tokens are a prefix of the full sample's tokens."""
    prompt, target, append_eos = _prompt_and_target(tokenizer, sample, style)
    ids = tokenizer.encode(prompt + target, bos=style.bos, eos=append_eos)
    prompt_ids = tokenizer.encode(prompt, bos=style.bos, eos=False)
    labels = ids.clone()
    if mask_inputs:
        labels[: len(prompt_ids)] = IGNORE_INDEX
    # False when the first response token merged with the end of the prompt (see the module docstring)
    clean_boundary = len(ids) >= len(prompt_ids) and torch.equal(ids[: len(prompt_ids)], prompt_ids)
    return ids[:max_seq_length], labels[:max_seq_length], len(ids), clean_boundary


def tokenize_sample(
    tokenizer: Tokenizer, sample: dict, style: PromptStyle | str, max_seq_length: int, mask_inputs: bool = True
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One record -> (input_ids (T,), labels (T,), truncated), both LongTensors with T <= max_seq_length.

    With `mask_inputs` the prompt positions of `labels` are IGNORE_INDEX; `truncated` says whether
    the sample was longer than `max_seq_length` and was cut (its EOS or end token is then lost).
    """
    ids, labels, full_length, _ = _tokenize(tokenizer, sample, get_prompt_style(style, tokenizer), max_seq_length, mask_inputs)
    return ids, labels, full_length > max_seq_length


# ------------------------------------------------------------------------------------ dataset files
def save_dataset(
    path: Path | str, samples: Sequence[tuple[torch.Tensor, torch.Tensor]], metadata: dict[str, Any] | None = None
) -> None:
    """Write (input_ids, labels) pairs to one .safetensors file, atomically (layout: module docstring)."""
    lengths = [len(ids) for ids, _ in samples]
    for i, (ids, labels) in enumerate(samples):
        if len(ids) != len(labels):
            raise ValueError(f"sample {i}: {len(ids)} input_ids but {len(labels)} labels")
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    tensors = {
        "input_ids": _concat_int32([ids for ids, _ in samples]),
        "labels": _concat_int32([labels for _, labels in samples]),
        "offsets": offsets,
    }
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "num_samples": len(samples),
            "num_tokens": int(offsets[-1])}
    meta.update(metadata or {})
    save_weights(tensors, path, metadata={k: _to_str(v) for k, v in meta.items()})


def _concat_int32(tensors: list[torch.Tensor]) -> torch.Tensor:
    # int32 halves the file; token ids and IGNORE_INDEX fit easily
    return torch.cat(tensors).to(torch.int32) if tensors else torch.zeros(0, dtype=torch.int32)


def _to_str(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class InstructionDataset(Dataset):
    """A split written by `save_dataset`; item i is dict(input_ids=LongTensor (T,), labels=LongTensor (T,))."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"dataset file {str(self.path)!r} does not exist; run scripts/prepare_alpaca.py first")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                raw_meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # not a safetensors file, truncated, ...
            raise ValueError(f"cannot read {self.path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}; "
                             "prepare the data again") from None
        missing = [k for k in ("input_ids", "labels", "offsets") if k not in tensors]
        if raw_meta.get("format") != FORMAT_NAME or missing:
            raise ValueError(f"{self.path} is not a lit_llama instruction dataset (missing {missing or 'format tag'}); "
                             "prepare it with scripts/prepare_alpaca.py, prepare_dolly.py or prepare_json.py")
        self.input_ids, self.labels, self.offsets = tensors["input_ids"], tensors["labels"], tensors["offsets"]
        if (len(self.input_ids) != len(self.labels) or len(self.offsets) < 1 or int(self.offsets[-1]) != len(self.input_ids)
                or bool((self.offsets.diff() < 0).any())):
            raise ValueError(f"{self.path} is inconsistent (offsets do not match the token arrays); prepare the data again")
        self.metadata: dict[str, Any] = {
            k: int(v) if k in _INT_METADATA else (v == "true") if k in _BOOL_METADATA else v for k, v in raw_meta.items()
        }

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        i = i % len(self)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.input_ids[start:end].long(), "labels": self.labels[start:end].long()}

    @property
    def lengths(self) -> torch.Tensor:
        """Every sample's length in tokens, (N,)."""
        return self.offsets.diff()


def split_path(data_dir: Path | str, split: str) -> Path:
    return Path(data_dir) / f"{split}.safetensors"


def load_splits(data_dir: Path | str) -> tuple[InstructionDataset, InstructionDataset]:
    """(train, test) from a directory written by a prepare script; a one-line error when they are missing."""
    data_dir = Path(data_dir)
    missing = [split_path(data_dir, s).name for s in SPLITS if not split_path(data_dir, s).is_file()]
    if missing:
        old = " (its train.pt/test.pt are pickles from an older lit-llama and are not loaded)" if (data_dir / "train.pt").exists() else ""
        raise FileNotFoundError(
            f"no {' or '.join(missing)} in {str(data_dir)!r}{old}; run scripts/prepare_alpaca.py first "
            "(or prepare_dolly.py / prepare_json.py, see howto/prepare_data.md)"
        )
    train, test = (InstructionDataset(split_path(data_dir, s)) for s in SPLITS)
    return train, test


# ------------------------------------------------------------------------------------ batching
def collate(
    samples: Sequence[dict[str, torch.Tensor]], pad_id: int, max_seq_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into dict(input_ids (B, T), labels (B, T)).

    input_ids are padded with `pad_id`, labels with IGNORE_INDEX, to the longest sample; samples are
    first cut to `max_seq_length`; T is rounded up to a multiple of `pad_to_multiple_of` (never
    beyond `max_seq_length`).
    """
    if not samples:
        raise ValueError("collate got an empty batch")
    ids = [s["input_ids"][:max_seq_length] for s in samples]
    labels = [s["labels"][:max_seq_length] for s in samples]
    for i, (x, y) in enumerate(zip(ids, labels)):
        if len(x) != len(y):
            raise ValueError(f"sample {i} of the batch has {len(x)} input_ids but {len(y)} labels")
    T = max(len(x) for x in ids)
    if pad_to_multiple_of:
        T = math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of
        if max_seq_length is not None:
            T = min(T, max_seq_length)
    batch_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)  # (B, T)
    batch_labels = torch.full((len(ids), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, (x, y) in enumerate(zip(ids, labels)):
        batch_ids[i, : len(x)] = x
        batch_labels[i, : len(y)] = y
    return {"input_ids": batch_ids, "labels": batch_labels}


# ------------------------------------------------------------------------------------ reading records
def load_records(
    path: Path | str, required_keys: Sequence[str] = ("instruction", "output"), optional_keys: Sequence[str] = ("input",)
) -> list[dict]:
    """Records from a JSON file (a list of objects) or a JSONL file (one object per line).

    Every record must hold each of `required_keys` as a string; each of `optional_keys`, when present,
    must be a string or null. Anything else is a one-line ValueError naming the record and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; check --data_file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate a byte order mark, as editors on Windows write one
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line} (byte {e.start}); "
                         "re-save the file as UTF-8") from None
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path} is empty; it should hold a JSON list of records or one JSON record per line")

    records: list[Any]
    where: list[str]  # how to point at each record in an error message
    if path.suffix != ".jsonl" and stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        where = [f"record {i}" for i in range(len(records))]
    else:  # JSON Lines
        records, where = [], []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"line {lineno} of {path} is not valid JSON: {e.msg} at column {e.colno} "
                                 "(expected a JSON list, or one JSON object per line)") from None
            where.append(f"record {len(records) - 1} (line {lineno})")
    if not records:
        raise ValueError(f"{path} holds no records")

    for rec, at in zip(records, where):
        if not isinstance(rec, dict):
            raise ValueError(f"{at} of {path} is a JSON {type(rec).__name__}, not an object with "
                             f"{'/'.join(repr(k) for k in required_keys)} keys")
        for key in required_keys:
            if key not in rec:
                raise ValueError(f'{at} of {path} has no "{key}" key; every record needs '
                                 f"{', '.join(repr(k) for k in required_keys)}")
            if not isinstance(rec[key], str):
                raise ValueError(f'{at} of {path}: "{key}" is a {type(rec[key]).__name__}, expected a string')
        for key in optional_keys:
            if rec.get(key) is not None and not isinstance(rec[key], str):
                raise ValueError(f'{at} of {path}: "{key}" is a {type(rec[key]).__name__}, expected a string or null')
    return records


def split_train_test(records: Sequence[Any], test_size: int | float, seed: int) -> tuple[list, list]:
    """Shuffle with `seed` and split into (train, test); `test_size` is a count (int) or a fraction in (0, 1)."""
    n = len(records)
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise ValueError(f"--test_size must be a count or a fraction, got {test_size!r}")
    if isinstance(test_size, float):
        if not 0 < test_size < 1:
            raise ValueError(f"--test_size {test_size} as a fraction must be between 0 and 1 (or pass a count)")
        n_test = max(1, round(n * test_size))
    else:
        n_test = test_size
    if not 1 <= n_test < n:
        raise ValueError(f"--test_size {test_size} gives {n_test} test records out of {n}; both splits need at least "
                         "one record, pass a smaller count or a fraction such as 0.05")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in order[n_test:]], [records[i] for i in order[:n_test]]


def download(url: str, path: Path | str, timeout: float = 60.0) -> Path:
    """Download `url` to `path` (atomically, with a progress bar); a one-line error when offline."""
    path = Path(path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(path) as tmp, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {path.name}", file=sys.stderr) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            if total is not None and bar.n != total:  # a dropped connection; atomic_path discards the file
                raise ConnectionError(f"got {bar.n} of {total} bytes")
    # URLError, HTTPError, timeouts and refused connections are OSErrors; a connection cut mid-body
    # raises http.client.IncompleteRead, an HTTPException
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
        raise ValueError(f"cannot download {url} ({reason}); if you are offline, get the file elsewhere "
                         "and pass it with --data_file") from None
    return path


# ------------------------------------------------------------------------------------ the prepare step
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_data_tokenizer(metadata: dict[str, Any], tokenizer: Tokenizer, data_dir: Path | str) -> None:
    """A one-line error when the data was tokenized with another tokenizer than the model's: its ids
    would mean other words, or index rows the model does not have (an IndexError mid-training)."""
    recorded = metadata.get("tokenizer_sha256")
    if recorded and recorded != _sha256(Path(tokenizer.path)):
        raise ValueError(
            f"{str(data_dir)!r} was tokenized with another tokenizer ({metadata.get('tokenizer_vocab_size')} tokens, sha256 "
            f"{recorded[:12]}) than this checkpoint's {Path(tokenizer.path).name} ({tokenizer.vocab_size} tokens); prepare "
            "the data again with this --checkpoint_dir"
        )


def dataset_special_tokens(metadata: dict[str, Any]) -> tuple[str, ...]:
    """The special tokens a prepared dataset's records were tokenized with (none: ())."""
    return tuple(json.loads(metadata.get("special_tokens") or "[]"))


def prepare_instruction_data(
    records: Sequence[dict],
    destination_path: Path | str,
    checkpoint_dir: Path | str,
    tokenizer_path: Path | str | None = None,
    source: str = "",
    test_size: int | float = 0.05,
    max_seq_length: int = 256,
    mask_inputs: bool = True,
    seed: int = 42,
    prompt_style: str | PromptStyle = "alpaca",
    special_tokens: Sequence[str] = (),
) -> dict[str, Any]:
    """Split, tokenize and write records (dicts with instruction/output and optional input) to
    destination_path/{train,test}.safetensors plus prepare_meta.json; returns that summary.

    `special_tokens` extend the tokenizer (lit_llama/tokenizer.py): each occurrence in the records
    becomes one new id. The list is stored with the data; finetune/lora.py grows the embedding and
    head to match, trains them, and stores the list in the adapter.

    Everything is checked and tokenized before the first file is written, so a bad input leaves
    destination_path as it was.
    """
    t0 = time.perf_counter()
    destination_path, checkpoint_dir = Path(destination_path), Path(checkpoint_dir)
    if max_seq_length < 2:
        raise ValueError(f"--max_seq_length must be at least 2 (a prompt token and a target), got {max_seq_length}")
    if destination_path.exists() and not destination_path.is_dir():
        raise ValueError(f"--destination_path {str(destination_path)!r} is a file; pass a directory")
    if tokenizer_path is None and not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"--checkpoint_dir {str(checkpoint_dir)!r} does not exist (the data is tokenized with its "
                                "tokenizer.model or tokenizer.json); pass the converted checkpoint, or --tokenizer_path")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer {str(tokenizer_path)!r} does not exist; pass a tokenizer.model or tokenizer.json "
                                "file, or leave --tokenizer_path out to use the checkpoint's")
    tokenizer = Tokenizer.from_checkpoint(checkpoint_dir, tokenizer_path, special_tokens)
    style = get_prompt_style(prompt_style, tokenizer)
    train, test = split_train_test(records, test_size, seed)
    common = {"prompt_style": style.name, "max_seq_length": max_seq_length, "mask_inputs": mask_inputs,
              "tokenizer_vocab_size": tokenizer.vocab_size, "tokenizer_sha256": _sha256(tokenizer.path),
              "source": source, "seed": seed}
    if isinstance(style, TemplateStyle):  # the template is part of the format the model learns
        common["chat_template_sha256"] = hashlib.sha256(style.template.encode("utf-8")).hexdigest()
    if special_tokens:  # only when given, so that data prepared without them reads as before
        common["special_tokens"] = json.dumps(list(special_tokens))

    stats: dict[str, dict[str, int]] = {}
    encoded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    boundary_merges = 0
    longest = 0
    for split, recs in (("train", train), ("test", test)):
        samples, n_truncated, n_no_target = [], 0, 0
        for rec in tqdm(recs, desc=f"tokenizing {split}", unit="sample", file=sys.stderr):
            ids, labels, full_length, clean = _tokenize(tokenizer, rec, style, max_seq_length, mask_inputs)
            samples.append((ids, labels))
            n_truncated += full_length > max_seq_length
            n_no_target += bool((labels == IGNORE_INDEX).all())
            boundary_merges += not clean
            longest = max(longest, full_length)
        encoded[split] = samples
        stats[split] = {"num_samples": len(samples), "num_tokens": sum(len(ids) for ids, _ in samples),
                        "num_truncated": n_truncated, "num_no_target": n_no_target}

    for split in SPLITS:
        save_dataset(split_path(destination_path, split), encoded[split], {
            **common, "split": split, "num_truncated": stats[split]["num_truncated"],
            "num_no_target": stats[split]["num_no_target"]})
    summary = {**common, "tokenizer_path": str(tokenizer.path), "test_size": test_size, "splits": stats,
               "boundary_merges": boundary_merges, "longest_sample_tokens": longest,
               "seconds": round(time.perf_counter() - t0, 3)}
    atomic_write_text(destination_path / META_NAME, json.dumps(summary, indent=2) + "\n")

    n_trunc = sum(s["num_truncated"] for s in stats.values())
    n_all = len(train) + len(test)
    print(f"train: {len(train)} samples ({stats['train']['num_tokens']:,} tokens), "
          f"test: {len(test)} samples ({stats['test']['num_tokens']:,} tokens)")
    print(f"truncated to {max_seq_length} tokens: {n_trunc} of {n_all} samples ({100 * n_trunc / n_all:.1f}%); "
          f"longest sample {longest} tokens")
    if boundary_merges:
        print(f"{boundary_merges} samples tokenize the end of the prompt and the start of the response into one token; "
              "it is masked as prompt")
    n_no_target = sum(s["num_no_target"] for s in stats.values())
    if n_no_target:
        print(f"warning: {n_no_target} samples have no target token left after truncation; raise --max_seq_length")
    print(f"wrote {destination_path}/{{train,test}}.safetensors and {META_NAME} in {summary['seconds']:.2f} s")
    return summary


def instruction_dataloaders(
    fabric: L.Fabric, data_dir: Path, micro_batch_size: int, pad_id: int, seed: int
) -> tuple[DataLoader, DataLoader, dict[str, Any]]:
    """Epoch-based loaders over the prepared train/test splits (each sample once per epoch, reshuffled)."""
    train_set, val_set = load_splits(data_dir)
    for name, split in (("train", train_set), ("test", val_set)):
        if len(split) == 0:
            raise ValueError(f"the {name} split in {str(data_dir)!r} holds no samples; prepare the data again with more records")
    if not bool((train_set.labels != IGNORE_INDEX).any()):
        raise ValueError(
            f"no training sample in {str(data_dir)!r} has a response token left (max_seq_length "
            f"{train_set.metadata.get('max_seq_length')} cut them all off); prepare the data again with a larger --max_seq_length"
        )
    collate_fn = partial(collate, pad_id=pad_id)
    # Each epoch's order comes from (seed, epoch) alone, so --resume can continue inside an epoch;
    # whole micro-batches are dealt to the ranks, so the global batches do not depend on --devices.
    sampler = MicroBatchSampler(len(train_set), micro_batch_size, shuffle=True, seed=seed,
                                num_replicas=fabric.world_size, rank=fabric.global_rank)
    train_loader = DataLoader(train_set, batch_size=micro_batch_size, sampler=sampler, collate_fn=collate_fn,
                              generator=sampler.loader_generator)
    # The sampler already shards by rank; Fabric's DistributedSampler wrapper would shard it again.
    train_loader = fabric.setup_dataloaders(train_loader, use_distributed_sampler=False)
    # A private generator: each iter() draws a seed from it, not from the global RNG dropout uses.
    val_loader = DataLoader(val_set, batch_size=micro_batch_size, shuffle=False, collate_fn=collate_fn,
                            generator=torch.Generator().manual_seed(seed))
    val_loader = fabric.setup_dataloaders(val_loader)
    return train_loader, val_loader, dict(train_set.metadata)


# ------------------------------------------------- text samples of a model in training, for eyeballing
def instruction_sampler(
    tokenizer, prompt_style: str, instruction: str, max_new_tokens: int = 64
) -> Callable[[torch.nn.Module], str]:
    """A function that greedily answers `instruction` with the model in training, for eyeballing progress."""
    style = get_prompt_style(prompt_style, tokenizer)
    return greedy_sampler(tokenizer, style.format(instruction), max_new_tokens, bos=style.bos,
                          stop_ids=style.stop_ids(tokenizer))


def greedy_sampler(
    tokenizer, prompt: str, max_new_tokens: int, keep_prompt: bool = False, bos: bool = True,
    stop_ids: Sequence[int] | None = None,
) -> Callable[[torch.nn.Module], str]:
    """A function that greedily continues `prompt` with the model in training (the continuation, or
    prompt + continuation with `keep_prompt`), then puts the model back in training mode. It stops
    at `stop_ids` (default: the tokenizer's)."""
    def sample(model: torch.nn.Module) -> str:
        inner = getattr(model, "module", model)
        device = next(inner.parameters()).device
        ids = tokenizer.encode(prompt, bos=bos, device=device)
        budget = min(max_new_tokens, inner.config.block_size - len(ids))
        if budget <= 0:
            return ""
        inner.eval()
        out = generate(inner, [ids], budget, temperature=0,
                       stop_ids=tokenizer.stop_ids if stop_ids is None else stop_ids, pad_id=tokenizer.pad_id)[0]
        inner.clear_kv_cache()
        inner.train()
        return tokenizer.decode(out if keep_prompt else out[len(ids):])

    return sample
