"""Multi-device training: finetune/lora.py on 2 CPU processes (DDP over gloo) ends with the adapter of
1 process that accumulates the same global batch, and a 2-process run resumes to the same adapter.

The reference for the weights is the 1-process run of the same script (the claim is invariance to
--devices); the data layout is checked against the single-device `EpochSampler` of lit_llama/resume.py.
FSDP and DeepSpeed need CUDA (Lightning refuses FSDP on CPU, torch's FSDP wants an accelerator),
so here only their configuration and their one-line errors are checked."""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_llama.checkpoint import save_checkpoint
from lit_llama.distributed import check_strategy, gather_parameters, make_strategy, setup_fabric
from lit_llama.lora import LoRAConfig, MergedLinear, build_lora_model
from lit_llama.model import LLaMA, LLaMAConfig, init_weights
from lit_llama.samplers import EpochSampler, MicroBatchSampler

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = DATA / "alpaca_data_first400.json"
TOKENIZER = DATA / "llama-tokenizer.model"
needs_data = pytest.mark.skipif(
    not (ALPACA.is_file() and TOKENIZER.is_file()), reason="needs ../shared/data (Alpaca sample, LLaMA tokenizer)"
)
# One thread per process: two DDP ranks on a 2-core machine, and no OpenMP spinning against each other.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script: str, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    if not (ALPACA.is_file() and TOKENIZER.is_file()):
        pytest.skip("needs ../shared/data (Alpaca sample, LLaMA tokenizer)")
    tmp = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=32000, block_size=128))
    init_weights(model)
    save_checkpoint(model, tmp / "base", tokenizer_path=TOKENIZER)
    # Samples of different lengths (and numbers of target tokens): a micro-batch's mean loss depends
    # on which samples it groups, so a 2-device run that regrouped them would train differently.
    run("scripts/prepare_alpaca.py", "--data_file", ALPACA, "--checkpoint_dir", tmp / "base",
        "--destination_path", tmp / "data", "--test_size", 8, "--max_seq_length", 128)
    return tmp


def finetune(workdir: Path, out: Path, devices: int, *extra) -> float:
    """4 optimizer steps of a global batch of 4: 2 x 2 accumulation on 1 device, 2 x 2 devices on 2."""
    t0 = time.perf_counter()
    run("finetune/lora.py", "--data_dir", workdir / "data", "--checkpoint_dir", workdir / "base", "--out_dir", out,
        "--precision", "32-true", "--accelerator", "cpu", "--devices", devices, "--strategy", "ddp" if devices > 1 else "auto",
        "--seed", 7, "--lora.dropout", 0.0, "--train.batch_size", 4, "--train.micro_batch_size", 2,
        "--train.max_iters", 4, "--train.learning_rate", 1e-2, "--train.warmup_steps", 1, "--train.eval_interval", 100,
        "--train.eval_iters", 1, "--train.save_interval", 2, "--train.keep_last", 2, *extra)
    return time.perf_counter() - t0


def train_rows(metrics_csv: Path) -> list[dict[str, str]]:
    with open(metrics_csv) as f:
        return [row for row in csv.DictReader(f) if row["train_loss"]]


@needs_data
def test_two_process_ddp_matches_one_process_with_accumulation(workdir):
    seconds_1 = finetune(workdir, workdir / "one", 1)
    seconds_2 = finetune(workdir, workdir / "two", 2)
    one = load_file(workdir / "one" / "lit_model.lora.safetensors")
    two = load_file(workdir / "two" / "lit_model.lora.safetensors")
    assert set(one) == set(two) and all(k.endswith((".lora_A", ".lora_B")) for k in one)
    delta = max((one[k] - two[k]).abs().max().item() for k in one)
    trained = max(one[k].abs().max().item() for k in one if k.endswith("lora_B"))  # B starts at zero
    print(f"max |adapter(1 process) - adapter(2 processes)| = {delta:.3g}; runs took {seconds_1:.1f} s and {seconds_2:.1f} s")
    assert trained > 1e-3, trained  # the adapter moved: equality is not two untouched inits
    assert delta <= 1e-6, delta
    # The logged loss (averaged over the ranks) and the token count (summed over them) agree too.
    rows_1, rows_2 = train_rows(workdir / "one" / "metrics.csv"), train_rows(workdir / "two" / "metrics.csv")
    assert [r["tokens"] for r in rows_1] == [r["tokens"] for r in rows_2]
    for r1, r2 in zip(rows_1, rows_2, strict=True):
        assert abs(float(r1["train_loss"]) - float(r2["train_loss"])) <= 1e-6


@needs_data
def test_two_process_ddp_resumes_to_the_uninterrupted_adapter(workdir):
    if not (workdir / "two" / "train_state").is_dir():
        finetune(workdir, workdir / "two", 2)
    state = workdir / "two" / "train_state" / "state-000002.json"  # after 2 of the 4 steps
    assert state.is_file()
    finetune(workdir, workdir / "resumed", 2, "--resume", state)
    want = load_file(workdir / "two" / "lit_model.lora.safetensors")
    got = load_file(workdir / "resumed" / "lit_model.lora.safetensors")
    assert set(want) == set(got)
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6


@pytest.mark.parametrize("world, accumulation", [(2, 1), (2, 2), (3, 2)])
def test_micro_batch_sampler_gives_every_device_count_the_single_device_global_batches(world, accumulation):
    n, micro = 29, 2
    single = list(EpochSampler(n, shuffle=True, seed=3).order(epoch=1))
    per_step = micro * accumulation * world
    ranks = []
    for rank in range(world):
        s = MicroBatchSampler(n, micro, shuffle=True, seed=3, num_replicas=world, rank=rank)
        s.set_position(1)
        order = list(s)
        assert len(order) == len(s) and len(s) % micro == 0
        ranks.append([tuple(order[i:i + micro]) for i in range(0, len(order), micro)])
    assert len({len(r) for r in ranks}) == 1  # every rank runs the same number of micro-batches
    for step in range(n // per_step):  # the complete global batches of the epoch
        ours = sorted(mb for r in ranks for mb in r[step * accumulation:(step + 1) * accumulation])
        first = step * per_step
        theirs = sorted(tuple(single[i:i + micro]) for i in range(first, first + per_step, micro))
        assert ours == theirs, step  # the same micro-batches, not just the same samples
    one = MicroBatchSampler(n, micro, shuffle=True, seed=3)
    assert list(one.order(1)) == single and len(one) == n  # one device: EpochSampler's order, unchanged


def test_fsdp_strategy_wraps_blocks_keeps_lora_trainable_and_initialises_lora_on_materialisation():
    from lightning.fabric.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from lit_llama.model import Block

    strategy = make_strategy("fsdp", activation_checkpointing=True)
    assert isinstance(strategy, FSDPStrategy)
    kwargs = strategy._fsdp_kwargs
    assert kwargs["use_orig_params"] is True and strategy._state_dict_type == "full"
    assert isinstance(kwargs["auto_wrap_policy"], ModuleWrapPolicy) and Block in kwargs["auto_wrap_policy"]._module_classes
    assert Block in strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
    # What FSDP does to each module of a model built on the meta device, before sharding it.
    config = LLaMAConfig.from_name("tiny-tied")
    with torch.device("meta"):
        model = build_lora_model(config, LoRAConfig(r=4))
    for module in model.modules():
        kwargs["param_init_fn"](module)
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight  # still one tied Parameter
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, MergedLinear)
    bound = 1 / config.n_embd ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, C) draws from U(-1/sqrt(C), 1/sqrt(C))
    assert attn.lora_A.abs().max() <= bound and attn.lora_A.std() > bound / 3
    assert torch.count_nonzero(attn.lora_B) == 0  # the update starts at zero: the model is its base


def test_gathered_parameters_match_torch_state_dict_on_one_device():
    fabric = setup_fabric("cpu", 1, "32-true", seed=0)
    model = build_lora_model(LLaMAConfig.from_name("tiny-tied"), LoRAConfig(r=4))
    init_weights(model)
    model, _ = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    want = model.module.state_dict()  # keeps both names of the tied weight, as gather_parameters does
    got = gather_parameters(fabric, model)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    lora = gather_parameters(fabric, model, keep=lambda name: name.endswith(("lora_A", "lora_B")))
    assert set(lora) == {k for k in want if k.endswith(("lora_A", "lora_B"))} and lora
    before = model.module.transformer.wte.weight.detach().clone()
    got["transformer.wte.weight"].add_(1)  # copies: the model is untouched
    assert torch.equal(model.module.transformer.wte.weight, before)


def test_strategy_mistakes_are_one_line_errors():
    with pytest.raises(ValueError, match="not supported with --strategy fsdp"):
        check_strategy("fsdp", "cuda", resume="auto")
    with pytest.raises(ValueError, match="needs --strategy fsdp"):
        make_strategy("ddp", activation_checkpointing=True)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install deepspeed"):
            check_strategy("deepspeed", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA GPUs"):
            check_strategy("fsdp", "auto")


@needs_data
def test_fsdp_on_cpu_is_a_one_line_error(workdir):
    proc = subprocess.run(
        [sys.executable, "finetune/lora.py", "--data_dir", str(workdir / "data"), "--checkpoint_dir",
         str(workdir / "base"), "--out_dir", str(workdir / "bad"), "--accelerator", "cpu", "--devices", "2",
         "--strategy", "fsdp"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "needs CUDA GPUs" in last, proc.stderr[-2000:]
