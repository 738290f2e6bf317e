"""The one training loop, shared by finetune/lora.py, finetune/full.py and pretrain/.

Scripts differ in what they build (a LoRA model, a full model, a model from scratch), which
parameters they hand to the optimizer, and what `save` writes. Everything else lives here: the
learning-rate schedule, gradient accumulation, clipping, validation, logging and checkpoint cadence,
and the multi-device pieces (Fabric strategies ddp/fsdp/deepspeed, building and loading a model
under FSDP, gathering its shards for saving; howto/multi_gpu.md).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from lit_llama.resume import EpochSampler


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training script (flags --train.NAME).

    Args:
        learning_rate: Peak learning rate (AdamW), reached after warmup.
        min_lr: Learning rate at the end of the cosine decay.
        batch_size: Samples per optimizer step over all devices; a multiple of micro_batch_size x devices.
        micro_batch_size: Samples per forward/backward pass; gradients accumulate up to batch_size.
        epochs: Passes over the training set (ignored when max_iters is given).
        max_iters: Optimizer steps to run; overrides epochs when given.
        warmup_steps: Optimizer steps of linear learning-rate warmup.
        weight_decay: AdamW weight decay.
        grad_clip: Clip the gradient norm to this value (None: no clipping).
        eval_interval: Optimizer steps between validations.
        eval_iters: Validation micro-batches per validation.
        save_interval: Optimizer steps between checkpoint saves.
        log_interval: Optimizer steps between metric log lines.
        keep_last: Training states (for --resume) kept in out_dir/train_state, the newest; 0 writes none.
    """

    learning_rate: float = 3e-4
    min_lr: float = 0.0
    batch_size: int = 128
    micro_batch_size: int = 4
    epochs: int = 3
    max_iters: int | None = None
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    eval_interval: int = 100
    eval_iters: int = 100
    save_interval: int = 100
    log_interval: int = 1
    keep_last: int = 2

    def validate(self, devices: int = 1) -> None:
        for name in ("batch_size", "micro_batch_size", "epochs", "eval_interval", "eval_iters", "save_interval", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--train.{name} must be a positive integer, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--train.learning_rate must be positive, got {self.learning_rate}; try 3e-4")
        if self.max_iters is not None and self.max_iters <= 0:
            raise ValueError(f"--train.max_iters must be a positive number of optimizer steps, got {self.max_iters}")
        if self.keep_last < 0:
            raise ValueError(f"--train.keep_last must be >= 0 (0: no training states, no --resume), got {self.keep_last}")
        if self.warmup_steps < 0:
            raise ValueError(f"--train.warmup_steps must be >= 0, got {self.warmup_steps}")
        per_step = self.micro_batch_size * devices
        if self.batch_size % per_step:
            raise ValueError(
                f"--train.batch_size {self.batch_size} must be a multiple of micro_batch_size x devices = {per_step}; "
                f"try --train.batch_size {max(per_step, self.batch_size // per_step * per_step)}"
            )

    def accumulation_steps(self, devices: int = 1) -> int:
        return self.batch_size // (self.micro_batch_size * devices)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay from learning_rate to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.learning_rate - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[t+1] from position t; label -100 is ignored.

    logits (B, T, V), labels (B, T). Computed in fp32 whatever the logits' dtype. A batch with no
    target at all (every response cut off by max_seq_length) gives 0, not the NaN of 0/0, which
    would poison the weights through the backward pass.
    """
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    total = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets, ignore_index=-100, reduction="sum"
    )
    return total / (targets != -100).sum().clamp(min=1)


def masked_next_token_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int = 128
) -> torch.Tensor:
    """`next_token_loss(model(input_ids), labels)`, computed without the logits nobody needs.

    An instruction sample's prompt and padding carry label -100: often half the positions. Only the
    others go through the head, the model's largest matmul (C x V), and with a frozen plain head
    (LoRA finetuning) their fp32 log-probabilities exist one chunk of `chunk_size` rows at a time
    (`FrozenHeadCrossEntropy`) instead of as one (B*T, V) fp32 tensor, plus its gradient.
    `model` is a LLaMA, possibly wrapped (Fabric, DDP): it must accept `return_hidden=True`.
    """
    hidden = model(input_ids, return_hidden=True)  # (B, T, C)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != -100
    hidden, targets = hidden[:, :-1][keep], targets[keep]  # (N, C), (N,)
    head = model.lm_head
    if type(head) is torch.nn.Linear and not head.weight.requires_grad:
        total = FrozenHeadCrossEntropy.apply(hidden, head.weight, targets, chunk_size)
    else:  # a head with LoRA, or trained in full: plain autograd through it
        total = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    # No target at all (every response cut off): 0 with a graph, not the NaN of 0/0.
    return total / targets.numel() if targets.numel() else total * 0.0


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, t_i) for a frozen head W (N, C) -> scalar, chunk by chunk.

    The forward also computes the gradient with respect to the hidden states, (softmax - one_hot) W,
    while each chunk's softmax is at hand, so the backward needs no logits and recomputes nothing:
    no (n, V) fp32 tensor outlives its loop iteration. W gets no gradient (it is frozen)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        weight = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # (N, C); none in validation
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]  # (n, C), (n,)
            logprobs = (h @ weight.T).float().log_softmax(-1)  # (n, V), fp32 for the softmax
            total -= logprobs.gather(1, t[:, None]).sum()
            if grad_hidden is not None:
                grad_logits = logprobs.exp_()  # softmax, in place of the log-probs
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1  # d CE / d logits
                grad_hidden[start:start + chunk_size] = grad_logits.to(h.dtype) @ weight  # (n, C)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def batch_loss(fabric: L.Fabric, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training/validation loss of one micro-batch. Sharded strategies (FSDP, DeepSpeed) gather a
    module's weights only inside the wrapped forward, so there the head stays inside it (full logits)."""
    if is_fsdp(fabric) or is_deepspeed(fabric):
        return next_token_loss(model(batch["input_ids"]), batch["labels"])
    with fabric.autocast():  # the head runs outside the wrapped forward, under the same precision
        return masked_next_token_loss(model, batch["input_ids"], batch["labels"])


@torch.no_grad()
def validate(fabric: L.Fabric, model: torch.nn.Module, loader: DataLoader, max_iters: int) -> float:
    model.eval()
    losses = []
    for i, batch in enumerate(loader):
        if i >= max_iters:
            break
        losses.append(batch_loss(fabric, model, batch))
    model.train()
    loss = torch.stack(losses).mean() if losses else torch.tensor(float("nan"))
    return fabric.all_reduce(loss, reduce_op="mean").item()


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
            from lit_llama.checkpoint import atomic_path

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


def write_hparams(out_dir: Path, hparams: dict[str, Any]) -> None:
    from lit_llama.checkpoint import atomic_write_text

    def plain(v: Any) -> Any:
        if is_dataclass(v):
            return {k: plain(x) for k, x in asdict(v).items()}
        return str(v) if isinstance(v, Path) else v

    atomic_write_text(out_dir / "hparams.json", json.dumps({k: plain(v) for k, v in hparams.items()}, indent=2) + "\n")


def check_out_dir(out_dir: Path) -> None:
    """Create `out_dir` and make sure a file can be written there, before any heavy work starts."""
    import tempfile

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


def _rank_mean(fabric: L.Fabric, losses: list[torch.Tensor]) -> list[float]:
    """Each logged-but-not-yet-averaged loss, averaged over the ranks (a resumed run restores the
    same list on every rank, so its next logged mean is the mean an uninterrupted run logs)."""
    if not losses:
        return []
    return fabric.all_reduce(torch.stack(losses), reduce_op="mean").tolist()


def _gather_rng(fabric: L.Fabric, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's RNG tensors stacked along a leading rank dimension (on rank 0's side)."""
    if fabric.world_size == 1:
        return {k: t[None] for k, t in tensors.items()}
    return {k: fabric.all_gather(t.to(fabric.device)).cpu() for k, t in tensors.items()}


def fit(
    fabric: L.Fabric,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    cfg: TrainConfig,
    out_dir: Path,
    save: Callable[[Path], None],
    sample: Callable[[torch.nn.Module], str] | None = None,
    checkpoint_name: str = "checkpoint",
    resume: Path | Literal["auto"] | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Train until `max_iters` optimizer steps or `epochs` epochs; returns the final metrics.

    `save(path_stem)` writes whatever the script keeps (an adapter, a checkpoint directory); it is
    called every `save_interval` steps with `out_dir/iter-XXXXXX-<checkpoint_name>` and at the end
    with `out_dir/<checkpoint_name>`. `sample(model)` returns a text generated after each validation.

    Resuming: when `train_loader` samples with `lit_llama.resume.EpochSampler` (build it with
    `resumable_dataloader`), a training state (trainable weights, optimizer, counters, position in
    the epoch, RNG states and the named `generators`, e.g. a dataset's own) is written to
    `out_dir/train_state/` next to every `save`. `resume` continues from one: "auto" from
    out_dir's newest intact state if there is one (else a fresh start), a path from that run's.
    A resumed run ends with the same weights as an uninterrupted one (same device and settings).

    Several devices (`setup_fabric(strategy=...)`): each optimizer step takes micro_batch_size x
    accumulation samples on every rank; with `instruction_dataloaders`' `MicroBatchSampler` the
    result does not depend on the number of devices. Under FSDP and DeepSpeed no training states
    are written (their shards are not on rank 0) and `resume` is refused; under FSDP `sample` is
    skipped (rank 0 cannot run a sharded model alone).
    """
    from lit_llama import resume as rs

    accum = cfg.accumulation_steps(fabric.world_size)
    if len(train_loader) < accum:
        raise ValueError(
            f"the training set gives {len(train_loader)} micro-batches per epoch, fewer than the {accum} that one "
            f"optimizer step of --train.batch_size {cfg.batch_size} needs; lower --train.batch_size or add data"
        )
    steps_per_epoch = len(train_loader) // accum
    micro_per_epoch = steps_per_epoch * accum  # the partial accumulation at an epoch's end is dropped
    total_steps = cfg.max_iters or cfg.epochs * steps_per_epoch
    inner = getattr(model, "module", model)
    sampler = rs.epoch_sampler(train_loader)
    # FSDP and DeepSpeed shard the weights or the optimizer state over the ranks: rank 0 alone
    # cannot write a training state that resumes, and (FSDP) cannot run the model on its own.
    sharded = is_fsdp(fabric) or is_deepspeed(fabric)
    if sharded and resume is not None:
        raise ValueError(_NO_SHARDED_RESUME.format(strategy="fsdp" if is_fsdp(fabric) else "deepspeed"))
    if is_deepspeed(fabric) and accum > 1:  # its engine steps and scales on its own accumulation count
        raise ValueError(
            f"--strategy deepspeed runs without gradient accumulation here; set --train.batch_size to "
            f"micro_batch_size x devices = {cfg.micro_batch_size * fabric.world_size}"
        )
    if sample is not None and is_fsdp(fabric):
        fabric.print("Sample generation is off under FSDP (every rank holds only a shard of the model)")
        sample = None
    state_dir = out_dir / rs.STATE_DIR
    # What must not change between a run and its resumption for the batches to line up.
    geometry = dict(micro_batch_size=cfg.micro_batch_size, accumulation=accum, world_size=fabric.world_size,
                    micro_batches_per_epoch=len(train_loader), sampler=sampler.describe() if sampler else None)

    step = epoch = micro_in_epoch = 0  # epoch: 0-based index of the epoch in progress
    tokens = samples = 0
    running_loss: list[torch.Tensor] = []  # losses since the last log line, kept on the device (no sync)
    last_val = float("nan")
    elapsed_before = 0.0
    resumed_from = None
    if resume is not None:
        if sampler is None:
            raise ValueError(
                "this script's training DataLoader cannot restore its position in an epoch; build it with "
                "lit_llama.resume.resumable_dataloader to use --resume"
            )
        if fabric.global_rank == 0:
            for p in rs.clean_stale_temps(out_dir):
                fabric.print(f"Removed {p}, left by an interrupted write")
        source = rs.resolve_resume(resume, out_dir)
        found = (source, rs.verify_state(source)) if source.is_file() else rs.find_good_state(source)
        if found is None:
            fabric.print(f"No training state in {source}: starting from scratch")
        else:
            resumed_from, doc = found
            c = rs.from_json(doc["counters"])
            if c["geometry"] != geometry:
                changed = sorted(k for k in geometry if c["geometry"].get(k) != geometry[k])
                then = ", ".join(f"{k}={c['geometry'].get(k)}" for k in changed)
                raise ValueError(
                    f"cannot resume from {resumed_from}: {', '.join(changed)} changed since it was saved ({then}); "
                    "resume with the same data, batch sizes, devices and seed, or start a new --out_dir"
                )
            rng = rs.load_train_state(resumed_from, doc, inner, optimizer)
            if fabric.global_rank == 0 and resumed_from.parent.resolve() == state_dir.resolve():
                rs.discard_states_after(state_dir, c["step"])
            step, epoch, micro_in_epoch = c["step"], c["epoch"], c["micro_in_epoch"]
            tokens, samples, last_val = c["tokens"], c["samples"], c["last_val"]
            running_loss = [torch.tensor(x, device=fabric.device) for x in c["running_loss"]]
            elapsed_before = c["elapsed_s"]
            rank_rng = {}
            for k, t in rng.items():
                if t.size(0) != fabric.world_size:
                    raise ValueError(f"cannot resume from {resumed_from}: it holds RNG states of {t.size(0)} devices, "
                                     f"this run has {fabric.world_size}; resume with --devices {t.size(0)}")
                # A copy: torch.set_rng_state misreads a view at a storage offset (rank > 0: "Invalid
                # mt19937 state" or a segfault, torch 2.13).
                rank_rng[k] = t[fabric.global_rank].clone()
            rs.restore_rng(rank_rng, doc["rng"], generators)
            fabric.print(f"Resumed from {resumed_from}: step {step}, epoch {epoch + 1}, "
                         f"micro-batch {micro_in_epoch} of {micro_per_epoch}")

    metrics = MetricsLog(out_dir / "metrics.csv", enabled=fabric.global_rank == 0,
                         resume_step=step if resumed_from else None)
    fabric.print(
        f"Training {total_steps} optimizer steps: {len(train_loader.dataset)} samples, {steps_per_epoch} steps per epoch, "
        f"batch {cfg.batch_size} = {cfg.micro_batch_size} x {accum} accumulation x {fabric.world_size} device(s)"
    )

    def sync_tokens() -> None:
        """Add the tokens every rank trained on since the last call (ranks pad to different lengths)."""
        nonlocal tokens, tokens_since_log, pending_tokens
        total = int(fabric.all_reduce(torch.tensor(pending_tokens, device=fabric.device), reduce_op="sum"))
        tokens, tokens_since_log, pending_tokens = tokens + total, tokens_since_log + total, 0

    def save_state() -> None:
        """The training state after `step` optimizer steps (the RNG as the next step will find it)."""
        if sampler is None or cfg.keep_last == 0 or sharded:
            return
        sync_tokens()
        at_end = micro_in_epoch >= micro_per_epoch  # the next step starts the next epoch
        counters = dict(step=step, epoch=epoch + at_end, micro_in_epoch=0 if at_end else micro_in_epoch,
                        tokens=tokens, samples=samples, last_val=last_val, running_loss=_rank_mean(fabric, running_loss),
                        elapsed_s=time.perf_counter() - t_start, total_steps=total_steps, geometry=geometry)
        rng_tensors, rng_plain = rs.capture_rng(generators)
        rng_tensors = _gather_rng(fabric, rng_tensors)
        if fabric.global_rank == 0:
            with disk_errors_as_value_errors(state_dir):
                rs.save_train_state(state_dir, step, inner, optimizer, counters, (rng_tensors, rng_plain), cfg.keep_last)
        fabric.barrier()

    def save_output(stem: Path) -> None:
        with disk_errors_as_value_errors(stem):
            save(stem)

    t_start = t_log = time.perf_counter() - elapsed_before
    tokens_since_log = pending_tokens = 0
    if val_loader is not None and resumed_from is None:
        last_val = validate(fabric, model, val_loader, cfg.eval_iters)
        metrics.log(step=0, epoch=0, val_loss=last_val, elapsed_s=0.0)
        fabric.print(f"step 0: val loss {last_val:.4f}")
    # Redirected to a file, a bar redrawn ten times a second fills it with carriage returns: draw rarely.
    progress = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=fabric.global_rank != 0,
                    file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30)
    model.train()
    try:
        while step < total_steps:
            if sampler is not None:
                sampler.set_position(epoch, micro_in_epoch * cfg.micro_batch_size)
            for micro_step, batch in enumerate(train_loader, start=micro_in_epoch):
                if micro_step >= micro_per_epoch:
                    break
                is_accumulating = (micro_step + 1) % accum != 0
                with fabric.no_backward_sync(model, enabled=is_accumulating):
                    loss = batch_loss(fabric, model, batch)
                    fabric.backward(loss / accum)
                running_loss.append(loss.detach())
                micro_in_epoch = micro_step + 1
                pending_tokens += batch["input_ids"].numel()  # this rank's; summed over the ranks by sync_tokens
                samples += batch["input_ids"].size(0) * fabric.world_size
                if is_accumulating:
                    continue

                lr = lr_at(step, total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if cfg.grad_clip is not None and not is_deepspeed(fabric):  # DeepSpeed clips inside its step
                    fabric.clip_gradients(model, optimizer, max_norm=cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update(1)

                if step % cfg.log_interval == 0 or step == total_steps:
                    sync_tokens()
                    # Averaged over the ranks too: each saw its own micro-batches of the global batch.
                    train_loss = fabric.all_reduce(torch.stack(running_loss).mean(), reduce_op="mean").item()
                    running_loss.clear()
                    now = time.perf_counter()
                    tps = tokens_since_log / max(now - t_log, 1e-9)
                    t_log, tokens_since_log = now, 0
                    progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
                    metrics.log(step=step, epoch=epoch + 1, samples=samples, tokens=tokens, train_loss=train_loss, lr=lr,
                                tokens_per_sec=tps, elapsed_s=now - t_start)
                if val_loader is not None and (step % cfg.eval_interval == 0 or step == total_steps):
                    last_val = validate(fabric, model, val_loader, cfg.eval_iters)
                    metrics.log(step=step, epoch=epoch + 1, val_loss=last_val, elapsed_s=time.perf_counter() - t_start)
                    progress.write(f"step {step}: val loss {last_val:.4f}", file=sys.stderr)
                    if sample is not None and fabric.global_rank == 0:
                        progress.write(f"sample: {sample(model)!r}", file=sys.stderr)
                if step % cfg.save_interval == 0 and step < total_steps:
                    save_output(out_dir / f"iter-{step:06d}-{checkpoint_name}")
                    save_state()
                if step >= total_steps:
                    break
            if step < total_steps:  # the epoch ran out: the next one starts from its first micro-batch
                epoch, micro_in_epoch = epoch + 1, 0
    finally:  # the bar and the CSV are closed before an error message is printed
        progress.close()
        metrics.close()
    sync_tokens()
    save_output(out_dir / checkpoint_name)
    save_state()  # a finished run resumed again only re-saves its result
    elapsed = time.perf_counter() - t_start
    result = dict(steps=step, epochs=epoch + 1, tokens=tokens, samples=samples, val_loss=last_val, elapsed_s=elapsed,
                  tokens_per_sec=tokens / max(elapsed, 1e-9), history=metrics.rows)
    fabric.print(
        f"Done: {step} steps, {tokens} trained tokens in {elapsed:.1f} s ({result['tokens_per_sec']:.0f} tokens/s), "
        f"final val loss {last_val:.4f}"
    )
    if fabric.global_rank == 0:
        fabric.print(plot_loss_curve(metrics.rows, out_dir / "loss.png"))
    return result


def plot_loss_curve(rows: list[dict[str, Any]], png: Path) -> str:
    """Draw train and validation loss against the step into `png` (written atomically); returns a
    line saying where, or why not. matplotlib is optional (`pip install matplotlib`); without it
    the numbers stay in metrics.csv beside the PNG's place."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return f"Loss curve not drawn: matplotlib is not installed (pip install matplotlib); the losses are in {png.parent / 'metrics.csv'}"
    from lit_llama.checkpoint import atomic_path

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for key, label, style in (("train_loss", "train", "-"), ("val_loss", "validation", "o:")):
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), float) and math.isfinite(row[key])]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=4)
    ax.set(xlabel="optimizer step", ylabel="loss (mean next-token cross-entropy)", title=str(png.parent))
    ax.set_yscale("log")  # the first steps fall by 10x; the interesting part is the tail
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(ScalarFormatter())  # 0.6, 2, 4 rather than 6 x 10^-1
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return f"Loss curve: {png}"


# ----------------------------------------------------------------- pieces the finetune scripts share
Strategy = Literal["auto", "ddp", "fsdp", "deepspeed"]
_NO_SHARDED_RESUME = (
    "--resume is not supported with --strategy {strategy} (its weights or optimizer state are sharded over the "
    "devices, so no resumable training state is written); train with --strategy ddp to be able to resume"
)


def check_strategy(strategy: str, accelerator: str, resume: Any = None) -> None:
    """One-line errors for a strategy that cannot run here, before anything heavy starts."""
    if strategy not in ("auto", "ddp", "fsdp", "deepspeed"):
        raise ValueError(f"--strategy must be auto, ddp, fsdp or deepspeed, got {strategy!r}")
    if strategy in ("fsdp", "deepspeed") and resume is not None:
        raise ValueError(_NO_SHARDED_RESUME.format(strategy=strategy))
    if strategy == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError("--strategy deepspeed needs the deepspeed package: pip install deepspeed")
    if strategy in ("fsdp", "deepspeed") and (accelerator == "cpu" or not torch.cuda.is_available()):
        raise ValueError(f"--strategy {strategy} needs CUDA GPUs; on CPU use --strategy ddp (or auto)")


def make_strategy(
    strategy: Strategy, activation_checkpointing: bool = False, grad_clip: float | None = None
) -> str | Any:
    """What Fabric's `strategy=` gets for a --strategy flag.

    fsdp: every `Block` is its own FSDP unit (gathered for its forward/backward, sharded again
    after), so a GPU holds the full weights of one Block at a time. `use_orig_params=True` lets a
    flat parameter hold frozen base weights and trainable LoRA matrices together (their
    requires_grad may differ). Modules built on the meta device are materialised on the GPU unit
    by unit by `_materialize_on_device`. activation_checkpointing recomputes each Block's
    activations in the backward pass instead of storing them.
    deepspeed: ZeRO stage 2 (optimizer state and gradients sharded, weights replicated); it clips
    gradients itself, so `grad_clip` goes into its config.
    """
    if strategy == "fsdp":
        from lightning.fabric.strategies import FSDPStrategy

        from lit_llama.model import Block

        return FSDPStrategy(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            state_dict_type="full",
            sharding_strategy="FULL_SHARD",
            use_orig_params=True,
            param_init_fn=_materialize_on_device,
        )
    if strategy == "deepspeed":
        from lightning.fabric.strategies import DeepSpeedStrategy

        ds = DeepSpeedStrategy(stage=2)
        if grad_clip is not None:
            ds.config["gradient_clipping"] = grad_clip
        return ds
    if activation_checkpointing:
        raise ValueError("--activation_checkpointing needs --strategy fsdp; drop the flag or switch strategy")
    return strategy


def _materialize_on_device(module: torch.nn.Module) -> None:
    """FSDP's `param_init_fn`: give a module built on the meta device real (uninitialised) memory on
    this rank's GPU, and initialise what no checkpoint will overwrite: the LoRA matrices. The
    base weights are loaded afterwards by `load_sharded`. (FSDP's default calls
    `reset_parameters()`, which RMSNorm and MergedLinear do not have.)"""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # Swap the tensors into the existing Parameters rather than making new ones: a tied head and
    # embedding share one Parameter, and must still share it afterwards.
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        module.to_empty(device=device, recurse=False)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    if hasattr(module, "reset_lora_parameters"):
        with torch.no_grad():
            module.reset_lora_parameters()


def is_fsdp(fabric: L.Fabric) -> bool:
    from lightning.fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy)


def is_deepspeed(fabric: L.Fabric) -> bool:
    from lightning.fabric.strategies import DeepSpeedStrategy

    return isinstance(fabric.strategy, DeepSpeedStrategy)


def setup_fabric(
    accelerator: str = "auto", devices: int = 1, precision: str = "32-true", seed: int = 1337,
    strategy: Strategy = "auto", activation_checkpointing: bool = False, grad_clip: float | None = None,
) -> L.Fabric:
    """Fabric(devices, precision, strategy) -> launch -> seed_everything. Precision the device lacks
    is a clear error. With several devices every rank runs the script; the same seed on each gives
    every rank the same initial (LoRA) weights."""
    if precision == "16-mixed" and accelerator == "cpu":
        raise ValueError("--precision 16-mixed needs a GPU; on CPU use 32-true, bf16-true or bf16-mixed")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError("--accelerator cuda was asked for but no CUDA device is available; use --accelerator cpu")
    if devices < 1:
        raise ValueError(f"--devices must be at least 1, got {devices}")
    check_strategy(strategy, accelerator)
    fabric = L.Fabric(accelerator=accelerator, devices=devices, precision=precision,
                      strategy=make_strategy(strategy, activation_checkpointing, grad_clip))
    fabric.launch()
    fabric.seed_everything(seed)
    return fabric


def setup_model_and_optimizer(
    fabric: L.Fabric, model: torch.nn.Module, make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
) -> tuple[Any, Any]:
    """fabric.setup in the order the strategy needs; `make_optimizer(trainable parameters)`.

    FSDP wraps (and materialises, and shards) the model first, and the optimizer is then built on
    the parameters FSDP keeps; DeepSpeed wants both at once; DDP and one device take either order."""
    if is_fsdp(fabric):
        model = fabric.setup_module(model)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        return model, fabric.setup_optimizers(optimizer)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    return fabric.setup(model, optimizer)


def build_sharded(
    fabric: L.Fabric, checkpoint_dir: Path, model_fn: Callable[[Any], torch.nn.Module],
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """For FSDP: `model_fn(config)` built on the meta device (no rank allocates the full model), and
    the checkpoint's tensors (memory-mapped on CPU) for `load_sharded` once fabric has set the
    model up. The keys are checked now, strictly: only the parameters the checkpoint cannot have
    (LoRA's) may be missing."""
    from lit_llama.checkpoint import check_keys, find_weights, load_config, load_weights

    config = load_config(checkpoint_dir)
    with fabric.init_module(empty_init=True):
        model = model_fn(config)
    state_dict = load_weights(find_weights(checkpoint_dir))
    check_keys(model, state_dict, allowed_missing={k for k in model.state_dict() if k.endswith((".lora_A", ".lora_B"))})
    return model, state_dict


def load_sharded(fabric: L.Fabric, model: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a full (unsharded) state dict into a model that FSDP has set up: each unit is gathered,
    filled and sharded again in turn, so a GPU never holds more than one Block in full. Every rank
    must call it. Keys the state dict lacks (LoRA's) keep their values."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = model._forward_module  # the FSDP-wrapped model behind Fabric's wrapper
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        root.load_state_dict(state_dict, strict=False)


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def gather_parameters(
    fabric: L.Fabric, model: Any, keep: Callable[[str], bool] = lambda name: True
) -> dict[str, torch.Tensor]:
    """Full CPU copies of the model's parameters whose (checkpoint) name `keep` accepts, on rank 0;
    an empty dict on the other ranks. Every rank must call it.

    Under FSDP each unit is gathered on its own (`summon_full_params(recurse=False)`), its wanted
    tensors copied to CPU and the unit sharded again: saving a LoRA adapter never gathers more
    than one Block of the base model on a GPU, and only LoRA tensors reach the CPU."""
    inner = getattr(model, "module", model)

    def clean(name: str) -> str:
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        return name

    names: dict[int, list[str]] = {}  # a tied weight has two names (lm_head.weight, transformer.wte.weight)
    for name, p in inner.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(clean(name))

    def copy(params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        out = {}
        for p in params:
            wanted = [name for name in names[id(p)] if keep(name)]
            if wanted:
                out.update(dict.fromkeys(wanted, p.detach().to("cpu", copy=True)))
        return out

    if not is_fsdp(fabric):
        return copy(list(inner.parameters())) if fabric.global_rank == 0 else {}

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out: dict[str, torch.Tensor] = {}
    for unit in FSDP.fsdp_modules(model._forward_module):  # the root (embeddings, head, norm), then each Block
        nested = {id(p) for sub in FSDP.fsdp_modules(unit) if sub is not unit for p in sub.parameters()}
        own = [p for p in unit.parameters() if id(p) not in nested]
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            if fabric.global_rank == 0:
                out.update(copy(own))
    return out


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype the frozen base weights are loaded in for a Fabric precision setting."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


class MicroBatchSampler(EpochSampler):
    """An `EpochSampler` that deals whole micro-batches to the ranks in turn: micro-batch k of the
    epoch (samples k*m .. k*m+m-1 of its permutation, m = micro_batch_size) goes to rank
    k % num_replicas. The k-th global batch then holds the same micro-batches on any number of
    devices, and as the loss is a mean per micro-batch, averaged over the accumulation steps and
    (by DDP) over the ranks, N devices give the gradient that one device with N times the
    accumulation gives. (Dealing single samples, as DistributedSampler does, would regroup the
    samples into other micro-batches and change the per-micro-batch means.)

    One device sees the permutation itself, exactly as with `EpochSampler`; with several, the
    epoch is padded by wrapping around so every rank gets the same number of full micro-batches.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(num_samples, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank)
        self.micro_batch_size = micro_batch_size

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:  # the permutation EpochSampler draws: seeded by (seed, epoch) only
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            indices = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            indices = list(range(self.num_samples))
        if self.num_replicas == 1:
            return indices
        total = len(self) * self.num_replicas
        indices = (indices * -(-total // len(indices)))[:total]  # wrap around to fill the last global batch
        m, world = self.micro_batch_size, self.num_replicas
        return [i for start in range(self.rank * m, total, m * world) for i in indices[start:start + m]]

    def __len__(self) -> int:
        if self.num_replicas == 1:
            return self.num_samples
        per_rank_batches = -(-self.num_samples // (self.micro_batch_size * self.num_replicas))  # ceil
        return per_rank_batches * self.micro_batch_size

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "deal": f"micro-batches of {self.micro_batch_size}"}


def instruction_dataloaders(
    fabric: L.Fabric, data_dir: Path, micro_batch_size: int, pad_id: int, seed: int
) -> tuple[DataLoader, DataLoader, dict[str, Any]]:
    """Epoch-based loaders over the prepared train/test splits (each sample once per epoch, reshuffled)."""
    from functools import partial

    from lit_llama.data import IGNORE_INDEX, collate, load_splits

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


def instruction_sampler(
    tokenizer, prompt_style: str, instruction: str, max_new_tokens: int = 64
) -> Callable[[torch.nn.Module], str]:
    """A function that greedily answers `instruction` with the model in training, for eyeballing progress."""
    from lit_llama.prompts import get_prompt_style

    return greedy_sampler(tokenizer, get_prompt_style(prompt_style).format(instruction), max_new_tokens)


def greedy_sampler(
    tokenizer, prompt: str, max_new_tokens: int, keep_prompt: bool = False
) -> Callable[[torch.nn.Module], str]:
    """A function that greedily continues `prompt` with the model in training (the continuation, or
    prompt + continuation with `keep_prompt`), then puts the model back in training mode."""
    from lit_llama.generation import generate

    def sample(model: torch.nn.Module) -> str:
        inner = getattr(model, "module", model)
        device = next(inner.parameters()).device
        ids = tokenizer.encode(prompt, bos=True, device=device)
        budget = min(max_new_tokens, inner.config.block_size - len(ids))
        if budget <= 0:
            return ""
        inner.eval()
        out = generate(inner, [ids], budget, temperature=0, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)[0]
        inner.clear_kv_cache()
        inner.train()
        return tokenizer.decode(out if keep_prompt else out[len(ids):])

    return sample
