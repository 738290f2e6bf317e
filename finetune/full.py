"""Full finetuning: every weight trains; the result is a complete checkpoint directory.

    python finetune/full.py --data_dir data/alpaca --checkpoint_dir checkpoints/lit/stories260K --out_dir out/full/alpaca

Needs optimizer state for every parameter (about 4x the model's size in fp32 with AdamW), so it
suits small models; use finetune/lora.py for large ones. An interrupted run continues with
`--resume auto` (same flags); its training states in out_dir/train_state hold the weights and the
optimizer state, about 3x the model's size each (--train.keep_last of them are kept). Several GPUs:
`--devices N --strategy ddp|fsdp` (howto/multi_gpu.md); FSDP shards weights, gradients and
optimizer state, so each GPU holds about 1/N of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from lit_llama.checkpoint import load_config, load_into, load_model, save_checkpoint
from lit_llama.cli import run
from lit_llama.data import check_data_tokenizer, dataset_special_tokens, instruction_dataloaders, instruction_sampler
from lit_llama.distributed import (
    Strategy,
    build_sharded,
    check_strategy,
    gather_parameters,
    load_sharded,
    setup_fabric,
    setup_model_and_optimizer,
)
from lit_llama.model import LLaMA
from lit_llama.run_dir import check_out_dir, claim_out_dir, write_hparams
from lit_llama.runtime import set_threads
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import TrainConfig, fit


def main(
    data_dir: Path = Path("data/alpaca"),
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/full/alpaca"),
    precision: Literal["32-true", "bf16-true", "bf16-mixed", "16-mixed"] = "32-true",
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    devices: int = 1,
    strategy: Strategy = "auto",
    activation_checkpointing: bool = False,
    seed: int = 1337,
    train: TrainConfig = TrainConfig(learning_rate=3e-5, batch_size=64, epochs=3),
    sample_instruction: str = "Recommend a movie for me to watch during the weekend and explain the reason.",
    resume: Literal["auto"] | Path | None = None,
    overwrite: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Finetune all weights of a model on a prepared instruction dataset.

    Args:
        data_dir: Folder with train/test splits written by scripts/prepare_*.py.
        checkpoint_dir: The model to finetune: a checkpoint directory with lit_config.json, weights and tokenizer.model.
        out_dir: Where checkpoint directories, metrics.csv and hparams.json are written.
        precision: 32-true (fp32), bf16-mixed (fp32 weights, bf16 autocast), bf16-true (bf16 weights), or 16-mixed (GPU).
        accelerator: cpu, cuda, or auto (cuda when available).
        devices: Number of devices; the global batch (--train.batch_size) is split over them.
        strategy: auto (DDP with several devices), ddp, fsdp (shards weights and optimizer state over the GPUs), or deepspeed (ZeRO-2).
        activation_checkpointing: With fsdp: recompute each Block's activations in the backward pass to save memory.
        seed: Random seed for shuffling.
        train: Optimisation settings: --train.learning_rate, --train.batch_size, --train.max_iters, ...
        sample_instruction: The instruction answered after each validation to show progress.
        resume: Continue an interrupted run: auto (from out_dir's last saved state, if any), or a run's out_dir.
        overwrite: Start fresh in an --out_dir that holds an earlier run (its training states and metrics are removed).
        threads: CPU threads for torch (default: the CPUs this process may use, less those other processes keep busy; one thread when the machine is busy, see howto/performance.md).
    """
    set_threads(threads)
    hparams = dict(locals())  # every flag, as given, written beside the checkpoints
    train.validate(devices)
    config = load_config(checkpoint_dir)  # a one-line error for a wrong directory before anything heavy
    check_strategy(strategy, accelerator, resume)
    check_out_dir(out_dir)
    fabric = setup_fabric(accelerator, devices, precision, seed, strategy, activation_checkpointing, train.grad_clip)
    run_lock = claim_out_dir(out_dir, hparams, resume, overwrite) if fabric.global_rank == 0 else None  # noqa: F841
    tokenizer = Tokenizer.from_checkpoint(checkpoint_dir)  # tokenizer.model or tokenizer.json, as the checkpoint has
    train_loader, val_loader, data_meta = instruction_dataloaders(fabric, data_dir, train.micro_batch_size, tokenizer.pad_id, seed)
    check_data_tokenizer(data_meta, tokenizer, data_dir)
    prompt_style = data_meta.get("prompt_style", "alpaca")
    if dataset_special_tokens(data_meta):
        raise ValueError(f"{data_dir} was prepared with special tokens, which need a grown vocabulary: finetune it with "
                         "finetune/lora.py (it grows and trains the embedding and head), or prepare it without --special_tokens")

    fsdp = strategy == "fsdp"
    if fsdp:  # on the meta device; FSDP materialises and shards it Block by Block, then the weights are copied in
        model, weights = build_sharded(fabric, checkpoint_dir, LLaMA)
    else:
        # Mixed precision keeps fp32 master weights; only bf16-true stores them in bf16.
        dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
        model = load_model(checkpoint_dir, dtype=dtype, device=fabric.device, config=config)
    model.train()
    fabric.print(f"Trainable parameters: {sum(p.numel() for p in model.parameters()):,}")
    model, optimizer = setup_model_and_optimizer(
        fabric, model, lambda params: torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    )
    if fsdp:
        load_sharded(fabric, model, weights)
        del weights

    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_hparams(out_dir, hparams)

    def save(stem: Path) -> None:
        if fsdp:  # every rank takes part in gathering the shards, unit by unit; rank 0 writes one checkpoint
            state_dict = gather_parameters(fabric, model)
            if fabric.global_rank == 0:
                if config.tie_embeddings:
                    state_dict.pop("lm_head.weight", None)  # stored once, as the embedding
                with torch.device("meta"):
                    plain = LLaMA(config)
                load_into(plain, state_dict)
                save_checkpoint(plain, stem, tokenizer_dir=checkpoint_dir)
        elif fabric.global_rank == 0:
            save_checkpoint(model.module if hasattr(model, "module") else model, stem, tokenizer_dir=checkpoint_dir)
        fabric.print(f"Saved checkpoint to {stem}/")
        fabric.barrier()

    sample = instruction_sampler(tokenizer, prompt_style, sample_instruction)
    return fit(fabric, model, optimizer, train_loader, val_loader, train, out_dir, save, sample, checkpoint_name="final",
               resume=resume)


if __name__ == "__main__":
    run(main)
