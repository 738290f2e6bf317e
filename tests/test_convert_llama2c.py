"""The llama2.c converter against a numpy llama2.c forward pass written here (it reads the .bin
with numpy itself: interleaved RoPE, GQA, SwiGLU, RMSNorm, as run.c computes them), on the real
stories260K.bin and on synthetic .pt / .bin files built by the tests; plus run.c's published
greedy output and clear errors for broken files."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_llama.checkpoint import load_model
from lit_llama.generation import generate

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STORIES = DATA / "stories260K.bin"
TOK512 = DATA / "tok512.model"
# run.c's greedy continuation of BOS with stories260K (data README, from llama2.c test_all.py).
RUN_C_FIRST_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/convert_llama2c_checkpoint.py", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "LIT_LLAMA_DEBUG": ""},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


# ----------------------------------------------------------------------- numpy llama2.c reference
def read_bin_numpy(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Header and weights of a legacy llama2.c .bin, in run.c's `memory_map_weights` order."""
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = np.fromfile(path, dtype="<i4", count=7).tolist()
    cfg = dict(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=n_layers)
    flat = np.fromfile(path, dtype="<f4", offset=28)
    hs = dim // n_heads
    w, pos = {}, 0

    def take(shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = flat[pos:pos + n].reshape(shape)
        pos += n
        return out

    w["tok"] = take((abs(vocab), dim))
    for key, shape in [
        ("att_norm", (dim,)), ("wq", (dim, dim)), ("wk", (n_kv_heads * hs, dim)), ("wv", (n_kv_heads * hs, dim)),
        ("wo", (dim, dim)), ("ffn_norm", (dim,)), ("w1", (hidden, dim)), ("w2", (dim, hidden)), ("w3", (hidden, dim)),
    ]:
        w[key] = take((n_layers, *shape))
    w["norm"] = take((dim,))
    take((seq_len, hs // 2))  # freq_cis_real
    take((seq_len, hs // 2))  # freq_cis_imag
    w["out"] = w["tok"] if vocab > 0 else take((abs(vocab), dim))
    assert pos == flat.size
    return cfg, w


def numpy_forward(cfg: dict, w: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Logits (T, V) of llama2.c's Transformer for `tokens` at positions 0..T-1, in float32 like run.c."""
    dim, nh, ng = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hs, T = dim // nh, len(tokens)

    def rmsnorm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(1e-5)) * weight

    def rope(x):  # x (T, heads, hs): rotate pairs (x[2j], x[2j+1]) by pos * 10000^(-2j/hs)
        freq = 1.0 / np.power(np.float32(10000.0), np.arange(0, hs, 2, dtype=np.float32) / hs)
        angle = np.arange(T, dtype=np.float32)[:, None] * freq[None, :]  # (T, hs/2)
        cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    x = w["tok"][tokens].astype(np.float32)  # (T, dim)
    causal = np.tril(np.ones((T, T), dtype=bool))
    for layer in range(cfg["n_layers"]):
        h = rmsnorm(x, w["att_norm"][layer])
        q = rope((h @ w["wq"][layer].T).reshape(T, nh, hs))
        k = rope((h @ w["wk"][layer].T).reshape(T, ng, hs))
        v = (h @ w["wv"][layer].T).reshape(T, ng, hs)
        att_out = np.empty((T, nh, hs), dtype=np.float32)
        for head in range(nh):
            kv = head // (nh // ng)  # run.c: h / kv_mul
            scores = q[:, head] @ k[:, kv].T / np.sqrt(np.float32(hs))  # (T, T)
            scores = np.where(causal, scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            att_out[:, head] = p @ v[:, kv]
        x = x + att_out.reshape(T, dim) @ w["wo"][layer].T
        h = rmsnorm(x, w["ffn_norm"][layer])
        a, b = h @ w["w1"][layer].T, h @ w["w3"][layer].T
        x = x + ((a / (1 + np.exp(-a))) * b) @ w["w2"][layer].T
    return rmsnorm(x, w["norm"]) @ w["out"].T


def numpy_greedy(cfg: dict, w: dict[str, np.ndarray], n_new: int) -> list[int]:
    tokens = [1]
    for _ in range(n_new):
        tokens.append(int(numpy_forward(cfg, w, tokens)[-1].argmax()))
    return tokens[1:]


def our_logits(checkpoint_dir: Path, tokens: list[int]) -> np.ndarray:
    model = load_model(checkpoint_dir)
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].numpy()


# ----------------------------------------------------------------------------- real stories260K
@pytest.fixture(scope="module")
def stories260K(tmp_path_factory) -> Path:
    if not (STORIES.is_file() and TOK512.is_file()):
        pytest.skip(f"{STORIES} or {TOK512} is absent")
    out = tmp_path_factory.mktemp("stories260K")
    proc = run_script("--checkpoint_path", STORIES, "--tokenizer_path", TOK512, "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_stories260K_greedy_matches_numpy_llama2c_and_run_c(stories260K):
    model = load_model(stories260K)
    ours = generate(model, [torch.tensor([1])], 200, temperature=0)[0][1:].tolist()
    cfg, w = read_bin_numpy(STORIES)
    reference = numpy_greedy(cfg, w, 64)
    assert ours[:64] == reference
    assert ours[:10] == RUN_C_FIRST_IDS


def test_stories260K_logits_match_numpy_llama2c(stories260K):
    import sentencepiece

    tokens = [1] + sentencepiece.SentencePieceProcessor(model_file=str(TOK512)).encode(
        "Once upon a time, there was a little girl named Lily. She loved to play outside."
    )
    cfg, w = read_bin_numpy(STORIES)
    np.testing.assert_allclose(our_logits(stories260K, tokens), numpy_forward(cfg, w, tokens), rtol=0, atol=1e-4)
    assert (stories260K / "tokenizer.model").read_bytes() == TOK512.read_bytes()


def test_truncated_bin_is_a_clear_error(tmp_path):
    if not STORIES.is_file():
        pytest.skip(f"{STORIES} is absent")
    broken = tmp_path / "broken.bin"
    broken.write_bytes(STORIES.read_bytes()[:-1000])
    assert_one_line_error(run_script("--checkpoint_path", broken, "--output_dir", tmp_path / "out"), "truncated")
    assert not (tmp_path / "out" / "lit_model.safetensors").exists()


# --------------------------------------------------------------------------- synthetic files
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=56, max_seq_len=48)


def random_llama2c_weights(seed: int, tied: bool) -> dict[str, np.ndarray]:
    """Weights of a tiny llama2.c model in the numpy reference's layout (layers stacked)."""
    rng = np.random.default_rng(seed)
    dim, L, hidden, V = TINY["dim"], TINY["n_layers"], TINY["hidden_dim"], TINY["vocab_size"]
    kv = TINY["n_kv_heads"] * dim // TINY["n_heads"]

    def rand(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    w = dict(
        tok=rand(V, dim), att_norm=1 + rand(L, dim, scale=0.1), wq=rand(L, dim, dim), wk=rand(L, kv, dim),
        wv=rand(L, kv, dim), wo=rand(L, dim, dim), ffn_norm=1 + rand(L, dim, scale=0.1), w1=rand(L, hidden, dim),
        w2=rand(L, dim, hidden), w3=rand(L, hidden, dim), norm=1 + rand(dim, scale=0.1),
    )
    w["out"] = w["tok"] if tied else rand(V, dim)
    return w


def llama2c_state_dict(w: dict[str, np.ndarray], prefix: str) -> dict[str, torch.Tensor]:
    """The state dict llama2.c's model.py Transformer would save (Meta names)."""
    sd = {"tok_embeddings.weight": torch.from_numpy(w["tok"])}
    names = dict(att_norm="attention_norm", wq="attention.wq", wk="attention.wk", wv="attention.wv", wo="attention.wo",
                 ffn_norm="ffn_norm", w1="feed_forward.w1", w2="feed_forward.w2", w3="feed_forward.w3")
    for i in range(TINY["n_layers"]):
        for key, name in names.items():
            sd[f"layers.{i}.{name}.weight"] = torch.from_numpy(w[key][i].copy())
    sd["norm.weight"] = torch.from_numpy(w["norm"])
    # llama2.c ties by sharing one Parameter, so both keys point at the same storage.
    sd["output.weight"] = sd["tok_embeddings.weight"] if w["out"] is w["tok"] else torch.from_numpy(w["out"])
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("tied,prefix", [(True, "_orig_mod."), (False, "")], ids=["tied-compiled", "untied"])
def test_synthetic_pt_logits_match_numpy_llama2c(tmp_path, tied, prefix):
    w = random_llama2c_weights(seed=1, tied=tied)
    model_args = dict(TINY, multiple_of=8, dropout=0.0)
    del model_args["hidden_dim"]  # train.py's model_args has no hidden_dim: the converter reads it off w1
    sd = llama2c_state_dict(w, prefix)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).state_dict()
    checkpoint = {"model": sd, "optimizer": optimizer, "model_args": model_args, "iter_num": 100,
                  "best_val_loss": torch.tensor(1.5), "config": {"batch_size": 8, "dataset": "tinystories"}}
    torch.save(checkpoint, tmp_path / "ckpt.pt")

    load_script("convert_llama2c_checkpoint").main(checkpoint_path=tmp_path / "ckpt.pt", output_dir=tmp_path / "out")
    tokens = [1, 5, 9, 33, 2, 60, 17, 17, 40, 3]
    cfg = dict(dim=TINY["dim"], n_heads=TINY["n_heads"], n_kv_heads=TINY["n_kv_heads"], n_layers=TINY["n_layers"])
    np.testing.assert_allclose(our_logits(tmp_path / "out", tokens), numpy_forward(cfg, w, tokens), rtol=0, atol=1e-4)
    config = load_model(tmp_path / "out").config
    assert (config.tie_embeddings, config.block_size, config.intermediate_size) == (tied, 48, 56)


def write_legacy_bin(path: Path, w: dict[str, np.ndarray], shared: bool) -> None:
    """llama2.c export.py `legacy_export`: header (vocab negated when the head is separate), then weights."""
    hs = TINY["dim"] // TINY["n_heads"]
    vocab = TINY["vocab_size"] if shared else -TINY["vocab_size"]
    header = [TINY["dim"], TINY["hidden_dim"], TINY["n_layers"], TINY["n_heads"], TINY["n_kv_heads"], vocab, TINY["max_seq_len"]]
    angles = np.outer(np.arange(TINY["max_seq_len"]), 1.0 / 10000 ** (np.arange(0, hs, 2) / hs)).astype(np.float32)
    parts = [w[k] for k in ("tok", "att_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm")]
    parts += [np.cos(angles), np.sin(angles)] + ([] if shared else [w["out"]])
    with open(path, "wb") as f:
        f.write(np.array(header, dtype="<i4").tobytes())
        for part in parts:
            f.write(np.ascontiguousarray(part, dtype="<f4").tobytes())


def test_unshared_classifier_bin_logits_match_numpy_llama2c(tmp_path):
    w = random_llama2c_weights(seed=2, tied=False)
    write_legacy_bin(tmp_path / "model.bin", w, shared=False)
    load_script("convert_llama2c_checkpoint").main(checkpoint_path=tmp_path / "model.bin", output_dir=tmp_path / "out")
    cfg, w_read = read_bin_numpy(tmp_path / "model.bin")
    assert np.array_equal(w_read["out"], w["out"]) and not np.array_equal(w_read["out"], w_read["tok"])
    tokens = [1, 7, 7, 30, 63, 0, 12]
    np.testing.assert_allclose(our_logits(tmp_path / "out", tokens), numpy_forward(cfg, w_read, tokens), rtol=0, atol=1e-4)
    assert load_model(tmp_path / "out").config.tie_embeddings is False


def test_pt_with_arbitrary_objects_is_refused(tmp_path):
    # A train.py variant that pickled its args object: weights_only loading refuses, and so must we.
    sd = llama2c_state_dict(random_llama2c_weights(seed=3, tied=True), "")
    torch.save({"model": sd, "model_args": types.SimpleNamespace(**TINY)}, tmp_path / "ckpt.pt")
    assert_one_line_error(run_script("--checkpoint_path", tmp_path / "ckpt.pt", "--output_dir", tmp_path / "out"), "weights_only")


def test_help_and_missing_file(tmp_path):
    proc = run_script("--help")
    assert proc.returncode == 0 and "--checkpoint_path" in proc.stdout and "--tokenizer_path" in proc.stdout
    assert_one_line_error(run_script("--checkpoint_path", tmp_path / "nope.bin", "--output_dir", tmp_path), "does not exist")
