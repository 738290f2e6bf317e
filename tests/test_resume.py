"""Resuming training: a run interrupted (SIGKILL, a crash, a corrupt last state) and resumed ends
with exactly the weights of an uninterrupted run; the same seed gives the same loss curve on CPU.

The reference for every comparison is an uninterrupted run of the same configuration; the
optimizer round trip is compared with torch's own `Optimizer.state_dict`, and the sharded sampler
with torch's `DistributedSampler`."""

import json
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import lit_llama.resume as train_states
from lit_llama.checkpoint import save_checkpoint
from lit_llama.data import collate
from lit_llama.distributed import setup_fabric
from lit_llama.lora import LoRAConfig, build_lora_model, lora_state_dict, mark_only_lora_as_trainable
from lit_llama.model import LLaMA, LLaMAConfig, init_weights
from lit_llama.resume import STATE_DIR, flatten_optimizer, list_states, unflatten_optimizer, verify_state
from lit_llama.samplers import EpochSampler, resumable_dataloader
from lit_llama.training import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = DATA / "alpaca_data_first400.json"
TOKENIZER = DATA / "tok512.model"


# ------------------------------------------------------------------------ in-process runs of fit
def synthetic_samples(n: int = 21) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n):
        ids = torch.randint(0, 256, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g)
        labels = ids.clone()
        labels[:2] = -100  # a masked "prompt"
        samples.append({"input_ids": ids, "labels": labels})
    return samples


class Crash(Exception):
    pass


def train(out_dir: Path, seed: int = 1337, max_iters: int = 12, save_interval: int = 2, keep_last: int = 2,
          resume=None, crash_at: str | None = None):
    """fit() on a tiny LoRA model (dropout on, so the RNG matters) over 21 samples: 11 micro-batches
    of 2 per epoch, 5 optimizer steps of 4 samples (the 11th micro-batch is dropped)."""
    fabric = setup_fabric("cpu", 1, "32-true", seed)
    model = build_lora_model(LLaMAConfig.from_name("tiny"), LoRAConfig(r=4, alpha=8, dropout=0.1))
    init_weights(model)  # LoRA B non-zero too
    mark_only_lora_as_trainable(model)
    samples = synthetic_samples()
    collate_fn = partial(collate, pad_id=0)
    loader = resumable_dataloader(fabric, samples, 2, shuffle=True, seed=seed, collate_fn=collate_fn)
    val = fabric.setup_dataloaders(DataLoader(samples[:4], batch_size=2, collate_fn=collate_fn, generator=torch.Generator()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    cfg = TrainConfig(learning_rate=1e-2, batch_size=4, micro_batch_size=2, max_iters=max_iters, warmup_steps=2,
                      eval_interval=5, eval_iters=2, save_interval=save_interval, keep_last=keep_last)

    def save(stem: Path) -> None:
        if stem.name == crash_at:
            raise Crash(stem.name)

    result = fit(fabric, model, optimizer, loader, val, cfg, out_dir, save, checkpoint_name="final", resume=resume)
    return {k: v.clone() for k, v in lora_state_dict(model.module).items()}, result


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize(
    "save_interval, crash_at, resumed_step",
    [
        (2, "iter-000006-final", 4),  # mid-epoch: step 4 is micro-batch 8 of 10 in epoch 1
        (5, "iter-000010-final", 5),  # at an epoch's end: step 5 used all 10 micro-batches of epoch 1
    ],
)
def test_crash_then_resume_matches_uninterrupted_run(tmp_path, reference, save_interval, crash_at, resumed_step):
    with pytest.raises(Crash):
        train(tmp_path, save_interval=save_interval, crash_at=crash_at)
    assert max(int(p.stem.split("-")[1]) for p in list_states(tmp_path / STATE_DIR)) == resumed_step
    weights, result = train(tmp_path, save_interval=save_interval, resume="auto")
    assert_same_weights(weights, reference[0])
    # The loss curve of the resumed run (rows before the crash kept, the rest redone) is the same too.
    ref_rows = [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in reference[1]["history"]]
    assert [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in result["history"]] == ref_rows


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_tensors", "cut_manifest"])
def test_corrupt_latest_state_falls_back_to_previous_with_warning(tmp_path, reference, damage):
    train(tmp_path)  # complete: states 10 and 12 kept
    state_dir = tmp_path / STATE_DIR
    assert [p.name for p in list_states(state_dir)] == ["state-000010.json", "state-000012.json"]
    assert (state_dir / "latest").read_text().strip() == "state-000012"
    tensors, manifest = state_dir / "state-000012.safetensors", state_dir / "state-000012.json"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    elif damage == "flip_byte":
        data = bytearray(tensors.read_bytes())
        data[-10] ^= 0x01  # inside the tensor data: same size, different hash
        tensors.write_bytes(bytes(data))
    elif damage == "drop_tensors":
        tensors.unlink()
    else:
        manifest.write_text(manifest.read_text()[:100])
    with pytest.warns(UserWarning, match=r"state-000012\.json is unusable"):
        weights, _ = train(tmp_path, resume="auto")  # from state 10: steps 11 and 12 again
    assert_same_weights(weights, reference[0])
    # The damaged state was replaced by a good one for step 12.
    assert [p.name for p in list_states(state_dir)] == ["state-000010.json", "state-000012.json"]
    verify_state(manifest)


def test_keep_last_and_latest_pointer(tmp_path):
    train(tmp_path, max_iters=8, save_interval=2, keep_last=3)
    state_dir = tmp_path / STATE_DIR
    assert sorted(p.name for p in state_dir.iterdir()) == [
        "latest", *(f"state-{s:06d}.{ext}" for s in (4, 6, 8) for ext in ("json", "safetensors"))
    ]
    doc = verify_state(state_dir / "state-000008.json")
    assert doc["tensors"]["bytes"] == (state_dir / "state-000008.safetensors").stat().st_size
    assert doc["counters"]["step"] == 8


def test_same_seed_gives_identical_loss_curve_on_cpu(tmp_path, reference):
    _, again = train(tmp_path / "a")
    _, other_seed = train(tmp_path / "b", seed=7)
    curve = [(r["step"], r["train_loss"]) for r in reference[1]["history"] if "train_loss" in r]
    assert len(curve) == 12
    assert [(r["step"], r["train_loss"]) for r in again["history"] if "train_loss" in r] == curve  # bitwise equal
    assert [(r["step"], r["train_loss"]) for r in other_seed["history"] if "train_loss" in r] != curve


# ------------------------------------------------------------------------ pieces, against torch
def test_optimizer_state_round_trip_matches_torch_state_dict():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-3, betas=(0.8, 0.9))
    for _ in range(3):
        sum((p**2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    tensors, plain = flatten_optimizer(opt.state_dict())
    json.dumps(plain)  # the non-tensor half is plain JSON
    fresh = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=5.0)
    fresh.load_state_dict(unflatten_optimizer(tensors, json.loads(json.dumps(plain))))
    want, got = opt.state_dict(), fresh.state_dict()
    assert got["param_groups"] == want["param_groups"]  # betas come back as a tuple, lr as saved
    for i in want["state"]:
        for key, value in want["state"][i].items():
            assert torch.equal(got["state"][i][key], value), (i, key)


def test_epoch_sampler_shards_like_distributed_sampler_and_resumes_mid_epoch():
    data = list(range(11))
    for rank in range(3):
        ours = EpochSampler(len(data), shuffle=False, num_replicas=3, rank=rank)
        theirs = DistributedSampler(data, num_replicas=3, rank=rank, shuffle=False)
        assert list(ours) == list(theirs) and len(ours) == len(theirs)
    s = EpochSampler(len(data), shuffle=True, seed=5)
    s.set_position(2)
    full = list(s)
    assert sorted(full) == data
    s.set_position(0)
    list(s)  # earlier iterations must not change a later epoch's order
    s.set_position(2, start=4)
    assert list(s) == full[4:]
    s.set_position(3)
    assert list(s) != full


# ------------------------------------------------------------------------ SIGKILL, end to end
def final_named_files_are_complete(out: Path) -> None:
    """Every file under a final name is whole: safetensors files load, JSON parses, manifests verify,
    `latest` names an intact state. Only `.NAME.*.tmp` files may be partial."""
    for path in [*out.iterdir(), *(out / STATE_DIR).glob("*")] if (out / STATE_DIR).is_dir() else out.iterdir():
        if path.is_dir() or (path.name.startswith(".") and path.name.endswith(".tmp")):
            continue
        if path.suffix == ".safetensors":
            load_file(path)
        elif path.name.startswith("state-") and path.suffix == ".json":
            verify_state(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.name == "latest":
            verify_state(path.parent / f"{path.read_text().strip()}.json")


def latest_step(out: Path) -> int:
    try:
        return int((out / STATE_DIR / "latest").read_text().strip().split("-")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return -1


@pytest.mark.skipif(not (ALPACA.is_file() and TOKENIZER.is_file()), reason="needs ../shared/data (Alpaca sample, tok512.model)")
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=512, block_size=256))
    init_weights(model)
    save_checkpoint(model, tmp_path / "base", tokenizer_path=TOKENIZER)
    subprocess.run([sys.executable, "scripts/prepare_alpaca.py", "--data_file", str(ALPACA), "--checkpoint_dir",
                    str(tmp_path / "base"), "--destination_path", str(tmp_path / "data"), "--test_size", "349",
                    "--max_seq_length", "256"], cwd=ROOT, check=True, capture_output=True)

    def command(out: Path, *extra: str) -> list[str]:
        # 51 training samples: 26 micro-batches, 13 steps per epoch; 30 steps cross two epoch ends.
        return [sys.executable, "finetune/lora.py", "--data_dir", str(tmp_path / "data"), "--checkpoint_dir",
                str(tmp_path / "base"), "--out_dir", str(out), "--precision", "32-true", "--accelerator", "cpu",
                "--train.max_iters", "30", "--train.batch_size", "4", "--train.micro_batch_size", "2",
                "--train.learning_rate", "1e-2", "--train.warmup_steps", "2", "--train.eval_interval", "10",
                "--train.eval_iters", "2", "--train.save_interval", "1", "--lora.dropout", "0.1", *extra]

    subprocess.run(command(tmp_path / "ref"), cwd=ROOT, check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    rng = random.Random(20240607)
    targets = sorted(rng.sample(range(2, 29), 3))  # kill once the run has saved the state of this step ...
    kills = 0
    log = open(tmp_path / "killed.log", "w")
    for target in targets:
        proc = subprocess.Popen(command(out, "--resume", "auto"), cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while proc.poll() is None and latest_step(out) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))  # ... plus a random moment: mid-step, mid-save, mid-rename
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        assert latest_step(out) >= 1  # never killed before a state existed
        final_named_files_are_complete(out)
    done = subprocess.run(command(out, "--resume", "auto"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert kills >= 2, f"only {kills} of the 3 kills landed before the run finished"
    assert "Resumed from" in done.stdout + done.stderr

    final_named_files_are_complete(out)
    assert not [p for p in out.rglob("*.tmp")], "the last run cleans up temporary files of killed writes"
    ref, got = load_file(tmp_path / "ref" / "lit_model.lora.safetensors"), load_file(out / "lit_model.lora.safetensors")
    assert_same_weights(got, ref)
    for step in (10, 20, 29):  # the periodic adapters too
        name = f"iter-{step:06d}-lit_model.lora.safetensors"
        assert_same_weights(load_file(out / name), load_file(tmp_path / "ref" / name))


def test_cleanup_and_pruning_never_follow_links(tmp_path):
    """An out_dir with a linked subfolder and a linked train_state: the temporary-looking files and
    the states behind the links belong to someone else and stay."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    foreign_tmp = elsewhere / ".notes.abc123.tmp"
    foreign_tmp.write_text("not ours")
    for step in (1, 2, 3):
        (elsewhere / f"state-{step:06d}.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "linked").symlink_to(elsewhere, target_is_directory=True)
    (out / ".ours.def456.tmp").write_text("left by an interrupted write")
    (out / ".link.ghi789.tmp").symlink_to(foreign_tmp)
    removed = train_states.clean_stale_temps(out)
    assert removed == [out / ".ours.def456.tmp"]
    assert foreign_tmp.read_text() == "not ours" and (out / ".link.ghi789.tmp").is_symlink()
    (out / STATE_DIR).symlink_to(elsewhere, target_is_directory=True)
    train_states.prune_states(out / STATE_DIR, keep_last=1)
    assert sorted(p.name for p in elsewhere.glob("state-*.json")) == [f"state-{s:06d}.json" for s in (1, 2, 3)]
