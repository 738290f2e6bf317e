"""Pretrain a LLaMA model from scratch on token files written by scripts/prepare_text.py.

    python pretrain/base.py --data_dir data/demo --model_name tiny --out_dir out/pretrain/demo

The model is a preset of lit_llama/model.py (sizes can be overridden with --n_layer, --n_embd, ...)
with the tokenizer's vocabulary, initialised with `init_weights` and trained by the shared loop in
lit_llama/training.py on random blocks of the training tokens. Checkpoint directories
(`out_dir/final`, and `out_dir/iter-XXXXXX-final` every --train.save_interval steps) hold the config,
the weights and the tokenizer, so `generate/base.py --checkpoint_dir out_dir/final` works on them.
An interrupted run continues with `--resume auto` (same flags) and ends with the same weights as an
uninterrupted one: the training state holds the block sampler's generator too (lit_llama/resume.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from lit_llama.checkpoint import TOKENIZER_NAME, save_checkpoint
from lit_llama.cli import run
from lit_llama.data import greedy_sampler
from lit_llama.distributed import setup_fabric, setup_model_and_optimizer
from lit_llama.model import LLaMA, LLaMAConfig, init_weights
from lit_llama.pretrain_data import PretrainDataset, read_meta
from lit_llama.run_dir import check_out_dir, claim_out_dir, write_hparams
from lit_llama.runtime import set_threads
from lit_llama.samplers import resumable_dataloader
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import TrainConfig, fit

DEFAULT_TRAIN = TrainConfig(
    learning_rate=3e-3, min_lr=3e-4, batch_size=32, micro_batch_size=32, max_iters=600, warmup_steps=30,
    weight_decay=0.1, grad_clip=1.0, eval_interval=200, eval_iters=10, save_interval=1000, log_interval=10,
)


def build_config(model_name: str, vocab_size: int, **overrides: Any) -> LLaMAConfig:
    """The preset `model_name` with the tokenizer's vocabulary and the given (non-None) overrides."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    # padded_vocab_size=None: derive it from this vocabulary, not from the preset's
    return LLaMAConfig.from_name(model_name, vocab_size=vocab_size, padded_vocab_size=None, **overrides)


def main(
    data_dir: Path = Path("data/demo"),
    model_name: str = "tiny",
    out_dir: Path = Path("out/pretrain/demo"),
    block_size: int | None = None,
    n_layer: int | None = None,
    n_head: int | None = None,
    n_embd: int | None = None,
    n_query_groups: int | None = None,
    intermediate_size: int | None = None,
    tie_embeddings: bool | None = None,
    tokenizer_path: Path | None = None,
    sampling: Literal["random", "strided"] = "random",
    precision: Literal["32-true", "bf16-true", "bf16-mixed", "16-mixed"] = "32-true",
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    devices: int = 1,
    seed: int = 1337,
    train: TrainConfig = DEFAULT_TRAIN,
    sample_prompt: str = "",
    resume: Literal["auto"] | Path | None = None,
    overwrite: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train a model from scratch on train.bin / val.bin and save a checkpoint directory.

    Args:
        data_dir: Folder written by scripts/prepare_text.py (train.bin, val.bin, tokenizer.model, prepare_text_meta.json).
        model_name: A preset of lit_llama/model.py (e.g. tiny); its vocabulary is replaced by the tokenizer's.
        out_dir: Where checkpoint directories, metrics.csv and hparams.json are written.
        block_size: Tokens per training block and the model's context (default: the preset's).
        n_layer: Override the preset's number of layers.
        n_head: Override the preset's number of attention heads.
        n_embd: Override the preset's embedding size.
        n_query_groups: Override the preset's number of key/value heads (GQA).
        intermediate_size: Override the preset's MLP hidden size.
        tie_embeddings: Override whether the output head shares the token embedding.
        tokenizer_path: The SentencePiece model of the token files; default: tokenizer.model in data_dir.
        sampling: Training blocks at random offsets (a new cut every epoch) or strided (fixed, shuffled).
        precision: 32-true (fp32), bf16-mixed (fp32 weights, bf16 autocast), bf16-true (bf16 weights), or 16-mixed (GPU).
        accelerator: cpu, cuda, or auto (cuda when available).
        devices: Number of devices (data parallel).
        seed: Random seed for initialisation and block offsets.
        train: Optimisation settings: --train.learning_rate, --train.batch_size, --train.max_iters, ...
        sample_prompt: Text greedily continued after each validation to show progress ("" = from BOS alone).
        resume: Continue an interrupted run: auto (from out_dir's last saved state, if any), or a run's out_dir.
        overwrite: Start fresh in an --out_dir that holds an earlier run (its training states and metrics are removed).
        threads: CPU threads for torch (default: the CPUs this process may use, less those other processes keep busy; one thread when the machine is busy, see howto/performance.md).
    """
    set_threads(threads)
    hparams = {**locals(), "train": asdict(train)}
    train.validate(devices)
    meta = read_meta(data_dir)
    tokenizer_path = tokenizer_path or data_dir / TOKENIZER_NAME
    tokenizer = Tokenizer(tokenizer_path)
    if hashlib.sha256(tokenizer_path.read_bytes()).hexdigest() != meta["tokenizer_sha256"]:
        raise ValueError(
            f"{tokenizer_path} is not the tokenizer the token files in {str(data_dir)!r} were made with; "
            "pass that one with --tokenizer_path or prepare the data again"
        )
    config = build_config(
        model_name, tokenizer.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
        n_query_groups=n_query_groups, intermediate_size=intermediate_size, tie_embeddings=tie_embeddings,
    )

    check_out_dir(out_dir)
    fabric = setup_fabric(accelerator, devices, precision, seed)
    run_lock = claim_out_dir(out_dir, hparams, resume, overwrite) if fabric.global_rank == 0 else None  # noqa: F841
    # Each rank draws its own random offsets; the sampler only orders (and shards) the block indices.
    train_set = PretrainDataset.from_dir(data_dir, "train", config.block_size, sampling, seed=seed + fabric.global_rank,
                                         vocab_size=config.vocab_size)
    val_set = PretrainDataset.from_dir(data_dir, "val", config.block_size, "strided", vocab_size=config.vocab_size)
    train_loader = resumable_dataloader(fabric, train_set, train.micro_batch_size, shuffle=sampling == "strided", seed=seed)
    val_loader = fabric.setup_dataloaders(DataLoader(val_set, batch_size=train.micro_batch_size, shuffle=False))

    with fabric.init_module():
        model = LLaMA(config)
    init_weights(model)
    fabric.print(
        f"Model {model_name}: {sum(p.numel() for p in model.parameters()):,} parameters "
        f"(n_layer {config.n_layer}, n_head {config.n_head}, n_embd {config.n_embd}, block_size {config.block_size}, "
        f"vocabulary {config.vocab_size}); {meta['train_tokens']:,} training tokens"
    )

    def make_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        # Decay matrices only: shrinking norm gains towards 0 would fight the normalisation.
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(0.9, 0.95))

    model, optimizer = setup_model_and_optimizer(fabric, model, make_optimizer)
    if fabric.global_rank == 0:
        write_hparams(out_dir, hparams)

    def save(stem: Path) -> None:
        if fabric.global_rank == 0:
            save_checkpoint(model.module if hasattr(model, "module") else model, stem, tokenizer_path=tokenizer_path)
            fabric.print(f"Saved checkpoint to {stem}/")
        fabric.barrier()

    sample = greedy_sampler(tokenizer, sample_prompt, max_new_tokens=40, keep_prompt=True)
    return fit(fabric, model, optimizer, train_loader, val_loader, train, out_dir, save, sample, checkpoint_name="final",
               resume=resume, generators={"train_blocks": train_set.generator})


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run(main)
