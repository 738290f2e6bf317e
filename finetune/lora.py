"""LoRA instruction finetuning with Lightning Fabric.

    python finetune/lora.py --data_dir data/alpaca --checkpoint_dir checkpoints/open_llama_7b --out_dir out/lora/alpaca

Only the LoRA matrices train; the base weights stay frozen. The adapter is saved on its own
(`lit_model.lora.safetensors`, a few MB), with everything generate/lora.py and merge_lora.py need.
An interrupted run continues with `--resume auto` (same flags): it ends with the same adapter as
an uninterrupted one (see lit_llama/resume.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from lit_llama.checkpoint import TOKENIZER_NAME, load_config
from lit_llama.cli import run
from lit_llama.lora import LoRAConfig, load_lora_model, lora_param_count, mark_only_lora_as_trainable, save_adapter
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import (
    TrainConfig,
    check_out_dir,
    fit,
    instruction_dataloaders,
    instruction_sampler,
    setup_fabric,
    weights_dtype,
    write_hparams,
)

SAMPLE_INSTRUCTION = "Recommend a movie for me to watch during the weekend and explain the reason."


def main(
    data_dir: Path = Path("data/alpaca"),
    checkpoint_dir: Path = Path("checkpoints/open_llama_7b"),
    out_dir: Path = Path("out/lora/alpaca"),
    precision: Literal["32-true", "bf16-true", "bf16-mixed", "16-mixed"] = "bf16-mixed",
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    devices: int = 1,
    seed: int = 1337,
    train: TrainConfig = TrainConfig(),
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    sample_instruction: str = SAMPLE_INSTRUCTION,
    adapter_format: Literal["safetensors", "pth"] = "safetensors",
    resume: Literal["auto"] | Path | None = None,
) -> dict[str, Any]:
    """Finetune LoRA adapters on a prepared instruction dataset.

    Args:
        data_dir: Folder with train/test splits written by scripts/prepare_*.py.
        checkpoint_dir: The base model: a checkpoint directory with lit_config.json, weights and tokenizer.model.
        out_dir: Where the adapter, metrics.csv and hparams.json are written.
        precision: 32-true (fp32), bf16-mixed (bf16 base weights, fp32 LoRA, autocast), bf16-true, or 16-mixed (GPU).
        accelerator: cpu, cuda, or auto (cuda when available).
        devices: Number of devices (data parallel).
        seed: Random seed for initialisation, shuffling and dropout.
        train: Optimisation settings: --train.learning_rate, --train.batch_size, --train.max_iters, ...
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha; the update is scaled by alpha / r.
        lora_dropout: Dropout on the LoRA path's input.
        lora_query: Apply LoRA to the query slice of the fused attention projection.
        lora_key: Apply LoRA to the key slice.
        lora_value: Apply LoRA to the value slice.
        sample_instruction: The instruction answered after each validation to show progress.
        adapter_format: File format of the adapter.
        resume: Continue an interrupted run: auto (from out_dir's last saved state, if any), or a run's out_dir.
    """
    hparams = dict(locals())  # every flag, as given, written beside the checkpoints
    train.validate(devices)
    lora_cfg = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, query=lora_query, key=lora_key, value=lora_value)
    load_config(checkpoint_dir)  # a one-line error for a wrong directory before anything heavy
    check_out_dir(out_dir)
    fabric = setup_fabric(accelerator, devices, precision, seed)
    tokenizer = Tokenizer(checkpoint_dir / TOKENIZER_NAME)
    train_loader, val_loader, data_meta = instruction_dataloaders(fabric, data_dir, train.micro_batch_size, tokenizer.pad_id, seed)
    prompt_style = data_meta.get("prompt_style", "alpaca")

    model = load_lora_model(checkpoint_dir, lora_cfg, dtype=weights_dtype(precision), device=fabric.device)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    mark_only_lora_as_trainable(model)
    fabric.print(f"Trainable LoRA parameters: {lora_param_count(model):,} (base: {sum(p.numel() for p in model.parameters()):,})")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay)
    model, optimizer = fabric.setup(model, optimizer)

    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_hparams(out_dir, hparams)

    def save(stem: Path) -> None:
        path = stem.with_name(stem.name + f".lora.{adapter_format}")
        if fabric.global_rank == 0:
            save_adapter(model.module if hasattr(model, "module") else model, path, lora_cfg, prompt_style=prompt_style)
            fabric.print(f"Saved adapter to {path}")
        fabric.barrier()

    sample = instruction_sampler(tokenizer, prompt_style, sample_instruction)
    return fit(fabric, model, optimizer, train_loader, val_loader, train, out_dir, save, sample, checkpoint_name="lit_model",
               resume=resume)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run(main)
