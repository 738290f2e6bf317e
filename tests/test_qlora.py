"""QLoRA (lit_llama/qlora.py): bitsandbytes' stored weights against a plain decode written here,
the quantized LoRA model against a float model holding those decoded weights (forward and LoRA
gradients), and finetune/lora.py --quantize end to end through scripts/merge_lora.py."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_llama.adapter import load_adapter
from lit_llama.checkpoint import CheckpointError, save_checkpoint
from lit_llama.lora import LoRAConfig, add_lora, lora_layers, mark_only_lora_as_trainable
from lit_llama.model import LLaMA, LLaMAConfig, init_weights
from lit_llama.qlora import FROZEN_LINEARS, load_quantized_lora_model, quantize_frozen_base

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA, TOKENIZER = DATA / "alpaca_data_first400.json", DATA / "llama-tokenizer.model"
# NF4's 16 values: Dettmers et al. 2023 (QLoRA), appendix E, to 4 decimals as printed there.
NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
                    0.3379, 0.4407, 0.5626, 0.7230, 1.0])
TINY = dict(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64, n_query_groups=2, intermediate_size=128)


def decode_nf4(weight) -> torch.Tensor:
    """A Params4bit's weight from its bytes: two codes a byte (high nibble first), each the stored table's
    value (state.code: the paper's NF4 to 4 decimals, checked below) times its block's absmax; a double-quantized absmax is code2[byte] * absmax2[its 256-block] + offset."""
    state = weight.quant_state
    codes = torch.stack([weight.data.reshape(-1) >> 4, weight.data.reshape(-1) & 15], 1).reshape(-1).long()
    if state.nested:
        i = torch.arange(state.absmax.numel())
        absmax = state.state2.code[state.absmax.long()] * state.state2.absmax[i // state.state2.blocksize] + state.offset
    else:
        absmax = state.absmax
    n = state.shape[0] * state.shape[1]
    assert torch.allclose(state.code, NF4, atol=5e-5, rtol=0)
    return (state.code[codes[:n]] * absmax[torch.arange(n) // state.blocksize]).reshape(state.shape)


def decode(layer) -> torch.Tensor:
    w = layer.weight
    if isinstance(w, bnb.nn.Int8Params):
        return w.data.float() * w.SCB.float()[:, None] / 127
    return decode_nf4(w)


@pytest.mark.parametrize("double", [False, True])
def test_bnb_nf4_codes_are_the_nearest_nf4_value_of_each_block_scaled_weight(double):
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    p = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double).to("cpu")
    got = decode_nf4(p)
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state), got)
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    best = ((blocks / absmax)[..., None] - NF4).abs().amin(-1) * absmax  # the nearest NF4 value's error
    # nf4: as close as the nearest value (up to the table's 4 decimals); nf4-dq: up to its 8-bit absmax too
    tol = 1e-3 * absmax if not double else 0.02 * absmax
    assert ((got.reshape(-1, 64) - blocks).abs() <= best + tol).all()
    assert (got.reshape(-1, 64) - blocks).abs().mean() < 0.1  # randn: a uniform 4-bit grid on [-absmax, absmax] gives ~0.1


def test_int8_weights_are_rowwise_absmax_rounding():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    scale = w.half().float().abs().amax(1, keepdim=True)
    assert torch.equal(p.data.float(), torch.round(w.half().float() / scale * 127))


def lora_model(seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    model = LLaMA(LLaMAConfig(**TINY))
    init_weights(model)
    add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, query=True, value=True, mlp=True))
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.05)  # a no-op adapter must not pass
    mark_only_lora_as_trainable(model)
    return model


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "int8"])
def test_quantized_forward_and_lora_grads_equal_a_float_model_of_the_decoded_weights(mode):
    model = lora_model()
    reference = copy.deepcopy(model)
    quantize_frozen_base(model, mode, torch.float32)
    for i, block in enumerate(model.transformer.h):
        for path in FROZEN_LINEARS:
            parent, attr = path.split(".")
            q, ref = getattr(getattr(block, parent), attr), getattr(getattr(reference.transformer.h[i], parent), attr)
            base = getattr(q, "base", q)
            assert not isinstance(base.weight, torch.nn.Parameter) or base.weight.dtype in (torch.uint8, torch.int8)
            ref.weight = torch.nn.Parameter(decode(base), requires_grad=False)
    idx = torch.randint(0, 256, (2, 16))
    out, expected = model(idx), reference(idx)
    scale = float(expected.detach().abs().max())
    assert (out - expected).abs().max() <= 1e-5 * scale  # fp32: only the order of additions differs
    out.square().mean().backward()
    expected.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * 4  # A and B of c_attn and three MLP layers
    for n, g in grads.items():
        assert (g - ref_grads[n]).abs().max() <= 1e-5 * float(ref_grads[n].abs().max()), n


def test_4bit_on_cpu_refuses_rows_that_bitsandbytes_misreads():
    model = LLaMA(LLaMAConfig(**{**TINY, "n_embd": 32}))
    with pytest.raises(ValueError, match="multiple of 64.*int8"):
        quantize_frozen_base(model, "nf4", torch.float32)


# ------------------------------------------------------------------------------------- end to end
def run(script: str, *args, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    if not (ALPACA.is_file() and TOKENIZER.is_file()):
        pytest.skip("needs ../shared/data (Alpaca sample, LLaMA tokenizer)")
    tmp = tmp_path_factory.mktemp("qlora")
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig(**{**TINY, "vocab_size": 32000, "block_size": 128}))
    init_weights(model)
    save_checkpoint(model, tmp / "base", tokenizer_path=TOKENIZER)
    run("scripts/prepare_alpaca.py", "--data_file", ALPACA, "--checkpoint_dir", tmp / "base",
        "--destination_path", tmp / "data", "--test_size", 16, "--max_seq_length", 128)
    return tmp


def finetune(workdir: Path, out: Path, *extra, ok: bool = True) -> subprocess.CompletedProcess:
    return run("finetune/lora.py", "--data_dir", workdir / "data", "--checkpoint_dir", workdir / "base", "--out_dir", out,
               "--precision", "32-true", "--accelerator", "cpu", "--train.max_iters", 12, "--train.batch_size", 2,
               "--train.micro_batch_size", 2, "--train.learning_rate", 1e-2, "--train.warmup_steps", 2,
               "--train.eval_interval", 12, "--train.eval_iters", 2, "--train.save_interval", 12, "--lora.dropout", 0.0,
               *extra, ok=ok)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_finetune_trains_and_merges_into_the_dequantized_base(workdir, mode):
    out = workdir / f"out-{mode}"
    proc = finetune(workdir, out, "--quantize", mode)
    val = [float(line.rsplit(" ", 1)[1]) for line in proc.stdout.splitlines() + proc.stderr.splitlines()
           if line.startswith("step ") and "val loss" in line]
    assert len(val) == 2 and val[1] < val[0] - 0.03, val  # step 0 and step 12 (the same validation batches)
    adapter, meta = load_adapter(out / "lit_model.lora.safetensors")
    assert meta.quantize == mode

    merged = workdir / f"merged-{mode}"
    proc = run("scripts/merge_lora.py", "--checkpoint_dir", workdir / "base", "--lora_path",
               out / "lit_model.lora.safetensors", "--output_dir", merged)
    assert f"trained on a {mode}-quantized base" in proc.stderr and "max" in proc.stderr
    base, got = load_file(workdir / "base" / "lit_model.safetensors"), load_file(merged / "lit_model.safetensors")
    name = "transformer.h.1.attn.c_attn.weight"
    w = base[name]
    dequantized = decode(_Holder(_quantized(w, mode)))
    A, B = adapter[name.replace("weight", "lora_A")], adapter[name.replace("weight", "lora_B")]
    q_rows, v_rows = slice(0, 64), slice(64 + 32, 128)  # [Q (4*16) | K (2*16) | V (2*16)]
    expected = dequantized.clone()
    expected[q_rows] += 2.0 * B[:64] @ A[:8]  # alpha / r = 16 / 8; lora_A = [A_q; A_v], lora_B = [B_q; B_v]
    expected[v_rows] += 2.0 * B[64:] @ A[8:]
    assert (got[name] - expected).abs().max() < 1e-5
    assert (got[name] - w).abs().max() > 1e-3  # the rounding is real: a float merge would differ
    mlp = "transformer.h.0.mlp.c_fc1.weight"
    assert torch.allclose(got[mlp], decode(_Holder(_quantized(base[mlp], mode))), atol=1e-6, rtol=0)  # not targeted


class _Holder:
    def __init__(self, weight):
        self.weight = weight


def _quantized(w, mode):
    if mode == "nf4":
        return bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False).to("cpu")
    return bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")


@pytest.mark.parametrize("args, message", [
    (("--quantize", "nf4", "--devices", "2", "--train.batch_size", 4), "--quantize nf4 trains on one device"),
    (("--quantize", "nf5"), "nf4-dq"),  # the allowed values
])
def test_bad_quantize_combinations_are_one_line(workdir, tmp_path, args, message):
    proc = finetune(workdir, tmp_path / "out", *args, ok=False)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr[-2000:]


def test_full_finetune_has_no_quantize_flag(workdir, tmp_path):
    proc = run("finetune/full.py", "--data_dir", workdir / "data", "--checkpoint_dir", workdir / "base",
               "--out_dir", tmp_path / "out", "--quantize", "nf4", ok=False)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "quantize" in lines[0], proc.stderr[-2000:]


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_quantized_loading_refuses_damaged_and_pickled_weights_like_every_other_loader(tmp_path):
    """load_quantized_lora_model opens the weights through checkpoint.open_weights: a truncated
    safetensors file is named damaged, a pickle holding objects is refused as code, neither is run."""
    save_checkpoint(LLaMA(LLaMAConfig(**TINY)), tmp_path / "base")
    weights = tmp_path / "base" / "lit_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="the file is damaged or incomplete"):
        load_quantized_lora_model(tmp_path / "base", LoRAConfig(r=2, alpha=4), "nf4", torch.float32)
    weights.unlink()
    torch.save({"transformer.wte.weight": _RunsCode()}, tmp_path / "base" / "lit_model.pth")
    with pytest.raises(CheckpointError, match="loading it could run code"):
        load_quantized_lora_model(tmp_path / "base", LoRAConfig(r=2, alpha=4), "nf4", torch.float32)
