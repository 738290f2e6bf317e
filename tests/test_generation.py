"""lit_llama.generation against transformers' greedy `generate`, on the same random weights mapped
through our converter; sampling filters against hand computations; generate/base.py end to end."""

from __future__ import annotations

import copy
import gc
import importlib.util
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from lit_llama.checkpoint import load_model
from lit_llama.decode_speedups import (
    PackedLinear,
    can_pack_linear,
    compile_decode_step,
    matvec_as_reduction,
    pack_linear_weights,
)
from lit_llama.generation import generate, generate_tokens, logits_to_probs, stream
from lit_llama.model import LLaMA, LLaMAConfig, init_weights

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_NEW = 40

BASE = dict(
    vocab_size=256, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, rms_norm_eps=1e-5,
)


def random_hf_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A tiny HF Llama whose logits are spread out (std ~1.7), so greedy decoding has no near-ties
    and does not fall into a two-token loop as with HF's std-0.02 init."""
    config = transformers.LlamaConfig(**{**BASE, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def convert(hf_model, out: Path, tokenizer: Path | None = None) -> Path:
    hf_model.save_pretrained(out / "hf")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "hf" / "tokenizer.model")
    spec = importlib.util.spec_from_file_location("convert_hf_checkpoint", REPO / "scripts" / "convert_hf_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(checkpoint_dir=out / "hf", output_dir=out / "lit")
    return out / "lit"


def hf_greedy(hf_model, prompt: torch.Tensor, max_new_tokens: int = MAX_NEW) -> torch.Tensor:
    """HF's greedy continuation of one 1-D prompt (new tokens only)."""
    ids = prompt[None]
    out = hf_model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0
    )
    assert out.shape[1] == len(prompt) + max_new_tokens  # no early stop on EOS
    return out[0, len(prompt):]


def prompts(*lengths: int, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, BASE["vocab_size"], (n,), generator=g) for n in lengths]


@pytest.fixture(scope="module", params=["mha", "gqa"])
def pair(request, tmp_path_factory):
    """(HF model, our model converted from it)."""
    hf = random_hf_llama(num_key_value_heads=4 if request.param == "mha" else 2)
    return hf, load_model(convert(hf, tmp_path_factory.mktemp(request.param)))


def test_greedy_matches_hf_generate(pair):
    hf, model = pair
    for prompt in prompts(5, 11):
        expected = hf_greedy(hf, prompt)
        out = generate(model, [prompt], MAX_NEW, temperature=0)[0]
        assert torch.equal(out[: len(prompt)], prompt)
        assert out[len(prompt):].tolist() == expected.tolist()


def test_batch_of_different_lengths_matches_each_prompt_alone(pair):
    hf, model = pair
    batch = prompts(3, 12, 7, seed=4)
    outs = generate(model, batch, MAX_NEW, temperature=0, pad_id=0)
    for prompt, out in zip(batch, outs):
        assert out[len(prompt):].tolist() == hf_greedy(hf, prompt).tolist()


def test_eos_stops_only_its_row(pair):
    hf, model = pair
    batch = prompts(4, 9, seed=5)
    expected = [hf_greedy(hf, p, 12).tolist() for p in batch]
    # EOS := the 4th token of row 0's greedy continuation, chosen so that it has not appeared before.
    stop = next(i for i in range(3, 12) if expected[0][i] not in expected[0][:i])
    eos_id = expected[0][stop]
    outs = generate(model, batch, 12, temperature=0, stop_ids=eos_id)
    for prompt, out, exp in zip(batch, outs, expected):
        cut = exp.index(eos_id) if eos_id in exp else len(exp)
        assert out[len(prompt):].tolist() == exp[:cut]  # stops before EOS, others run on
    assert len(outs[0]) == len(batch[0]) + stop


def test_any_of_several_stop_ids_stops_as_hf_generate_with_an_eos_list(pair):
    """generate(stop_ids=[a, b]) against HF generate(eos_token_id=[a, b]), which keeps the stop token
    (ours leaves it out); a is new in row 0's continuation, b in row 1's, so each row stops on its own."""
    hf, model = pair
    batch = prompts(6, 10, seed=7)
    free = [hf_greedy(hf, p, 16).tolist() for p in batch]
    first_new = lambda seq, start: next(i for i in range(start, len(seq)) if seq[i] not in seq[:i])
    a_at = first_new(free[0], 3)
    a = free[0][a_at]
    b_at = next(i for i in range(2, 16) if free[1][i] not in free[1][:i] and free[1][i] != a)
    b = free[1][b_at]
    outs = generate(model, batch, 16, temperature=0, stop_ids=[a, b])
    for prompt, out in zip(batch, outs):
        ids = prompt[None]
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                          eos_token_id=[a, b], pad_token_id=0)[0, len(prompt):].tolist()
        cut = next((i for i, t in enumerate(ref) if t in (a, b)), len(ref))
        assert out[len(prompt):].tolist() == ref[:cut]
        assert cut < 16  # each row did stop
    # the loop ends once every row has stopped, and stream() yields the same ids one by one
    steps = list(generate_tokens(model, batch, 16, temperature=0, stop_ids=(a, b)))
    assert len(steps) == max(len(o) - len(p) for o, p in zip(outs, batch)) + 1 < 16
    streamed = list(stream(model, batch[1], 16, temperature=0, stop_ids=(a, b)))
    assert streamed == outs[1][len(batch[1]):].tolist()
    assert generate(model, [batch[0]], 16, temperature=0, stop_ids=[])[0][len(batch[0]):].tolist() == free[0]


needs_onednn = pytest.mark.skipif(not can_pack_linear(torch.ones(1)), reason="this torch build has no oneDNN")


@needs_onednn
def test_packed_weights_greedy_matches_hf_generate(pair):
    """generate/base.py's eager path: every linear layer packed for oneDNN, still HF's greedy tokens,
    alone and in a left-padded batch."""
    hf, model = pair
    packed = copy.deepcopy(model)
    assert pack_linear_weights(packed) == 5 * packed.config.n_layer + 1
    for prompt in prompts(5, 11):
        assert generate(packed, [prompt], MAX_NEW, temperature=0)[0][len(prompt):].tolist() == hf_greedy(hf, prompt).tolist()
    batch = prompts(3, 12, 7, seed=4)
    for prompt, out in zip(batch, generate(packed, batch, MAX_NEW, temperature=0, pad_id=0)):
        assert out[len(prompt):].tolist() == hf_greedy(hf, prompt).tolist()


@needs_onednn
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_packed_linear_matches_a_float64_matmul(dtype, tol):
    """PackedLinear on a (B, T, in) input against float64 on the same rounded inputs: fp32 within 1e-5,
    bf16 within one bf16 rounding of the output (as in the matvec test above)."""
    if not can_pack_linear(torch.ones(1, dtype=dtype)):
        pytest.skip("this CPU has no bf16 instructions for oneDNN")
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(768, 3000, bias=False).to(dtype)
    torch.nn.init.normal_(linear.weight, generator=g)
    x = torch.randn(2, 5, 768, generator=g).to(dtype)
    expected = x.double() @ linear.weight.double().t()
    got = PackedLinear(linear)(x)
    assert got.dtype == dtype and got.shape == (2, 5, 3000)
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@needs_onednn
def test_pack_linear_weights_frees_the_unpacked_weights_and_leaves_a_tied_head():
    """Packing replaces the weights rather than adding copies: the old tensors are freed. A head tied
    to the embedding is left unpacked, since the embedding still needs the plain matrix."""
    model = LLaMA(LLaMAConfig.from_name("tiny")).eval()
    old = [weakref.ref(m.weight) for m in model.modules() if type(m) is torch.nn.Linear]
    assert pack_linear_weights(model) == len(old) == 5 * model.config.n_layer + 1
    gc.collect()
    assert all(ref() is None for ref in old)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())

    tied = LLaMA(LLaMAConfig.from_name("tiny", tie_embeddings=True)).eval()
    assert pack_linear_weights(tied) == 5 * tied.config.n_layer
    assert tied.lm_head.weight is tied.transformer.wte.weight


def test_eager_generate_does_not_import_dynamo():
    """Skipping dynamo's guard checks is for a compiled step only: the eager one must not pay the
    import of torch._dynamo (about 1 s) on its first token. In a fresh process, as other tests compile."""
    code = (
        "import sys, torch\n"
        "from lit_llama.generation import generate\n"
        "from lit_llama.model import LLaMA, LLaMAConfig\n"
        "model = LLaMA(LLaMAConfig.from_name('tiny')).eval()\n"
        "assert 'torch._dynamo' not in sys.modules, 'imported before generate'\n"
        "generate(model, torch.tensor([1, 2, 3]), 4, temperature=0.0)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_top_k_1_sampling_equals_greedy(pair):
    hf, model = pair
    prompt = prompts(6, seed=6)[0]
    out = generate(model, [prompt], 20, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(0))[0]
    assert out[len(prompt):].tolist() == hf_greedy(hf, prompt, 20).tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.3, 0.15, 0.5]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    # p=0.75: 0.5 < 0.75, 0.5+0.3 = 0.8 >= 0.75 -> keep {0.5, 0.3}, renormalised by 0.8.
    torch.testing.assert_close(logits_to_probs(logits, top_p=0.75), torch.tensor([[0.0, 0.375, 0.0, 0.625]]), atol=1e-6, rtol=0)
    # p=0.9: 0.8 < 0.9, 0.95 >= 0.9 -> keep three, renormalised by 0.95.
    torch.testing.assert_close(
        logits_to_probs(logits, top_p=0.9), torch.tensor([[0.0, 0.3 / 0.95, 0.15 / 0.95, 0.5 / 0.95]]), atol=1e-6, rtol=0
    )
    # p=0.4: the top token alone already reaches it.
    torch.testing.assert_close(logits_to_probs(logits, top_p=0.4), torch.tensor([[0.0, 0.0, 0.0, 1.0]]), atol=1e-6, rtol=0)
    # Temperature is applied before the filter: at T=0.5 the probabilities become p^2 / 0.365 =
    # [.0068, .2466, .0616, .6849]; top two .9315 >= 0.9 -> keep those two: [0, .09/.34, 0, .25/.34].
    torch.testing.assert_close(
        logits_to_probs(logits, temperature=0.5, top_p=0.9), torch.tensor([[0.0, 0.09 / 0.34, 0.0, 0.25 / 0.34]]),
        atol=1e-6, rtol=0,
    )


def run_generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "generate/base.py", "--accelerator", "cpu", *args], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def tok512_checkpoint(tmp_path_factory) -> Path:
    tokenizer = DATA / "tok512.model"
    if not tokenizer.is_file():
        pytest.skip(f"{tokenizer} is absent")
    hf = random_hf_llama(vocab_size=512, num_key_value_heads=2)
    return convert(hf, tmp_path_factory.mktemp("tok512"), tokenizer=tokenizer)


def test_generate_script_prints_text_and_tokens_per_second(tok512_checkpoint):
    assert (tok512_checkpoint / "tokenizer.model").is_file()  # copied by the converter
    proc = run_generate("--checkpoint_dir", str(tok512_checkpoint), "--prompt", "Once upon a time", "--max_new_tokens", "10")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time")
    assert "tokens/s" in proc.stderr and "Traceback" not in proc.stderr
    if can_pack_linear(torch.ones(1)):
        assert "Packed 11 linear layers for oneDNN" in proc.stderr  # 5 per layer x 2 layers + the head
    one = run_generate("--checkpoint_dir", str(tok512_checkpoint), "--prompt", "Once", "--max_new_tokens", "1")
    assert one.returncode == 0 and "Generated 1 token in" in one.stderr, one.stderr


def assert_one_line_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr


def test_generate_script_compile_prints_the_same_greedy_text_as_eager(tok512_checkpoint):
    """--compile compiles before generating (reported apart) and changes no greedy token (fp32)."""
    args = ("--checkpoint_dir", str(tok512_checkpoint), "--prompt", "Once upon a time", "--max_new_tokens", "12",
            "--temperature", "0", "--num_samples", "2")
    eager, compiled = run_generate(*args), run_generate(*args, "--compile", "true")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    assert compiled.stdout == eager.stdout
    assert "Compiled the decode step in" in compiled.stderr


def test_generate_script_missing_checkpoint_dir_is_one_error_line(tmp_path):
    assert_one_line_error(run_generate("--checkpoint_dir", str(tmp_path / "nope")))


def test_generate_script_prompt_longer_than_context_is_one_error_line(tok512_checkpoint):
    proc = run_generate("--checkpoint_dir", str(tok512_checkpoint), "--prompt", "Once upon a time " * 40)
    assert_one_line_error(proc)
    assert "context" in proc.stderr


def test_compiled_decode_step_generates_the_eager_greedy_tokens():
    """generate/base.py --compile: the decode step compiled (one-row matmuls as reductions on CPU)
    continues a batch of prompts exactly as the eager step does."""
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny")).eval()
    init_weights(model, std=0.2)  # a spread of logits, so greedy choices are not ties
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9)]
    eager = generate(model, prompts, 12, temperature=0.0)
    compiled = generate(model, prompts, 12, temperature=0.0, decode_fn=compile_decode_step("cpu"))
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


@needs_onednn
def test_compiled_decode_step_over_packed_weights_generates_the_eager_greedy_tokens():
    """generate/base.py --compile --num_samples 2 on CPU: packed weights, each matmul one call of the
    packed_linear custom op inside the compiled graph; the same tokens as the plain eager model."""
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny")).eval()
    init_weights(model, std=0.2)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9)]
    eager = generate(model, prompts, 12, temperature=0.0)
    pack_linear_weights(model)
    compiled = generate(model, prompts, 12, temperature=0.0, decode_fn=compile_decode_step("cpu"))
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_matvec_as_reduction_matches_a_float64_matmul(dtype, tol):
    """The decomposition the compiled CPU decode step uses for (1, K) @ (K, N), against float64
    on the same (rounded) inputs: fp32 within 1e-5, bf16 within one bf16 rounding of the output
    (2^-8 relative, 1e-2 with margin); an output row is a dot product of length K = 768."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 768, generator=g).to(dtype)
    w = torch.randn(3000, 768, generator=g).to(dtype)  # (out, in) like nn.Linear; mm sees w.t()
    expected = a.double() @ w.double().t()
    got = matvec_as_reduction(a, w.t())
    assert got.dtype == dtype and got.shape == (1, 3000)
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert matvec_as_reduction(torch.randn(2, 768).to(dtype), w.t()) is NotImplemented


def test_compiled_decode_step_on_cpu_has_no_matmul_call_left_at_batch_1():
    """compile_decode_step's backend decomposes every one-row matmul (the whole point on CPU), so the
    generated code calls no external mm/addmm kernel at batch 1 (a plain torch.compile leaves 11 here:
    5 per layer and the head)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny")).eval()
    prompt = torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(5))
    step = compile_decode_step("cpu")
    _, code = run_and_get_code(lambda: generate(model, [prompt], 3, temperature=0.0, decode_fn=step))
    assert code, "nothing was compiled"
    assert not any("extern_kernels.mm" in c or "extern_kernels.addmm" in c for c in code)


@pytest.mark.parametrize("kwargs, message", [(dict(temperature=float("nan")), "temperature must be >= 0"),
                                             (dict(temperature=1.0, top_p=0.0), "top_p must be in")])
def test_generate_refuses_sampling_settings_without_a_meaning(kwargs, message):
    model = LLaMA(LLaMAConfig.from_name("tiny"))
    with pytest.raises(ValueError, match=message):
        generate(model, [torch.tensor([1, 2])], 2, **kwargs)
