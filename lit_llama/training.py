"""The one training loop, shared by finetune/lora.py, finetune/full.py and pretrain/.

Scripts differ in what they build (a LoRA model, a full model, a model from scratch), which
parameters they hand to the optimizer, and what `save` writes. Everything else lives here: the
learning-rate schedule, the loss, gradient accumulation, clipping, validation, logging and
checkpoint cadence. Beside it: lit_llama/distributed.py (strategies, FSDP), lit_llama/resume.py
(training states), lit_llama/run_dir.py (metrics.csv, hparams.json, loss.png), lit_llama/samplers.py.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from lit_llama.distributed import check_sharded_fit, clip_gradients, is_sharded, runs_whole_model_on_rank0
from lit_llama.resume import Progress, restore_run, save_run_state
from lit_llama.run_dir import MetricsLog, disk_errors_as_value_errors, plot_loss_curve
from lit_llama.samplers import epoch_sampler


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training script (flags --train.NAME).

    Args:
        learning_rate: Peak learning rate (AdamW), reached after warmup; > 0.
        min_lr: Learning rate at the end of the cosine decay; between 0 and learning_rate.
        batch_size: Samples per optimizer step over all devices; a multiple of micro_batch_size x devices.
        micro_batch_size: Samples per forward/backward pass; gradients accumulate up to batch_size.
        epochs: Passes over the training set (ignored when max_iters is given).
        max_iters: Optimizer steps to run; overrides epochs when given.
        warmup_steps: Optimizer steps of linear learning-rate warmup.
        weight_decay: AdamW weight decay; >= 0.
        grad_clip: Clip the gradient norm to this value, > 0 (None: no clipping).
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

    def __post_init__(self) -> None:
        """The ranges in the field docs, checked once here: the CLI and code that builds a TrainConfig alike."""
        for name in ("batch_size", "micro_batch_size", "epochs", "eval_interval", "eval_iters", "save_interval", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--train.{name} must be a positive integer, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--train.learning_rate must be a positive number, got {self.learning_rate}; try 3e-4")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.learning_rate):
            raise ValueError(f"--train.min_lr must be between 0 and --train.learning_rate ({self.learning_rate:g}), got {self.min_lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--train.weight_decay must be a number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"--train.grad_clip must be a positive norm (or null: no clipping), got {self.grad_clip}; try 1.0")
        if self.max_iters is not None and self.max_iters <= 0:
            raise ValueError(f"--train.max_iters must be a positive number of optimizer steps, got {self.max_iters}")
        if self.keep_last < 0:
            raise ValueError(f"--train.keep_last must be >= 0 (0: no training states, no --resume), got {self.keep_last}")
        if self.warmup_steps < 0:
            raise ValueError(f"--train.warmup_steps must be >= 0, got {self.warmup_steps}")

    def validate(self, devices: int = 1) -> None:
        """What depends on the device count: the global batch splits into whole micro-batches."""
        if devices < 1:
            raise ValueError(f"--devices must be at least 1, got {devices}")
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


def describe_schedule(cfg: TrainConfig, total_steps: int) -> list[str]:
    """The learning-rate schedule of a run in words, and a warning when warmup does not fit in it."""
    lines = [f"Learning rate: linear warmup over {cfg.warmup_steps} steps to {cfg.learning_rate:g}, then cosine "
             f"decay to {cfg.min_lr:g} at step {total_steps}"]
    if cfg.warmup_steps >= total_steps:
        peak = lr_at(total_steps - 1, total_steps, cfg)
        lines.append(
            f"warning: --train.warmup_steps {cfg.warmup_steps} is not shorter than the run's {total_steps} steps, so the "
            f"learning rate stops at {peak:.3g}, {peak / cfg.learning_rate:.0%} of --train.learning_rate; lower "
            f"--train.warmup_steps (e.g. {max(1, total_steps // 10)})"
        )
    return lines


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
    if is_sharded(fabric):
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


def optimizer_step(fabric: L.Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float,
                   grad_clip: float | None) -> None:
    """Set the learning rate, clip the accumulated gradients, step and clear them."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if grad_clip is not None:
        clip_gradients(fabric, model, optimizer, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plan_steps(cfg: TrainConfig, micro_batches: int, world_size: int) -> tuple[int, int, int, int]:
    """(accumulation, optimizer steps per epoch, micro-batches used per epoch, total steps) for a loader
    of `micro_batches` per epoch; the partial accumulation at an epoch's end is dropped."""
    accum = cfg.accumulation_steps(world_size)
    if micro_batches < accum:
        raise ValueError(
            f"the training set gives {micro_batches} micro-batches per epoch, fewer than the {accum} that one "
            f"optimizer step of --train.batch_size {cfg.batch_size} needs; lower --train.batch_size or add data"
        )
    steps_per_epoch = micro_batches // accum
    return accum, steps_per_epoch, steps_per_epoch * accum, cfg.max_iters or cfg.epochs * steps_per_epoch


def stop_if_diverged(loss: float, step: int, out_dir: Path, checkpoint_name: str) -> None:
    """Stop before a diverged model is saved: what was saved earlier stays the last good result."""
    if not math.isfinite(loss):
        saved = sorted(out_dir.glob(f"iter-*-{checkpoint_name}*"))
        raise ValueError(
            f"the training loss became {loss} by step {step}; stopped without saving"
            + (f" (the last good save is {saved[-1].name})" if saved else "")
            + "; lower --train.learning_rate or keep --train.grad_clip on, and start again"
        )


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

    Resuming: when `train_loader` samples with `lit_llama.samplers.EpochSampler` (build it with
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
    accum, steps_per_epoch, micro_per_epoch, total_steps = plan_steps(cfg, len(train_loader), fabric.world_size)
    inner = getattr(model, "module", model)
    sampler = epoch_sampler(train_loader)
    check_sharded_fit(fabric, resume, accum, cfg.micro_batch_size)
    if sample is not None and not runs_whole_model_on_rank0(fabric):
        fabric.print("Sample generation is off under FSDP (every rank holds only a shard of the model)")
        sample = None
    # What must not change between a run and its resumption for the batches to line up.
    geometry = dict(micro_batch_size=cfg.micro_batch_size, accumulation=accum, world_size=fabric.world_size,
                    micro_batches_per_epoch=len(train_loader), sampler=sampler.describe() if sampler else None)

    p, resumed_from = Progress(), None
    if resume is not None:
        if sampler is None:
            raise ValueError(
                "this script's training DataLoader cannot restore its position in an epoch; build it with "
                "lit_llama.samplers.resumable_dataloader to use --resume"
            )
        p, resumed_from = restore_run(fabric, resume, out_dir, geometry, inner, optimizer, generators)
        if resumed_from is not None:
            fabric.print(f"Resumed from {resumed_from}: step {p.step}, epoch {p.epoch + 1}, "
                         f"micro-batch {p.micro_in_epoch} of {micro_per_epoch}")
    metrics = MetricsLog(out_dir / "metrics.csv", enabled=fabric.global_rank == 0,
                         resume_step=p.step if resumed_from else None)
    fabric.print(
        f"Training {total_steps} optimizer steps: {len(train_loader.dataset)} samples, {steps_per_epoch} steps per epoch, "
        f"batch {cfg.batch_size} = {cfg.micro_batch_size} x {accum} accumulation x {fabric.world_size} device(s)"
    )
    for line in describe_schedule(cfg, total_steps):
        fabric.print(line)
    t_start = t_log = time.perf_counter() - p.elapsed_s
    tokens_since_log = pending_tokens = 0  # this rank's tokens since the last sync: ranks pad to different lengths

    def sync_tokens() -> None:
        """Add the tokens every rank trained on since the last call."""
        nonlocal tokens_since_log, pending_tokens
        total = int(fabric.all_reduce(torch.tensor(pending_tokens, device=fabric.device), reduce_op="sum"))
        p.tokens, tokens_since_log, pending_tokens = p.tokens + total, tokens_since_log + total, 0

    def log_train(lr: float) -> None:
        nonlocal t_log, tokens_since_log
        sync_tokens()
        # Averaged over the ranks too: each saw its own micro-batches of the global batch.
        train_loss = fabric.all_reduce(torch.stack(p.running_loss).mean(), reduce_op="mean").item()
        stop_if_diverged(train_loss, p.step, out_dir, checkpoint_name)
        p.running_loss.clear()
        now = time.perf_counter()
        tps = tokens_since_log / max(now - t_log, 1e-9)
        t_log, tokens_since_log = now, 0
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
        metrics.log(step=p.step, epoch=p.epoch + 1, samples=p.samples, tokens=p.tokens, train_loss=train_loss, lr=lr,
                    tokens_per_sec=tps, elapsed_s=now - t_start)

    def validate_and_sample() -> None:
        p.last_val = validate(fabric, model, val_loader, cfg.eval_iters)
        metrics.log(step=p.step, epoch=p.epoch + 1, val_loss=p.last_val, elapsed_s=time.perf_counter() - t_start)
        bar.write(f"step {p.step}: val loss {p.last_val:.4f}", file=sys.stderr)
        if sample is not None and fabric.global_rank == 0:
            bar.write(f"sample: {sample(model)!r}", file=sys.stderr)

    def save_output(stem: Path) -> None:
        if p.running_loss:  # the losses since the last log line, not checked yet
            loss = fabric.all_reduce(torch.stack(p.running_loss).mean(), reduce_op="mean").item()
            stop_if_diverged(loss, p.step, out_dir, checkpoint_name)
        with disk_errors_as_value_errors(stem):
            save(stem)

    def save_state() -> None:
        if sampler is None or cfg.keep_last == 0 or is_sharded(fabric):
            return
        sync_tokens()
        p.elapsed_s = time.perf_counter() - t_start
        save_run_state(fabric, out_dir, p, micro_per_epoch, dict(total_steps=total_steps, geometry=geometry),
                       inner, optimizer, generators, cfg.keep_last)

    if val_loader is not None and resumed_from is None:
        p.last_val = validate(fabric, model, val_loader, cfg.eval_iters)
        metrics.log(step=0, epoch=0, val_loss=p.last_val, elapsed_s=0.0)
        fabric.print(f"step 0: val loss {p.last_val:.4f}")
    # Redirected to a file, a bar redrawn ten times a second fills it with carriage returns: draw rarely.
    bar = tqdm(total=total_steps, initial=p.step, desc="train", unit="step", disable=fabric.global_rank != 0,
               file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30)
    model.train()
    try:
        while p.step < total_steps:
            if sampler is not None:
                sampler.set_position(p.epoch, p.micro_in_epoch * cfg.micro_batch_size)
            for micro_step, batch in enumerate(train_loader, start=p.micro_in_epoch):
                if micro_step >= micro_per_epoch:
                    break
                is_accumulating = (micro_step + 1) % accum != 0
                with fabric.no_backward_sync(model, enabled=is_accumulating):
                    loss = batch_loss(fabric, model, batch)
                    fabric.backward(loss / accum)
                p.running_loss.append(loss.detach())
                p.micro_in_epoch = micro_step + 1
                pending_tokens += batch["input_ids"].numel()
                p.samples += batch["input_ids"].size(0) * fabric.world_size
                if is_accumulating:
                    continue
                lr = lr_at(p.step, total_steps, cfg)
                optimizer_step(fabric, model, optimizer, lr, cfg.grad_clip)
                p.step += 1
                bar.update(1)
                if p.step % cfg.log_interval == 0 or p.step == total_steps:
                    log_train(lr)
                if val_loader is not None and (p.step % cfg.eval_interval == 0 or p.step == total_steps):
                    validate_and_sample()
                if p.step % cfg.save_interval == 0 and p.step < total_steps:
                    save_output(out_dir / f"iter-{p.step:06d}-{checkpoint_name}")
                    save_state()
                if p.step >= total_steps:
                    break
            if p.step < total_steps:  # the epoch ran out: the next one starts from its first micro-batch
                p.epoch, p.micro_in_epoch = p.epoch + 1, 0
    finally:  # the bar and the CSV are closed before an error message is printed
        bar.close()
        metrics.close()
    sync_tokens()
    save_output(out_dir / checkpoint_name)
    save_state()  # a finished run resumed again only re-saves its result
    elapsed = time.perf_counter() - t_start
    result = dict(steps=p.step, epochs=p.epoch + 1, tokens=p.tokens, samples=p.samples, val_loss=p.last_val,
                  elapsed_s=elapsed, tokens_per_sec=p.tokens / max(elapsed, 1e-9), history=metrics.rows)
    fabric.print(
        f"Done: {p.step} steps, {p.tokens} trained tokens in {elapsed:.1f} s ({result['tokens_per_sec']:.0f} tokens/s), "
        f"final val loss {p.last_val:.4f}"
    )
    if fabric.global_rank == 0:
        fabric.print(plot_loss_curve(metrics.rows, out_dir / "loss.png"))
    return result
