"""Several devices with Lightning Fabric: the --strategy flags (ddp, fsdp, deepspeed), setting Fabric
up, building and loading a model under FSDP without any rank holding it whole, and gathering its
shards to save (howto/multi_gpu.md). The training loop (lit_llama/training.py) asks only `is_sharded`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
from lightning.fabric.strategies import DeepSpeedStrategy, FSDPStrategy
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from lit_llama.checkpoint import check_keys, find_weights, load_config, load_weights
from lit_llama.model import Block

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
        return FSDPStrategy(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            state_dict_type="full",
            sharding_strategy="FULL_SHARD",
            use_orig_params=True,
            param_init_fn=_materialize_on_device,
        )
    if strategy == "deepspeed":
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
    return isinstance(fabric.strategy, FSDPStrategy)


def is_deepspeed(fabric: L.Fabric) -> bool:
    return isinstance(fabric.strategy, DeepSpeedStrategy)


def is_sharded(fabric: L.Fabric) -> bool:
    """Are the weights (FSDP) or the optimizer state (DeepSpeed ZeRO) split over the ranks? Then a
    module's weights exist whole only inside the wrapped forward, and rank 0 alone cannot write a
    training state that resumes."""
    return is_fsdp(fabric) or is_deepspeed(fabric)


def runs_whole_model_on_rank0(fabric: L.Fabric) -> bool:
    """Can rank 0 run the model by itself (to generate a sample)? Not when FSDP shards it."""
    return not is_fsdp(fabric)


def check_sharded_fit(fabric: L.Fabric, resume: Any, accumulation: int, micro_batch_size: int) -> None:
    """One-line errors for what `fit` cannot do under a sharded strategy."""
    if is_sharded(fabric) and resume is not None:
        raise ValueError(_NO_SHARDED_RESUME.format(strategy="fsdp" if is_fsdp(fabric) else "deepspeed"))
    if is_deepspeed(fabric) and accumulation > 1:  # its engine steps and scales on its own accumulation count
        raise ValueError(
            f"--strategy deepspeed runs without gradient accumulation here; set --train.batch_size to "
            f"micro_batch_size x devices = {micro_batch_size * fabric.world_size}"
        )


def clip_gradients(fabric: L.Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the gradient norm to `max_norm`; DeepSpeed clips inside its own step (make_strategy's config)."""
    if not is_deepspeed(fabric):
        fabric.clip_gradients(model, optimizer, max_norm=max_norm)


def setup_fabric(
    accelerator: str = "auto", devices: int = 1, precision: str = "32-true", seed: int = 1337,
    strategy: Strategy = "auto", activation_checkpointing: bool = False, grad_clip: float | None = None,
) -> L.Fabric:
    """Fabric(devices, precision, strategy) -> launch -> seed_everything. Precision the device lacks
    is a clear error. With several devices every rank runs the script; the same seed on each gives
    every rank the same initial (LoRA) weights."""
    # Checked for "auto" too: on a machine without a GPU, Lightning would quietly train 16-mixed as
    # bf16-mixed instead, and the run would record a precision it never used.
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision.startswith("16") and on_cpu:
        raise ValueError(f"--precision {precision} needs a GPU; on CPU use 32-true, bf16-true or bf16-mixed")
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
