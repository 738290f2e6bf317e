"""A training run's output folder: checked before the run, hparams.json, metrics.csv and loss.png
beside what the script saves, and disk errors turned into one-line messages."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from lit_llama.checkpoint import atomic_path, atomic_write_text


class MetricsLog:
    """Append-only CSV of training metrics, flushed every row so a crash keeps what was logged.

    `resume_step`: keep the rows of an earlier run up to that step (those after it are redone)."""

    FIELDS = ("step", "epoch", "samples", "tokens", "train_loss", "val_loss", "lr", "tokens_per_sec", "elapsed_s")

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            self.rows = [row for row in self._read(path) if row["step"] <= resume_step]
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.FIELDS)
                writer.writeheader()
                writer.writerows({k: row.get(k, "") for k in self.FIELDS} for row in self.rows)
            self.file = open(path, "a", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)

    @classmethod
    def _read(cls, path: Path) -> list[dict[str, Any]]:
        """The complete rows of a metrics CSV, numbers parsed (a row cut off by a crash is dropped)."""
        rows = []
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                try:
                    row = {k: (int(v) if k in ("step", "epoch", "samples", "tokens") else float(v))
                           for k, v in raw.items() if k in cls.FIELDS and v not in ("", None)}
                except ValueError:
                    continue
                if "step" in row and None not in raw.values():
                    rows.append(row)
        return rows

    def log(self, **row: Any) -> None:
        self.rows.append(row)
        if self.enabled:
            self.writer.writerow({k: row.get(k, "") for k in self.FIELDS})
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def _plain(v: Any) -> Any:
    if is_dataclass(v):
        return {k: _plain(x) for k, x in asdict(v).items()}
    return str(v) if isinstance(v, Path) else v


def write_hparams(out_dir: Path, hparams: dict[str, Any]) -> None:
    atomic_write_text(out_dir / HPARAMS_NAME, json.dumps({k: _plain(v) for k, v in hparams.items()}, indent=2) + "\n")


HPARAMS_NAME = "hparams.json"
LOCK_NAME = ".run.lock"
# Flags a resumed run may change: how long it trains and how often it reports or saves. Any other
# change would continue one run's training state under another run's settings.
RESUMABLE_CHANGES = {"resume", "overwrite", "train.max_iters", "train.epochs", "train.eval_interval", "train.eval_iters",
                     "train.save_interval", "train.log_interval", "train.keep_last", "sample_instruction", "sample_prompt"}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def claim_out_dir(out_dir: Path, hparams: dict[str, Any], resume: Any, overwrite: bool) -> Any:
    """Make `out_dir` this run's: a lock held while the process lives (a second run into it gets a
    one-line error), a refusal to start fresh over an earlier run unless `overwrite` (which removes
    that run's training states and metrics, nothing else), and, when resuming, a check that the
    earlier run had the same settings but for RESUMABLE_CHANGES. Returns the lock; keep it referenced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = open(out_dir / LOCK_NAME, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ValueError(f"another run is writing to --out_dir {str(out_dir)!r}; wait for it to finish or pass another "
                         "--out_dir") from None
    earlier = out_dir / HPARAMS_NAME
    states = out_dir / "train_state"
    used = earlier.is_file() or (states.is_dir() and any(states.iterdir()))
    if used and resume is None:
        if not overwrite:
            lock.close()
            raise ValueError(f"--out_dir {str(out_dir)!r} holds an earlier run; continue it with --resume auto, replace it "
                             "with --overwrite true, or pass a new --out_dir")
        if states.is_dir() and not states.is_symlink():
            shutil.rmtree(states)
        (out_dir / "metrics.csv").unlink(missing_ok=True)
    elif used and resume == "auto" and earlier.is_file():
        then = _flat(json.loads(earlier.read_text()))
        now = _flat({k: _plain(v) for k, v in hparams.items()})
        changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            lock.close()
            was = ", ".join(f"{k}={then.get(k)}" for k in changed[:4])
            raise ValueError(f"cannot resume {str(out_dir)!r}: {', '.join(changed[:4])} changed since it was saved ({was}); "
                             "resume with the same flags, or start a new --out_dir")
    return lock


def check_out_dir(out_dir: Path) -> None:
    """Create `out_dir` and make sure a file can be written there, before any heavy work starts."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-check.", suffix=".tmp"):
            pass
    except OSError as e:
        raise ValueError(
            f"--out_dir {str(out_dir)!r} is not writable ({e.strerror or type(e).__name__}); pass a folder you can write to"
        ) from None


# Errors of a write that the user fixes by making room or pointing elsewhere, not bugs.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def disk_errors_as_value_errors(what: Path) -> Iterator[None]:
    """Turn a full disk (or a read-only one) while writing `what` into a one-line ValueError."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        raise ValueError(
            f"cannot write {what} ({e.strerror}); free disk space or pass an --out_dir on another disk, then rerun "
            "with --resume auto to continue from the last saved state"
        ) from None


def plot_loss_curve(rows: list[dict[str, Any]], png: Path) -> str:
    """Draw train and validation loss against the step into `png` (written atomically); returns a
    line saying where, or why not. matplotlib is optional (`pip install matplotlib`); without it
    the numbers stay in metrics.csv beside the PNG's place."""
    try:
        fig = loss_figure(rows, title=str(png.parent))
    except ImportError:
        return f"Loss curve not drawn: matplotlib is not installed (pip install matplotlib); the losses are in {png.parent / 'metrics.csv'}"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return f"Loss curve: {png}"


def loss_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """The loss curve as a matplotlib Figure (ImportError without matplotlib)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    losses = []
    for key, label, style in (("train_loss", "train", "-"), ("val_loss", "validation", "o:")):
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), float) and math.isfinite(row[key])]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=4)
            losses += [loss for _, loss in points if loss > 0]
    ax.set(xlabel="optimizer step", ylabel="loss (mean next-token cross-entropy)", title=title)
    ax.set_yscale("log")  # the first steps fall by 10x; the interesting part is the tail
    ax.yaxis.set_major_formatter(ScalarFormatter())  # 0.6, 2, 4 rather than 6 x 10^-1
    # Within one decade the major ticks are too few to read a value off, so the minor ones get labels
    # too; over several decades those labels (9, 8, ... 0.02) would print on top of each other.
    one_decade = bool(losses) and max(losses) / min(losses) <= 10
    ax.yaxis.set_minor_formatter(ScalarFormatter() if one_decade else NullFormatter())
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend()
    return fig
