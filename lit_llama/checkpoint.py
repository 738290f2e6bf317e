"""Checkpoint directories: how weights and configs are written and read.

A checkpoint is a self-describing directory:
    lit_config.json                           the LLaMAConfig
    lit_model.safetensors | lit_model.pth     the weights (tied models store wte only, not lm_head)
    tokenizer.model                           the SentencePiece model, when one was given
    checksums.sha256                          the weights file's sha256 (`sha256sum -c` format), written by
                                              save_checkpoint; `verify_checkpoint` (scripts/verify_checkpoint.py)
                                              checks it and that every tensor is finite

Reading is always safe (safetensors, or torch.load with weights_only=True) and memory-mapped, into
a model built on the meta device, so a model is never held twice in memory. Every write goes to a
temporary file in the same directory, is fsynced and then renamed, so a crash never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lit_llama.json_file import read_json
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.tokenizer import HF_TOKENIZER_FILES, SPECIAL_TOKENS_NAME, TOKENIZER_NAME

CONFIG_NAME = "lit_config.json"
WEIGHT_NAMES = ("lit_model.safetensors", "lit_model.pth")
CHECKSUMS_NAME = "checksums.sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as given; the message says what to do."""


# ----------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path`.
    On any error (Ctrl-C included) the temporary file is removed and `path` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))  # before the OS names the temporary file
    make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the final file normal permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_folder(folder: Path | str) -> None:
    """`folder.mkdir(parents=True, exist_ok=True)`, with a file in the way said as such (the OS says
    "File exists" about the file, which reads as if the output itself existed)."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise NotADirectoryError(f"{str(p)!r} is a file, so nothing can be written inside it")
            break
    folder.mkdir(parents=True, exist_ok=True)


def check_output_dir(path: Path | str, own_files: Sequence[str]) -> None:
    """A one-line error, before anything is written, unless `path` is new, empty, or holds nothing but
    files matching `own_files` (names or glob patterns of what this writer writes: a rerun replaces
    them). A file at `path`, a symlink or a folder of other files is never written into."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        make_folder(path.parent)
        return
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"{str(path)!r} exists and is not a folder; pass a new folder (nothing was written)")
    foreign = sorted(n for n in os.listdir(path) if not any(fnmatch.fnmatchcase(n, pattern) for pattern in own_files))
    if foreign:
        raise CheckpointError(f"{str(path)!r} exists and holds other files than this script writes ({foreign[0]!r}, ...); "
                              "pass a new folder (nothing was written)")


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_copy(src: Path | str, dst: Path | str) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def save_config(config: LLaMAConfig, checkpoint_dir: Path | str) -> None:
    atomic_write_text(Path(checkpoint_dir) / CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")


def save_weights(state_dict: dict[str, torch.Tensor], path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to `path` (.safetensors or .pth) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            write_safetensors_streaming(((k, lambda t=t: t) for k, t in state_dict.items()), _specs(state_dict), tmp, metadata)
        else:
            torch.save({k: v.contiguous() for k, v in state_dict.items()}, tmp)


def model_state_dict(model: LLaMA) -> dict[str, torch.Tensor]:
    """The model's tensors as stored in a checkpoint: a tied head is stored once, as wte."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


# What save_checkpoint may write into a folder; a folder holding anything else is not replaced.
TOKENIZER_FILES = (TOKENIZER_NAME, SPECIAL_TOKENS_NAME, *HF_TOKENIZER_FILES)
CHECKPOINT_FILES = {CONFIG_NAME, *WEIGHT_NAMES, CHECKSUMS_NAME, *TOKENIZER_FILES}


@contextlib.contextmanager
def atomic_dir(path: Path | str, own_files: Sequence[str] = tuple(CHECKPOINT_FILES), what: str = "a checkpoint's",
               ) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it takes `path`'s name, so the folder
    appears there whole or not at all. An existing folder at `path` is replaced only if it holds
    nothing but `own_files` (a checkpoint's: a resumed run saving its result again); otherwise a
    one-line error, before anything is written (`check_output_dir`). On any error the temporary
    folder is removed."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or path.is_symlink() or set(os.listdir(path)) - set(own_files)):
        raise CheckpointError(f"{str(path)!r} exists and holds other files than {what}; "
                              "pass a new folder (nothing was written)")
    make_folder(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes a 0700 folder; give the final one normal permissions
        yield tmp
        if path.exists():  # move the old one aside first: a folder cannot be renamed onto a full one
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=".tmp", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    model: LLaMA,
    checkpoint_dir: Path | str,
    tokenizer_path: Path | str | None = None,
    weights_name: str = "lit_model.safetensors",
    tokenizer_dir: Path | str | None = None,
    special_tokens: Sequence[str] = (),
) -> Path:
    """Write a complete checkpoint directory for `model` (whole or not at all: `atomic_dir`); returns
    the weights path. The tokenizer comes from `tokenizer_dir` (every tokenizer file a checkpoint
    folder holds: tokenizer.model, tokenizer.json and its configs, special_tokens.json) or is the
    SentencePiece file `tokenizer_path`; `special_tokens` (a merged adapter's) are written beside it."""
    checkpoint_dir = Path(checkpoint_dir)
    with atomic_dir(checkpoint_dir) as tmp:
        save_weights(model_state_dict(model), tmp / weights_name)
        write_checksums(tmp / weights_name)
        save_config(model.config, tmp)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_NAME)
        if special_tokens:
            (tmp / SPECIAL_TOKENS_NAME).write_text(json.dumps(list(special_tokens)) + "\n")
    return checkpoint_dir / weights_name


def write_checksums(weights: Path) -> None:
    """checksums.sha256 beside `weights`, in `sha256sum -c`'s format, for `verify_checkpoint`. The file
    is read back once (at disk speed, from the page cache): the checksum is of the bytes on disk."""
    atomic_write_text(weights.parent / CHECKSUMS_NAME, f"{file_sha256(weights)}  {weights.name}\n")


def file_sha256(path: Path | str, chunk: int = 1 << 24) -> str:
    """The sha256 of a file, read in 16 MiB chunks (a checkpoint larger than RAM costs no memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _specs(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {k: (v.dtype, tuple(v.shape)) for k, v in state_dict.items()}


def write_safetensors_streaming(
    tensors: Iterator[tuple[str, Callable[[], torch.Tensor]]],
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    path: Path | str,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a .safetensors file one tensor at a time.

    `specs` gives every tensor's dtype and shape up front, so the header (which holds all offsets)
    can be written first; then each tensor is produced by its callable, written and dropped. Peak
    memory is one tensor, which is what lets the converters stream checkpoints larger than RAM.
    The layout is the safetensors format: u64 header length, JSON header, raw little-endian data.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, (dtype, shape) in specs.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format asks for 8-byte alignment
    written = set()
    order = iter(specs)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, make in tensors:
            expected = next(order, None)
            if name != expected:  # the header's offsets follow `specs`, so the data must too
                raise ValueError(f"tensor {name} written out of order; {expected} comes next in specs")
            dtype, shape = specs[name]
            t = make()
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"tensor {name}: got {t.dtype} {tuple(t.shape)}, promised {dtype} {shape}")
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")  # no extra copy
            written.add(name)
            del t
    if written != set(specs):
        raise ValueError(f"tensors promised but not written: {sorted(set(specs) - written)}")


# ----------------------------------------------------------------------------------------- reading
def find_weights(checkpoint_dir: Path | str) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(
            f"checkpoint directory {str(checkpoint_dir)!r} does not exist; pass the folder a convert_*.py script wrote"
        )
    for name in WEIGHT_NAMES:
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    raise CheckpointError(
        f"no {' or '.join(WEIGHT_NAMES)} in {str(checkpoint_dir)!r}; convert a checkpoint into it first "
        "(see howto/convert_checkpoints.md)"
    )


def load_config(checkpoint_dir: Path | str) -> LLaMAConfig:
    if not Path(checkpoint_dir).is_dir():
        raise CheckpointError(
            f"checkpoint directory {str(checkpoint_dir)!r} does not exist; pass the folder a convert_*.py script wrote"
        )
    path = Path(checkpoint_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {str(checkpoint_dir)!r}; is this a directory written by lit_llama?")
    fields = read_json(path, remedy="convert the checkpoint again")
    try:
        return LLaMAConfig(**fields)
    except (TypeError, ValueError) as e:  # an unknown field, or a value LLaMAConfig refuses
        raise CheckpointError(f"{path} is not a valid LLaMA config ({e}); convert the checkpoint again") from None


def runs_code_if_loaded(e: Exception) -> bool:
    """Did torch.load(weights_only=True) refuse a pickle that holds other objects than tensors?"""
    return isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e)


# Said instead of torch's own message, which ends by suggesting weights_only=False: the unsafe way.
REFUSED_PICKLE = ("refused: it is a pickle holding Python objects besides tensors, and loading it could run code; "
                  "save the tensors again as a plain dict of tensors (safetensors, or torch.save of a state dict)")


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    if runs_code_if_loaded(e):
        return CheckpointError(f"cannot read weights from {path}: {REFUSED_PICKLE}")
    return CheckpointError(
        f"cannot read weights from {path}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; "
        "the file is damaged or incomplete: download or convert it again"
    )


def load_weights(path: Path | str, device: torch.device | str = "cpu", mmap: bool = True) -> dict[str, torch.Tensor]:
    """Read tensors safely: safetensors, or torch.load(weights_only=True). mmap=True (lazy) maps the
    file; mmap=False reads every tensor into memory of its own, for a caller that will replace the
    tensors (`pack_linear_weights`): a mapped tensor keeps the file's pages resident while any tensor
    of the file lives, so replacing them one by one would hold two copies at the peak."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            if mmap or torch.device(device).type != "cpu":
                return load_file(path, device=str(device))
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
            tensors = {}
            for name in names:  # one short-lived map per tensor: its pages are released after the copy
                with safe_open(str(path), framework="pt") as f:
                    tensors[name] = f.get_tensor(name).clone()
            return tensors
        return torch.load(path, map_location=device, mmap=mmap, weights_only=True)
    except Exception as e:  # a truncated file, a pickle with code in it, not a checkpoint at all
        raise _unreadable(path, e) from None


def open_weights(path: Path | str) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """A weights file's tensor names and a getter that reads one tensor when asked (for streaming
    converters): safetensors' lazy reader, or a memory-mapped weights_only torch.load."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            f = safe_open(str(path), framework="pt", device="cpu")
            return list(f.keys()), f.get_tensor
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise _unreadable(path, e) from None
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} holds a {type(state_dict).__name__}, not a dict of tensors; is it a checkpoint?")
    return list(state_dict), state_dict.__getitem__


def check_keys(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], allowed_missing: set[str] = frozenset()) -> None:
    """Strict key check: missing (beyond `allowed_missing`) or unexpected keys are an error naming them."""
    expected = set(model.state_dict())
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state_dict) - set(allowed_missing))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
            )
        raise CheckpointError(
            "checkpoint does not match the model: " + "; ".join(parts)
            + "; lit_config.json and the weights come from different models: convert the checkpoint again"
        )
    own = model.state_dict()
    for k, v in state_dict.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"checkpoint does not match the model: {k} has shape {tuple(v.shape)}, the config needs "
                f"{tuple(own[k].shape)}; lit_config.json and the weights come from different models: convert it again"
            )


def load_into(model: LLaMA, state_dict: dict[str, torch.Tensor], allowed_missing: set[str] = frozenset(),
              dtype: torch.dtype | None = None) -> None:
    """Load `state_dict` into `model` (typically built on the meta device) by assignment, strictly."""
    check_keys(model, state_dict, allowed_missing)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.tie_weights()  # assignment replaced wte's Parameter; point the head at the new one


def load_model(
    checkpoint_dir: Path | str, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    model_fn: Callable[[LLaMAConfig], LLaMA] = LLaMA, allowed_missing: set[str] = frozenset(), mmap: bool = True,
    config: LLaMAConfig | None = None,
) -> LLaMA:
    """Build the model of `checkpoint_dir` on the meta device and assign its weights (no extra copy).

    `model_fn` builds a variant (e.g. a LoRA model), whose extra keys are then `allowed_missing`
    and are initialised by the caller. `mmap`: as in `load_weights`. `config`: the checkpoint's
    config when the caller has read it already (`load_config`), so that it is read once.
    """
    config = config or load_config(checkpoint_dir)
    weights = find_weights(checkpoint_dir)
    device = torch.device(device or "cpu")
    state_dict = load_weights(weights, device="cpu" if device.type == "meta" else device, mmap=mmap)
    with torch.device("meta"):
        model = model_fn(config)
    load_into(model, state_dict, allowed_missing, dtype)
    return model.eval()


def read_checksums(checkpoint_dir: Path | str) -> dict[str, str]:
    """checksums.sha256 as {file name: sha256}; {} when the checkpoint has none (converted, or older)."""
    path = Path(checkpoint_dir) / CHECKSUMS_NAME
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise CheckpointError(f"{path} is not in sha256sum's format ('<sha256>  <file>' per line); save the checkpoint again")
        sums[name] = digest
    return sums


def verify_checkpoint(checkpoint_dir: Path | str) -> dict[str, object]:
    """Check a checkpoint's weights against checksums.sha256 (when it has one) and that every floating
    tensor is finite, one tensor in memory at a time; a CheckpointError names the damaged file or the
    tensor with NaN/inf. Returns what was checked: tensors, bytes, whether a checksum was compared."""
    weights = find_weights(checkpoint_dir)
    recorded = read_checksums(checkpoint_dir).get(weights.name)
    if recorded is not None and file_sha256(weights) != recorded:
        raise CheckpointError(f"{weights} fails its checksum: its bytes changed since it was saved (a damaged copy or "
                              "disk); copy or convert the checkpoint again")
    names, get = open_weights(weights)
    for name in names:
        try:
            t = get(name)
        except Exception as e:  # a header that promises more bytes than the file holds
            raise _unreadable(weights, e) from None
        # A NaN or inf anywhere makes the sum non-finite; a finite sum clears the tensor at the cost of one
        # read (an elementwise check costs a mask as big as the tensor). A sum that overflows is checked again.
        if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float32))) and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{weights} holds non-finite values (NaN or inf) in {name}: the training that wrote it "
                                  "diverged; use an earlier checkpoint")
    return {"weights": str(weights), "tensors": len(names), "bytes": weights.stat().st_size,
            "checksum": "matches" if recorded is not None else "none recorded"}
