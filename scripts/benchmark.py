"""Benchmark LoRA finetuning and generation: lit_llama against transformers + PEFT, side by side.

    python scripts/benchmark.py                                  # 134M LLaMA, bf16 and fp32, 3 repeats
    python scripts/benchmark.py --dtype bf16 --tasks train --repeats 5
    python scripts/benchmark.py --preset tiny --repeats 1 --steps 2 --new_tokens 8   # a smoke run

Both implementations get the same config and the same weights (random, written once per dtype to a
temporary folder: our checkpoint, and its Hugging Face twin through `lit_llama.convert_hf`), the same
batches, the same LoRA (r, alpha on Q and V) and the same thread count. Every measurement runs in a
fresh subprocess of this script, so its peak RSS is its own and nothing warm carries over; the two
implementations alternate (which one goes first flips every repeat) so that a change in the machine's
load hits both. The table gives min / median / max over the repeats, and the ratio ours / reference
per interleaved pair.

    train     LoRA finetuning steps: forward, loss on the unmasked labels, backward, AdamW on the LoRA
              parameters. bf16: bf16 base weights, fp32 LoRA, autocast (finetune's bf16-mixed); fp32: all fp32.
    decode    greedy generation of new_tokens tokens after a prompt_len-token prompt, batch 1.
    batch     the same for gen_batch prompts at once (tokens/s counts every sequence's tokens).

MFU is model FLOPs per second over a matmul peak measured in the same run (a square matmul in the
same dtype and thread count, best of several): training counts 4 N + 6 L T C FLOPs per token
(forward and input-gradient of the frozen matmuls, attention forward and backward; the LoRA update
is negligible), generation 2 N + 4 L S C, with N the matmul weights (head included, embedding
not), L layers, T the sequence, S the average context, C the width.

"ours" is the training step of lit_llama.training.fit without Fabric around it: the model's forward,
`masked_next_token_loss` (the head and the fp32 softmax only on unmasked positions, chunk by chunk),
backward, AdamW.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from tqdm import tqdm

from lit_llama.cli import run
from lit_llama.model import LLaMA, LLaMAConfig

# The issue's reference model: LLaMA with Llama-2's vocabulary, 12 x 768, about 134M parameters.
BENCH_PRESETS: dict[str, dict[str, Any]] = {
    "134M": dict(block_size=1024, vocab_size=32000, n_layer=12, n_head=12, n_embd=768, intermediate_size=2048),
    "tiny": dict(block_size=256, vocab_size=256, n_layer=2, n_head=4, n_embd=32, intermediate_size=64),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ("ours", "reference")
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------ shared inputs
def training_batches(vocab_size: int, n: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` micro-batches of token ids (n, B, T) and labels like an instruction dataset's: each row's
    first 25-75% (its "prompt") is masked with -100, so about half of the positions carry a loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n, batch_size, seq_len), generator=g)
    prompt_len = torch.randint(seq_len // 4, 3 * seq_len // 4 + 1, (n, batch_size, 1), generator=g)
    labels = ids.masked_fill(torch.arange(seq_len) < prompt_len, IGNORE_INDEX)
    return ids, labels


def generation_prompts(vocab_size: int, batch_size: int, prompt_len: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch_size, prompt_len), generator=g)  # (B, P)


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: ru_maxrss survives
    exec, so a subprocess would report its parent's peak if that was higher."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Shortest of `repeats` timed calls, after one untimed warm-up call (thread pool, pages, kernel choice)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul in `dtype`: the roofline MFU is taken against."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    return 2 * size**3 / best_seconds(lambda: a @ b, repeats)


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Best bytes/s of summing a `mib` MiB fp32 tensor, far larger than the caches: how fast memory reaches
    the cores. Batch-1 decoding reads every weight once per token, so this bounds its tokens/s."""
    x = torch.ones(mib * 2**20 // 4)
    return x.numel() * 4 / best_seconds(x.sum, repeats)


def matmul_params(config: LLaMAConfig) -> int:
    """N: weights of every matmul of a forward pass (attention, MLP and head; not the embedding lookup)."""
    C, hidden = config.n_embd, config.intermediate_size
    qkv = (config.n_head + 2 * config.n_query_groups) * config.head_size
    out = config.n_head * config.head_size * C  # attention output projection
    return config.n_layer * (C * qkv + out + 3 * C * hidden) + C * config.padded_vocab_size


def write_weights(config: LLaMAConfig, out: Path, dtypes: list[str], seed: int = 1234) -> None:
    """One set of random weights, written for each dtype as our checkpoint (out/lit-DTYPE) and as
    its Hugging Face LlamaForCausalLM twin (out/hf-DTYPE), mapped by lit_llama.convert_hf."""
    from lit_llama.checkpoint import atomic_write_text, save_checkpoint, save_weights
    from lit_llama.convert_hf import config_to_hf, lit_to_hf_state_dict
    from lit_llama.model import init_weights

    torch.manual_seed(seed)
    model = LLaMA(config)
    init_weights(model)
    model.to(torch.bfloat16)  # rounded once, in place: the bf16 and the fp32 runs hold the same values
    for name in dtypes:
        model.to(DTYPES[name])
        save_checkpoint(model, out / f"lit-{name}")
        hf_dtype = {"bf16": "bfloat16", "fp32": "float32"}[name]
        hf_sd = lit_to_hf_state_dict(model.state_dict(), config)
        save_weights(hf_sd, out / f"hf-{name}" / "model.safetensors", metadata={"format": "pt"})
        atomic_write_text(out / f"hf-{name}" / "config.json", json.dumps(config_to_hf(config, hf_dtype), indent=2))


# ----------------------------------------------------------------------------------- ours: training
def ours_train(spec: dict[str, Any]) -> dict[str, Any]:
    from lit_llama.lora import LoRAConfig, load_lora_model, mark_only_lora_as_trainable
    from lit_llama.training import masked_next_token_loss

    lora = LoRAConfig(r=spec["lora_r"], alpha=spec["lora_alpha"], dropout=spec["lora_dropout"], query=True, value=True)
    model = load_lora_model(spec["lit_dir"], lora, dtype=DTYPES[spec["dtype"]])  # LoRA parameters stay fp32
    mark_only_lora_as_trainable(model)
    return timed_lora_training(model, lambda forward, ids, labels: masked_next_token_loss(forward, ids, labels), spec)


# ------------------------------------------------------------------------------ reference: training
def reference_train(spec: dict[str, Any]) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=DTYPES[spec["dtype"]])
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)  # adapters in fp32 on a bf16 base (autocast_adapter_dtype)
    return timed_lora_training(model, lambda forward, ids, labels: forward(input_ids=ids, labels=labels).loss, spec)


def timed_lora_training(model: torch.nn.Module, loss_fn, spec: dict[str, Any]) -> dict[str, Any]:
    """The same step for both: `loss_fn(forward, input_ids, labels)` under autocast for bf16 (fp32
    LoRA on bf16 weights), backward, AdamW on the trainable (LoRA) parameters."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    bf16 = DTYPES[spec["dtype"]] == torch.bfloat16
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    forward = torch.compile(model) if spec["compile"] else model

    def train_step(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = loss_fn(forward, input_ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return timed_training(train_step, spec)


def timed_training(train_step, spec: dict[str, Any]) -> dict[str, Any]:
    n = spec["warmup"] + spec["steps"]
    ids, labels = training_batches(spec["vocab_size"], n, spec["batch_size"], spec["seq_len"])
    times, losses = [], []
    for i in range(n):
        t0 = time.perf_counter()
        losses.append(train_step(ids[i], labels[i]).item())
        times.append(time.perf_counter() - t0)
    # The median step: one step slowed down by another process on the machine does not move it.
    step_s = statistics.median(times[spec["warmup"]:])
    return dict(tokens_per_s=spec["batch_size"] * spec["seq_len"] / step_s, first_step_s=times[0], loss0=losses[0],
                step_s=times, peak_rss_mib=peak_rss_mib())


# ------------------------------------------------------------------------------------- generation
def ours_generate(spec: dict[str, Any]) -> dict[str, Any]:
    from lit_llama.checkpoint import load_model
    from lit_llama.decode_speedups import compile_decode_step, pack_linear_weights, packs_weights
    from lit_llama.generation import decode_one_token, generate

    model = load_model(spec["lit_dir"], dtype=DTYPES[spec["dtype"]], mmap=False)  # packed below, as generate/base.py
    decode_fn = compile_decode_step("cpu") if spec["compile"] else decode_one_token
    packed = False

    def run_generate(prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        nonlocal packed  # batch 1 runs first; compiled, only the batch above 1 runs over packed weights
        if not packed and packs_weights("cpu", spec["compile"], len(prompts)):
            packed = pack_linear_weights(model) > 0
        out = generate(model, prompts, new_tokens, temperature=0.0, decode_fn=decode_fn)
        return torch.stack([o[prompts.shape[1]:] for o in out])  # (B, new_tokens)

    return timed_generation(run_generate, spec)


def reference_generate(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=DTYPES[spec["dtype"]]).eval()
    model.generation_config.eos_token_id = None  # exactly new_tokens tokens, as ours
    model.generation_config.pad_token_id = 0
    if spec["compile"]:
        model.forward = torch.compile(model.forward)

    def run_generate(prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return out[:, prompts.shape[1]:]

    return timed_generation(run_generate, spec)


def timed_generation(run_generate, spec: dict[str, Any]) -> dict[str, Any]:
    """Warm up, then per batch size: time to first token (best of 3 one-token generations) and
    tokens/s of one full generation (all sequences' new tokens over its wall time)."""
    result: dict[str, Any] = {}
    for name, batch in (("decode", 1), ("batch", spec["gen_batch"])):
        prompts = generation_prompts(spec["vocab_size"], batch, spec["prompt_len"])
        # Warm-up; compiled, at full length, so that the timed run meets no new shape.
        run_generate(prompts, spec["new_tokens"] if spec["compile"] else min(8, spec["new_tokens"]))
        ttft = []
        for _ in range(3):
            t0 = time.perf_counter()
            run_generate(prompts, 1)
            ttft.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tokens = run_generate(prompts, spec["new_tokens"])
        elapsed = time.perf_counter() - t0
        assert tokens.shape == (batch, spec["new_tokens"]), tokens.shape
        result[name] = dict(tokens_per_s=tokens.numel() / elapsed, ttft_s=min(ttft), tokens=tokens[0].tolist())
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def ours_multi_adapter(spec: dict[str, Any]) -> dict[str, Any]:
    """lit_llama.multi_lora.benchmark_multi_adapter: gen_batch rows over 8 unmerged adapters vs one merged."""
    from lit_llama.lora import LoRAConfig
    from lit_llama.multi_lora import benchmark_multi_adapter

    return benchmark_multi_adapter(
        LLaMAConfig(**BENCH_PRESETS[spec["preset"]]), n_rows=spec["gen_batch"], n_adapters=8,
        lora=LoRAConfig(r=spec["lora_r"], alpha=spec["lora_alpha"], dropout=0.0), prompt_length=spec["prompt_len"],
        max_new_tokens=spec["new_tokens"], dtype=DTYPES[spec["dtype"]], repeats=1,
    )


WORKERS = {("ours", "train"): ours_train, ("reference", "train"): reference_train,
           ("ours", "generate"): ours_generate, ("reference", "generate"): reference_generate,
           ("ours", "multi_adapter"): ours_multi_adapter}


def run_measurement(spec: dict[str, Any], tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    """Parent side: run one measurement in a fresh subprocess of this script, return its result."""
    tag = f"{spec['rep']}-{spec['task']}-{spec['dtype']}-{spec['impl']}"
    spec = {**spec, "result": str(tmp / f"result-{tag}.json")}
    spec_path = tmp / f"spec-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['impl']} {spec['task']} {spec['dtype']} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(spec["result"]).read_text())


def run_worker(spec_path: Path) -> None:
    """Subprocess side: run the measurement `spec_path` describes, write its result JSON."""
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    result = WORKERS[spec["impl"], spec["task"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------- report
def summary(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(values: list[float], digits: int) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in summary(values))


def versions() -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for pkg in ("transformers", "peft"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            parts.append(f"{pkg} missing")
    return ", ".join(parts)


def main(
    preset: Literal["134M", "tiny"] = "134M",
    dtype: Literal["bf16", "fp32", "both"] = "both",
    tasks: Literal["train", "generate", "multi_adapter", "all"] = "all",
    batch_size: int = 4,
    seq_len: int = 256,
    steps: int = 5,
    warmup: int = 2,
    prompt_len: int = 32,
    new_tokens: int = 128,
    gen_batch: int = 8,
    repeats: int = 3,
    threads: int | None = None,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    compile: bool = False,
    json_out: Path | None = None,
    worker: Path | None = None,
) -> dict[str, Any] | None:
    """Measure lit_llama against transformers + PEFT on one config and one set of weights.

    Args:
        preset: Model size: 134M (the issue's reference LLaMA, vocab 32000, 12 x 768) or tiny (a smoke test).
        dtype: bf16 (bf16 base weights, fp32 LoRA, autocast), fp32, or both.
        tasks: train (LoRA finetuning steps), generate (greedy decoding, batch 1 and gen_batch), multi_adapter
            (ours only: gen_batch rows over 8 different unmerged adapters vs one merged adapter), or all.
        batch_size: Training micro-batch size (sequences per step).
        seq_len: Training sequence length in tokens.
        steps: Timed training steps per run (after the warmup steps).
        warmup: Untimed training steps per run before the timed ones.
        prompt_len: Prompt tokens for generation.
        new_tokens: Tokens generated per sequence.
        gen_batch: Prompts generated together in the batched generation run.
        repeats: Runs per implementation and setting (each in its own subprocess, interleaved).
        threads: Torch threads in every run (default: the machine's CPU count).
        lora_r: LoRA rank (on the query and value projections).
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout on both implementations.
        compile: torch.compile the model (training) and the decode step (ours) / forward (reference).
        json_out: Also write every measurement as JSON here.
        worker: Internal: run the one measurement this spec file describes (the subprocesses' entry).
    """
    if worker is not None:
        run_worker(worker)
        return None
    for name, value in dict(batch_size=batch_size, seq_len=seq_len, steps=steps, prompt_len=prompt_len,
                            new_tokens=new_tokens, gen_batch=gen_batch, repeats=repeats, lora_r=lora_r).items():
        if value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    threads = threads or os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}")
    config = LLaMAConfig(**BENCH_PRESETS[preset], source=f"scripts/benchmark.py preset {preset}")
    if seq_len > config.block_size or prompt_len + new_tokens > config.block_size:
        raise ValueError(
            f"--seq_len {seq_len} or --prompt_len + --new_tokens {prompt_len + new_tokens} exceeds the preset's "
            f"block_size {config.block_size}; use shorter sequences"
        )
    dtypes = ["bf16", "fp32"] if dtype == "both" else [dtype]
    task_list = ["train", "generate", "multi_adapter"] if tasks == "all" else [tasks]
    multi_adapter = "multi_adapter" in task_list
    task_list = [t for t in task_list if t != "multi_adapter"]  # the side-by-side tasks
    torch.set_num_threads(threads)

    n_params = _param_count(config)
    print(f"# Benchmark: lit_llama vs transformers+PEFT, preset {preset} ({n_params / 1e6:.1f}M parameters)")
    print(f"- model: vocab {config.vocab_size}, {config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}, "
          f"intermediate {config.intermediate_size}, untied")
    print(f"- LoRA r={lora_r}, alpha={lora_alpha:g}, dropout={lora_dropout:g} on Q and V; AdamW on the LoRA parameters")
    print(f"- train: micro-batch {batch_size} x {seq_len} tokens, {warmup} warmup + {steps} timed steps, "
          "loss on ~50% of the positions (prompts masked)")
    print(f"- generate: greedy, prompt {prompt_len} tokens, {new_tokens} new tokens, batch 1 and {gen_batch}")
    print(f"- {threads} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, compile={compile}")
    print(f"- {versions()}")
    print(f"- load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lit-llama-bench-") as tmp:
        tmp = Path(tmp)
        if task_list:
            write_weights(config, tmp, dtypes)
        for name in dtypes:
            peaks[name] = matmul_peak_flops(DTYPES[name])
        bandwidth = read_bandwidth()
        plan = [
            (rep, task, name, impl)
            for rep in range(repeats) for task in task_list for name in dtypes
            for impl in (IMPLS if rep % 2 == 0 else IMPLS[::-1])
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        shared = dict(preset=preset, vocab_size=config.vocab_size, batch_size=batch_size, seq_len=seq_len, steps=steps,
                      warmup=warmup, prompt_len=prompt_len, new_tokens=new_tokens, gen_batch=gen_batch, threads=threads,
                      lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, compile=compile)
        for rep, task, name, impl in tqdm(plan, desc="benchmark", unit="run", file=sys.stderr):
            spec = dict(shared, rep=rep, impl=impl, task=task, dtype=name, lit_dir=str(tmp / f"lit-{name}"),
                        hf_dir=str(tmp / f"hf-{name}"))
            results.setdefault((task, name, impl), []).append(run_measurement(spec, tmp, env))
        multi: dict[str, list[dict[str, Any]]] = {}
        multi_plan = [(name, rep) for name in (dtypes if multi_adapter else []) for rep in range(repeats)]
        for name, rep in tqdm(multi_plan, desc="multi-adapter", unit="run", file=sys.stderr):  # ours alone
            spec = dict(shared, rep=rep, impl="ours", task="multi_adapter", dtype=name)
            multi.setdefault(name, []).append(run_measurement(spec, tmp, env))
        for name in dtypes:  # the peak again, after the runs: the load may have changed
            peaks[name] = max(peaks[name], matmul_peak_flops(DTYPES[name]))
        bandwidth = max(bandwidth, read_bandwidth())
    load_after = os.getloadavg()

    report = make_report(results, peaks, bandwidth, config, task_list, dtypes, batch_size, seq_len, prompt_len,
                         new_tokens, gen_batch)
    print(f"- matmul peak ({threads} threads, 2048^3): " + ", ".join(f"{n} {p / 1e9:.0f} GFLOP/s" for n, p in peaks.items()))
    ceilings = ", ".join(f"{n} {bandwidth / weight_bytes(config, n):.0f}" for n in dtypes)
    print(f"- memory read bandwidth ({threads} threads, sum over 512 MiB): {bandwidth / 1e9:.1f} GB/s, so batch-1 "
          f"decoding, which reads every matmul weight once per token, is bounded at {ceilings} tokens/s")
    print(f"- load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    print()
    if task_list:
        print(report["table"])
    for line in report["notes"]:
        print(line)
    for name, runs in multi.items():
        ratio = [r["ratio"] for r in runs]
        print(f"- {name} ours, {gen_batch} rows over 8 different unmerged adapters vs {gen_batch} rows over one merged "
              f"adapter (greedy, {new_tokens} new tokens): {fmt([r['multi_tokens_per_s'] for r in runs], 1)} vs "
              f"{fmt([r['merged_tokens_per_s'] for r in runs], 1)} tokens/s, ratio {fmt(ratio, 2)} (min / median / max)")
    report["multi_adapter"] = multi
    if json_out is not None:
        from lit_llama.checkpoint import atomic_write_text

        atomic_write_text(json_out, json.dumps(
            {"results": {"/".join(k): v for k, v in results.items()}, "peaks": peaks, "read_bandwidth": bandwidth,
             "rows": report["rows"],
             "multi_adapter": multi}, indent=2))
    return report


def _param_count(config: LLaMAConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LLaMA(config).parameters())


def weight_bytes(config: LLaMAConfig, dtype: str) -> int:
    """Bytes of the matmul weights one decoding step reads (the embedding lookup reads one row)."""
    return matmul_params(config) * DTYPES[dtype].itemsize


def make_report(results, peaks, bandwidth, config, task_list, dtypes, batch_size, seq_len, prompt_len, new_tokens,
                gen_batch) -> dict[str, Any]:
    """The markdown table (one row per task, dtype and metric) and notes on parity."""
    N, L, C = matmul_params(config), config.n_layer, config.n_embd
    train_flops = 4 * N + 6 * L * seq_len * C  # per token
    gen_flops = 2 * N + 4 * L * (prompt_len + new_tokens / 2) * C
    rows: list[dict[str, Any]] = []

    lines = ["| task | dtype | metric | ours min / median / max | transformers+PEFT min / median / max | ours/ref min / median / max |",
             "|---|---|---|---|---|---|"]
    notes = []
    for task in task_list:
        for name in dtypes:
            ours, ref = results[task, name, "ours"], results[task, name, "reference"]
            if task == "train":
                label = f"LoRA train {batch_size}x{seq_len}"
                metrics = [
                    ("tokens/s", lambda r: r["tokens_per_s"], 0),
                    ("first step (s)", lambda r: r["first_step_s"], 2),
                    ("peak RSS (MiB)", lambda r: r["peak_rss_mib"], 0),
                    ("MFU (%)", lambda r, n=name: 100 * r["tokens_per_s"] * train_flops / peaks[n], 1),
                ]
                batches = [(label, metrics)]
                notes.append(f"- {name} train: first-step loss ours {ours[0]['loss0']:.4f}, reference {ref[0]['loss0']:.4f} "
                             "(same weights and batch; LoRA B starts at zero)")
            else:
                batches = []
                for key, label in (("decode", "greedy decode B=1"), ("batch", f"greedy generate B={gen_batch}")):
                    batches.append((label, [
                        ("tokens/s", lambda r, k=key: r[k]["tokens_per_s"], 1),
                        ("time to first token (ms)", lambda r, k=key: 1000 * r[k]["ttft_s"], 1),
                        ("MFU (%)", lambda r, k=key, n=name: 100 * r[k]["tokens_per_s"] * gen_flops / peaks[n], 2),
                    ]))
                # Batch 1 reads all weights per token: its share of the memory bandwidth is the other roofline.
                batches[0][1].append(("weights streamed (% of read bandwidth)",
                                      lambda r, n=name: 100 * r["decode"]["tokens_per_s"] * weight_bytes(config, n) / bandwidth, 1))
                batches.append(("generate (both runs)", [("peak RSS (MiB)", lambda r: r["peak_rss_mib"], 0)]))
                same = sum(1 for _ in _common_prefix(ours[0]["decode"]["tokens"], ref[0]["decode"]["tokens"]))
                notes.append(f"- {name} decode: ours and reference agree on the first {same} of {new_tokens} greedy tokens")
                single = [r["decode"]["tokens_per_s"] for r in ours]
                batched = [r["batch"]["tokens_per_s"] for r in ours]
                notes.append(f"- {name} ours: generating {gen_batch} prompts at once gives "
                             f"{statistics.median(batched) / statistics.median(single):.2f}x the tokens/s of one prompt")
            for label, metrics in batches:
                for metric, get, digits in metrics:
                    o, f = [get(r) for r in ours], [get(r) for r in ref]
                    ratio = [a / b for a, b in zip(o, f)]
                    rows.append(dict(task=label, dtype=name, metric=metric, ours=summary(o), reference=summary(f), ratio=summary(ratio)))
                    lines.append(f"| {label} | {name} | {metric} | {fmt(o, digits)} | {fmt(f, digits)} | {fmt(ratio, 2)} |")
    return dict(table="\n".join(lines), notes=notes, rows=rows)


def _common_prefix(a: list[int], b: list[int]):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


if __name__ == "__main__":
    run(main)
