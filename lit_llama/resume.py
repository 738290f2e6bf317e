"""Resumable training: the state a run needs to continue exactly where it stopped.

`fit` (lit_llama/training.py) writes a training state every `save_interval` steps and at the end,
into `out_dir/train_state/`:
    state-000012.safetensors   the trainable weights ("param.NAME"), the optimizer's tensors
                               ("optim.PARAM_INDEX.KEY", e.g. AdamW's exp_avg) and the torch RNG
                               states ("rng.torch", "rng.cuda.N", "gen.NAME"), each with a leading
                               rank dimension (one row per device)
    state-000012.json          counters (step, epoch, position in the epoch, tokens, samples, ...),
                               the optimizer's param_groups, the python/numpy RNG states, the size
                               and sha256 of the .safetensors file, and the sha256 of this JSON body
    latest                     the name of the newest state ("state-000012")
Only safe formats are used (safetensors and JSON), so loading a state cannot run code. Each file is
written to a temporary `.NAME.*.tmp` beside it, fsynced and renamed; the JSON is written after the
tensors, so it is the commit record: a state without a valid JSON never counts. The newest
`keep_last` states are kept. On resume the state named by `latest` is checked (JSON hash, tensor
file size and hash); if it is truncated or corrupt, a warning names it and the previous good state
is used.

The data order must be reproducible for a resumed run to see the batches an uninterrupted run
would: `EpochSampler` draws each epoch's permutation from (seed, epoch) alone and can start part-way
through an epoch, so resuming skips the micro-batches already consumed without reading them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file

from lit_llama.checkpoint import atomic_write_text, save_weights
from lit_llama.run_dir import disk_errors_as_value_errors

FORMAT = "lit_llama.train_state.v1"
STATE_DIR = "train_state"
LATEST = "latest"
_STATE_RE = re.compile(r"^state-(\d+)\.json$")
_TEMP_RE = re.compile(r"^\..+\.[^.]+\.tmp$")  # what checkpoint.atomic_path names its temporary files


class ResumeError(ValueError):
    """A training state that cannot be used as given; the message says what to do."""


# ------------------------------------------------------------------------------------- data order

# ------------------------------------------------------------------------------------- RNG states
def capture_rng(generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The process's RNG states: torch's (CPU, every CUDA device) and named generators as uint8
    tensors; python's and numpy's as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    for name, g in (generators or {}).items():
        tensors[f"gen.{name}"] = g.get_state()
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    for name, g in (generators or {}).items():
        if f"gen.{name}" not in tensors:
            raise ResumeError(f"the training state has no RNG state for generator {name!r}; it was saved by another script")
        g.set_state(tensors[f"gen.{name}"])
    version, mt, gauss = plain["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------- optimizer
def to_json(value: Any) -> Any:
    """JSON that keeps tuples apart from lists (AdamW's betas are a tuple)."""
    if isinstance(value, tuple):
        return {"__tuple__": [to_json(v) for v in value]}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return {"__float__": repr(value)}
    return value


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(from_json(v) for v in value["__tuple__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """optimizer.state_dict() -> tensors {"optim.IDX.KEY": t} and JSON (param_groups, other state values)."""
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu()
            else:
                other.setdefault(str(idx), {})[key] = to_json(value)
    return tensors, {"param_groups": to_json(state_dict["param_groups"]), "state": other}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    for idx, values in plain["state"].items():
        state.setdefault(int(idx), {}).update(from_json(values))
    return {"state": state, "param_groups": from_json(plain["param_groups"])}


# ------------------------------------------------------------------------------------- files
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _body_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable (a rename is only atomic, not yet on disk)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def state_step(path: Path) -> int:
    return int(_STATE_RE.match(path.name).group(1))


def list_states(state_dir: Path) -> list[Path]:
    """The state manifests (state-N.json) in `state_dir`, oldest first."""
    if not state_dir.is_dir():
        return []
    return sorted((p for p in state_dir.iterdir() if _STATE_RE.match(p.name)), key=state_step)


def save_train_state(
    state_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, counters: dict[str, Any],
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]], keep_last: int = 2,
) -> Path:
    """Write state-{step}.safetensors, then state-{step}.json, then `latest`; keep the newest
    `keep_last` states. `rng` is (tensors with a leading rank dimension, JSON) from `capture_rng`."""
    name = f"state-{step:06d}"
    tensors = {f"param.{n}": p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    optim_tensors, optim_plain = flatten_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors.update(rng[0])
    # 0-dim tensors (AdamW's step) are stored as (1,) and named in the manifest: the streaming
    # safetensors writer views each tensor as bytes, which a 0-dim tensor does not allow.
    scalars = sorted(k for k, t in tensors.items() if t.dim() == 0)
    tensors = {k: t.reshape(1) if k in scalars else t for k, t in tensors.items()}
    tensors_path = state_dir / f"{name}.safetensors"
    save_weights(tensors, tensors_path, metadata={"format": FORMAT})
    body = {
        "format": FORMAT,
        "step": step,
        "counters": to_json(counters),
        "optimizer": optim_plain,
        "rng": rng[1],
        "scalars": scalars,
        "tensors": {"file": tensors_path.name, "bytes": tensors_path.stat().st_size, "sha256": sha256_file(tensors_path)},
    }
    manifest = state_dir / f"{name}.json"
    atomic_write_text(manifest, json.dumps({**body, "body_sha256": _body_hash(body)}) + "\n")
    atomic_write_text(state_dir / LATEST, name + "\n")
    _fsync_dir(state_dir)
    prune_states(state_dir, keep_last)
    return manifest


def prune_states(state_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` states (manifest first, so a half-deleted state is never valid).
    A state folder that is a link is left alone: what it points at is not this run's to delete."""
    if state_dir.is_symlink():
        return
    keep = {p.stem for p in list_states(state_dir)[-max(keep_last, 1):]}
    for manifest in list_states(state_dir):
        if manifest.stem not in keep:
            manifest.unlink(missing_ok=True)
    for tensors in state_dir.glob("state-*.safetensors"):
        if tensors.stem not in keep:
            tensors.unlink(missing_ok=True)


def discard_states_after(state_dir: Path, step: int) -> None:
    """Delete the states newer than `step` (the corrupt ones a resume skipped): the resumed run
    writes them again, and they must not take the places that `keep_last` keeps."""
    if state_dir.is_symlink():  # as in prune_states: not this run's to delete
        return
    for manifest in list_states(state_dir):
        if state_step(manifest) > step:
            manifest.unlink(missing_ok=True)
            manifest.with_suffix(".safetensors").unlink(missing_ok=True)


def verify_state(manifest: Path) -> dict[str, Any]:
    """The parsed manifest of a complete, intact state; ResumeError saying what is wrong otherwise."""
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"{manifest.name} is unreadable ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ResumeError(f"{manifest.name} is not a {FORMAT} file")
    claimed = doc.pop("body_sha256", None)
    if claimed != _body_hash(doc):
        raise ResumeError(f"{manifest.name} fails its checksum")
    tensors = manifest.parent / doc["tensors"]["file"]
    if not tensors.is_file():
        raise ResumeError(f"{tensors.name} is missing")
    size = tensors.stat().st_size
    if size != doc["tensors"]["bytes"]:
        raise ResumeError(f"{tensors.name} has {size} bytes, its manifest says {doc['tensors']['bytes']} (truncated?)")
    if sha256_file(tensors) != doc["tensors"]["sha256"]:
        raise ResumeError(f"{tensors.name} fails its sha256 check (corrupt)")
    return doc


def find_good_state(state_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact state in `state_dir`: the one `latest` names, else (with a warning for
    each bad one) the previous good one. None when there is no state at all; ResumeError when
    there are states and none is intact."""
    candidates = list(reversed(list_states(state_dir)))
    pointer = state_dir / LATEST
    if pointer.is_file():
        named = state_dir / f"{pointer.read_text().strip()}.json"
        if named in candidates:  # `latest` first; it is the newest unless a save was cut short
            candidates.remove(named)
            candidates.insert(0, named)
    if not candidates:
        return None
    problems = []
    for manifest in candidates:
        try:
            return manifest, verify_state(manifest)
        except ResumeError as e:
            problems.append(str(e))
            warnings.warn(f"training state {manifest} is unusable: {e}; trying the previous one", stacklevel=2)
    raise ResumeError(
        f"no intact training state in {state_dir} ({'; '.join(problems)}); delete that folder to start over"
    )


def load_train_state(
    manifest: Path, doc: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """Copy the state's trainable weights into `model` and its optimizer state into `optimizer`
    (`doc` from `verify_state`); returns the RNG tensors for the caller to restore."""
    path = manifest.parent / doc["tensors"]["file"]
    try:
        tensors = load_file(path)  # safetensors: reading it cannot run code, unlike a pickle
    except Exception as e:
        raise ResumeError(f"cannot read {path} as safetensors ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                          "delete that state to resume from an earlier one") from None
    for k in doc["scalars"]:
        tensors[k] = tensors[k].reshape(())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ResumeError(
            f"the training state in {manifest.parent} was saved for another model or other trainable parameters "
            f"(missing {missing[:2]}, unexpected {extra[:2]}); resume with the flags of that run, or use a new --out_dir"
        )
    for name, p in params.items():
        if p.shape != saved[name].shape:
            raise ResumeError(
                f"the training state in {manifest.parent} does not fit the model: {name} is {tuple(saved[name].shape)}, "
                f"the model has {tuple(p.shape)}; resume with the flags of that run, or use a new --out_dir"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")}, doc["optimizer"]))
    return {k: v for k, v in tensors.items() if k.startswith(("rng.", "gen."))}


def resolve_resume(resume: Path | Literal["auto"] | None, out_dir: Path) -> Path | None:
    """The train_state folder to resume from: `auto` is out_dir's (when it has one); a path may be a
    previous run's out_dir, its train_state folder, or a state-N.json in it."""
    if resume is None:
        return None
    if resume == "auto":
        return out_dir / STATE_DIR
    resume = Path(resume)
    if resume.is_file() and _STATE_RE.match(resume.name):
        return resume
    for candidate in (resume / STATE_DIR, resume):
        if list_states(candidate):
            return candidate
    raise ResumeError(
        f"--resume {str(resume)!r} holds no training state ({STATE_DIR}/state-*.json); pass the --out_dir of the run "
        "to continue, or --resume auto to continue if a state exists and start fresh otherwise"
    )


def clean_stale_temps(directory: Path) -> list[Path]:
    """Remove the `.NAME.*.tmp` files an interrupted atomic write left in `directory` and its
    immediate subfolders; returns what was removed. Links are never followed or removed: a linked
    folder's files were not written by this run."""
    removed = []
    if not directory.is_dir():
        return removed
    for folder in [directory, *(p for p in directory.iterdir() if p.is_dir() and not p.is_symlink())]:
        for p in folder.iterdir():
            if not p.is_symlink() and p.is_file() and _TEMP_RE.match(p.name):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ------------------------------------------------------------------------ what fit saves and restores
@dataclass
class Progress:
    """Where a run stands: the counters `fit` keeps, what a training state records besides tensors."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # 0-based index of the epoch in progress
    micro_in_epoch: int = 0  # micro-batches of that epoch consumed
    tokens: int = 0  # trained tokens over all ranks, as of the last sync
    samples: int = 0
    last_val: float = float("nan")
    running_loss: list[torch.Tensor] = field(default_factory=list)  # losses since the last log line, on the device
    elapsed_s: float = 0.0


def _gather_rng(fabric: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's RNG tensors stacked along a leading rank dimension (on rank 0's side)."""
    if fabric.world_size == 1:
        return {k: t[None] for k, t in tensors.items()}
    return {k: fabric.all_gather(t.to(fabric.device)).cpu() for k, t in tensors.items()}


def _rank_mean(fabric: Any, losses: list[torch.Tensor]) -> list[float]:
    """Each logged-but-not-yet-averaged loss, averaged over the ranks (a resumed run restores the
    same list on every rank, so its next logged mean is the mean an uninterrupted run logs)."""
    if not losses:
        return []
    return fabric.all_reduce(torch.stack(losses), reduce_op="mean").tolist()


def save_run_state(
    fabric: Any, out_dir: Path, progress: Progress, micro_per_epoch: int, extra: dict[str, Any],
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator] | None,
    keep_last: int,
) -> None:
    """The training state after `progress.step` optimizer steps (the RNG as the next step will find
    it), written by rank 0 into out_dir/train_state; `extra` (total_steps, geometry) is stored with
    the counters. Every rank must call it."""
    at_end = progress.micro_in_epoch >= micro_per_epoch  # the next step starts the next epoch
    counters = dict(step=progress.step, epoch=progress.epoch + at_end, micro_in_epoch=0 if at_end else progress.micro_in_epoch,
                    tokens=progress.tokens, samples=progress.samples, last_val=progress.last_val,
                    running_loss=_rank_mean(fabric, progress.running_loss), elapsed_s=progress.elapsed_s, **extra)
    rng_tensors, rng_plain = capture_rng(generators)
    rng_tensors = _gather_rng(fabric, rng_tensors)
    if fabric.global_rank == 0:
        state_dir = out_dir / STATE_DIR
        with disk_errors_as_value_errors(state_dir):
            save_train_state(state_dir, progress.step, model, optimizer, counters, (rng_tensors, rng_plain), keep_last)
    fabric.barrier()


def restore_run(
    fabric: Any, resume: Path | Literal["auto"], out_dir: Path, geometry: dict[str, Any],
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator] | None,
) -> tuple[Progress, Path | None]:
    """Continue from a training state: "auto" is out_dir's newest intact one (a fresh start if there
    is none), a path that run's. Restores the trainable weights, the optimizer, this rank's RNG
    states and the named `generators`; returns the counters and the state's path (None: fresh).
    `geometry` (batch sizes, devices, data) must equal the saved one for the batches to line up."""
    state_dir = out_dir / STATE_DIR
    if fabric.global_rank == 0:
        for p in clean_stale_temps(out_dir):
            fabric.print(f"Removed {p}, left by an interrupted write")
    source = resolve_resume(resume, out_dir)
    found = (source, verify_state(source)) if source.is_file() else find_good_state(source)
    if found is None:
        fabric.print(f"No training state in {source}: starting from scratch")
        return Progress(), None
    resumed_from, doc = found
    c = from_json(doc["counters"])
    if c["geometry"] != geometry:
        changed = sorted(k for k in geometry if c["geometry"].get(k) != geometry[k])
        then = ", ".join(f"{k}={c['geometry'].get(k)}" for k in changed)
        raise ValueError(
            f"cannot resume from {resumed_from}: {', '.join(changed)} changed since it was saved ({then}); "
            "resume with the same data, batch sizes, devices and seed, or start a new --out_dir"
        )
    rng = load_train_state(resumed_from, doc, model, optimizer)
    if fabric.global_rank == 0 and resumed_from.parent.resolve() == state_dir.resolve():
        discard_states_after(state_dir, c["step"])
    rank_rng = {}
    for k, t in rng.items():
        if t.size(0) != fabric.world_size:
            raise ValueError(f"cannot resume from {resumed_from}: it holds RNG states of {t.size(0)} devices, "
                             f"this run has {fabric.world_size}; resume with --devices {t.size(0)}")
        # A copy: torch.set_rng_state misreads a view at a storage offset (rank > 0: "Invalid
        # mt19937 state" or a segfault, torch 2.13).
        rank_rng[k] = t[fabric.global_rank].clone()
    restore_rng(rank_rng, doc["rng"], generators)
    progress = Progress(step=c["step"], epoch=c["epoch"], micro_in_epoch=c["micro_in_epoch"], tokens=c["tokens"],
                        samples=c["samples"], last_val=c["last_val"],
                        running_loss=[torch.tensor(x, device=fabric.device) for x in c["running_loss"]],
                        elapsed_s=c["elapsed_s"])
    return progress, resumed_from
