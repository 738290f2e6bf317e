"""LoRA instruction finetuning with Lightning Fabric.

    python finetune/lora.py --data_dir data/alpaca --checkpoint_dir checkpoints/lit/open_llama_7b --out_dir out/lora/alpaca

Only the LoRA matrices train; the base weights stay frozen. The adapter is saved on its own
(`lit_model.lora.safetensors`, a few MB), with everything generate/lora.py and merge_lora.py need.
An interrupted run continues with `--resume auto` (same flags): it ends with the same adapter as
an uninterrupted one (see lit_llama/resume.py). Several GPUs: `--devices N --strategy ddp|fsdp`
(howto/multi_gpu.md); under FSDP no rank ever holds the whole base model on its GPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch

from lit_llama.adapter import adapter_metadata, save_adapter, write_adapter
from lit_llama.checkpoint import load_config
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
    weights_dtype,
)
from lit_llama.lora import (
    LoRAConfig,
    build_lora_model,
    is_lora_key,
    load_lora_model,
    lora_param_count,
    mark_only_lora_as_trainable,
)
from lit_llama.model import LLaMAConfig
from lit_llama.qlora import QuantizeMode, load_quantized_lora_model
from lit_llama.run_dir import check_out_dir, claim_out_dir, write_hparams
from lit_llama.runtime import set_threads
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import TrainConfig, fit

SAMPLE_INSTRUCTION = "Recommend a movie for me to watch during the weekend and explain the reason."


def main(
    data_dir: Path = Path("data/alpaca"),
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/lora/alpaca"),
    precision: Literal["32-true", "bf16-true", "bf16-mixed", "16-mixed"] = "bf16-mixed",
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    devices: int = 1,
    strategy: Strategy = "auto",
    activation_checkpointing: bool = False,
    seed: int = 1337,
    train: TrainConfig = TrainConfig(),
    lora: LoRAConfig = LoRAConfig(),
    quantize: QuantizeMode = "none",
    save_embedding_layers: Literal["auto", "true", "false"] = "auto",
    sample_instruction: str = SAMPLE_INSTRUCTION,
    adapter_format: Literal["safetensors", "pth"] = "safetensors",
    resume: Literal["auto"] | Path | None = None,
    overwrite: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Finetune LoRA adapters on a prepared instruction dataset.

    Args:
        data_dir: Folder with train/test splits written by scripts/prepare_*.py.
        checkpoint_dir: The base model: a checkpoint directory with lit_config.json, weights and tokenizer.model or tokenizer.json.
        out_dir: Where the adapter, metrics.csv and hparams.json are written.
        precision: 32-true (fp32), bf16-mixed (bf16 base weights, fp32 LoRA, autocast), bf16-true, or 16-mixed (GPU).
        accelerator: cpu, cuda, or auto (cuda when available).
        devices: Number of devices; the global batch (--train.batch_size) is split over them.
        strategy: auto (DDP with several devices), ddp, fsdp (shards the base model over the GPUs), or deepspeed (ZeRO-2).
        activation_checkpointing: With fsdp: recompute each Block's activations in the backward pass to save memory.
        seed: Random seed for initialisation, shuffling and dropout.
        train: Optimisation settings: --train.learning_rate, --train.batch_size, --train.max_iters, ...
        lora: What LoRA adapts and how: --lora.r, --lora.alpha, --lora.dropout, the targets (--lora.query,
            --lora.value, --lora.mlp, ...), per-slice ranks, embedding options (--lora.train_embedding, --lora.train_head,
            --lora.untie_embeddings, --lora.resize_vocab, --lora.pad_id). When the data was prepared with
            --special_tokens, resize_vocab defaults to the size they need and the embedding and head train in full
            (unless --lora.embedding adapts them).
        quantize: QLoRA: store the frozen Block linears quantized by bitsandbytes (nf4, nf4-dq = nf4 with quantized
            absmaxes, int8); the LoRA matrices, embedding and head stay float. One device only (howto/qlora.md).
        save_embedding_layers: auto saves embedding/head weights only when trained or grown; true always; false never.
        sample_instruction: The instruction answered after each validation to show progress.
        adapter_format: File format of the adapter.
        resume: Continue an interrupted run: auto (from out_dir's last saved state, if any), or a run's out_dir.
        overwrite: Start fresh in an --out_dir that holds an earlier run (its training states and metrics are removed).
        threads: CPU threads for torch (default: the CPUs this process may use, less those other processes keep busy; one thread when the machine is busy, see howto/performance.md).
    """
    set_threads(threads)
    hparams = dict(locals())  # every flag, as given, written beside the checkpoints
    train.validate(devices)
    config = load_config(checkpoint_dir)  # a one-line error for a wrong directory before anything heavy
    check_strategy(strategy, accelerator, resume)
    if quantize != "none" and (devices > 1 or strategy in ("fsdp", "deepspeed")):
        raise ValueError(f"--quantize {quantize} trains on one device (its quantized weights are not sharded or "
                         "replicated by --strategy); drop --devices/--strategy or --quantize")
    check_out_dir(out_dir)
    fabric = setup_fabric(accelerator, devices, precision, seed, strategy, activation_checkpointing, train.grad_clip)
    run_lock = claim_out_dir(out_dir, hparams, resume, overwrite) if fabric.global_rank == 0 else None  # noqa: F841
    tokenizer = Tokenizer.from_checkpoint(checkpoint_dir)  # tokenizer.model or tokenizer.json
    train_loader, val_loader, data_meta = instruction_dataloaders(fabric, data_dir, train.micro_batch_size, tokenizer.pad_id, seed)
    check_data_tokenizer(data_meta, tokenizer, data_dir)
    prompt_style = data_meta.get("prompt_style", "alpaca")
    special_tokens = dataset_special_tokens(data_meta)
    if special_tokens:
        tokenizer = Tokenizer.from_checkpoint(checkpoint_dir, special_tokens=special_tokens)
        lora = grow_for_special_tokens(lora, config, tokenizer)
        fabric.print(f"{len(special_tokens)} special tokens from the data ({', '.join(special_tokens)}): vocabulary "
                     f"{config.vocab_size} -> {lora.resize_vocab}, embedding and head trained "
                     f"({'fully' if lora.train_embedding else 'by LoRA'})")

    fsdp = strategy == "fsdp"
    if fsdp:
        # On the meta device: FSDP materialises and shards it Block by Block in setup, then the
        # base weights are copied in. One dtype for all (FSDP flattens a Block's tensors into one).
        model, base_weights = build_sharded(fabric, checkpoint_dir, lambda c: build_lora_model(c, lora))
    elif quantize != "none":  # read tensor by tensor, each Block linear quantized as it arrives
        model = load_quantized_lora_model(checkpoint_dir, lora, quantize, weights_dtype(precision), fabric.device, config)
        if precision == "bf16-true":
            model = model.to(torch.bfloat16)  # the LoRA matrices, as without --quantize; quantized weights stay
    else:
        model = load_lora_model(checkpoint_dir, lora, dtype=weights_dtype(precision), device=fabric.device, config=config)
        if precision == "bf16-true":
            model = model.to(torch.bfloat16)
    mark_only_lora_as_trainable(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # LoRA + fully trained modules
    fabric.print(f"Trainable parameters: {n_trainable:,}, of which LoRA {lora_param_count(model):,} "
                 f"(all: {sum(p.numel() for p in model.parameters()):,})")
    model, optimizer = setup_model_and_optimizer(
        fabric, model, lambda params: torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    )
    if fsdp:
        load_sharded(fabric, model, base_weights)
        del base_weights

    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_hparams(out_dir, hparams)

    def save(stem: Path) -> None:
        path = stem.with_name(stem.name + f".lora.{adapter_format}")
        if fsdp:  # every rank takes part in gathering the LoRA shards; rank 0 writes one whole adapter
            tensors = gather_parameters(fabric, model, keep=is_lora_key)
            if fabric.global_rank == 0:
                write_adapter(tensors, path, adapter_metadata(lora, config, prompt_style, special_tokens=special_tokens))
        elif fabric.global_rank == 0:
            save_adapter(model.module if hasattr(model, "module") else model, path, lora, prompt_style=prompt_style,
                         save_embedding_layers=save_embedding_layers, special_tokens=special_tokens, quantize=quantize)
        fabric.print(f"Saved adapter to {path}")
        fabric.barrier()

    sample = instruction_sampler(tokenizer, prompt_style, sample_instruction)
    return fit(fabric, model, optimizer, train_loader, val_loader, train, out_dir, save, sample, checkpoint_name="lit_model",
               resume=resume)


def grow_for_special_tokens(lora: LoRAConfig, config: LLaMAConfig, tokenizer: Tokenizer) -> LoRAConfig:
    """The LoRAConfig that gives the data's special tokens rows to learn: the vocabulary grown to
    the tokenizer's (resize_vocab), and the embedding and head trained fully (--lora.train_embedding, --lora.train_head)
    unless LoRA on the embedding already adapts them."""
    pieces = tokenizer.base_vocab_size
    if pieces != config.vocab_size:
        raise ValueError(f"the tokenizer has {pieces} tokens but the checkpoint's vocabulary is {config.vocab_size}: "
                         "special tokens get the ids after the vocabulary, so the two must agree; use the checkpoint's tokenizer")
    needed = tokenizer.vocab_size
    if lora.resize_vocab is not None and lora.resize_vocab < needed:
        raise ValueError(f"--lora.resize_vocab {lora.resize_vocab} leaves no row for some of the {len(tokenizer.special_tokens)} "
                         f"special tokens (they need {needed}); drop --lora.resize_vocab or raise it")
    train_full = not (lora.train_embedding or lora.embedding)  # new rows that nothing trains would stay the mean
    return dataclasses.replace(lora, resize_vocab=lora.resize_vocab or needed,
                               train_embedding=lora.train_embedding or train_full, train_head=lora.train_head or train_full)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run(main)
