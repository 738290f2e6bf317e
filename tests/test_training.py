"""lit_llama/training.py's loss: the masked next-token loss (head only on unmasked positions,
chunked fp32 softmax with a fused gradient for a frozen head) against torch's cross-entropy over
every position's full logits, in value and gradient."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.training import TrainConfig, describe_schedule, lr_at, masked_next_token_loss


def tiny_model_and_batch() -> tuple[LLaMA, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # logits with a spread (std ~2), so the softmax is not uniform
    idx = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = idx.clone()
    labels[0, :7] = -100  # a masked prompt
    labels[1, 12:] = -100  # padding
    labels[2, :] = -100  # a row without any target
    return model, idx, labels


@pytest.mark.parametrize("frozen_head", [True, False], ids=["frozen-head-fused", "trained-head-autograd"])
def test_masked_loss_and_grads_match_torch_cross_entropy_on_full_logits(frozen_head):
    model, idx, labels = tiny_model_and_batch()
    model.lm_head.weight.requires_grad_(not frozen_head)
    params = [p for p in model.parameters() if p.requires_grad]

    got = masked_next_token_loss(model, idx, labels, chunk_size=5)  # several chunks, a partial last one
    logits = model(idx)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for g, e in zip(torch.autograd.grad(got, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_masked_loss_of_a_batch_without_targets_is_zero_not_nan():
    model, idx, labels = tiny_model_and_batch()
    model.lm_head.weight.requires_grad_(False)
    loss = masked_next_token_loss(model, idx, torch.full_like(labels, -100))
    assert loss.item() == 0.0
    loss.backward()  # a graph, and finite (zero) gradients
    assert all(torch.all(p.grad == 0) for p in model.parameters() if p.grad is not None)


def test_loss_curve_png_is_drawn_from_the_metrics_rows(tmp_path):
    pytest.importorskip("matplotlib")  # in the test extra; the note path below runs without it
    from lit_llama.run_dir import plot_loss_curve

    rows = [{"step": 0, "val_loss": 5.0}] + [{"step": s, "train_loss": 5.0 / s} for s in range(1, 21)]
    rows.append({"step": 20, "val_loss": 0.4})
    message = plot_loss_curve(rows, tmp_path / "loss.png")
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000 and str(tmp_path / "loss.png") in message
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary file left beside it


def test_loss_curve_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    from lit_llama.run_dir import plot_loss_curve

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    message = plot_loss_curve([{"step": 1, "train_loss": 1.0}], tmp_path / "loss.png")
    assert "pip install matplotlib" in message and "metrics.csv" in message
    assert not (tmp_path / "loss.png").exists()


def test_a_run_shorter_than_its_warmup_is_warned_about_with_the_lr_it_reaches():
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=100)
    short = describe_schedule(cfg, total_steps=5)
    assert len(short) == 2 and "warmup over 100 steps to 0.001" in short[0]
    # lr_at's last step of 5: 1e-3 * 5 / 100, computed by hand.
    assert lr_at(4, 5, cfg) == pytest.approx(5e-5) and "stops at 5e-05, 5% of" in short[1]
    assert len(describe_schedule(cfg, total_steps=101)) == 1  # warmup fits: no warning


@pytest.mark.parametrize("decades", [0.5, 3])
def test_loss_curve_labels_minor_ticks_only_within_one_decade(decades):
    """Over several decades, labelled minor ticks (10.00 9.00 ... 0.01) overlap; within one they are
    the only readable values. Checked on the labels matplotlib draws."""
    pytest.importorskip("matplotlib")
    from lit_llama.run_dir import loss_figure

    rows = [{"step": s, "train_loss": 10.0 * 10 ** (-decades * s / 50)} for s in range(1, 51)]
    fig = loss_figure(rows, title="t")
    fig.canvas.draw()
    ax = fig.axes[0]
    minor = [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_text()]
    major = [t.get_text() for t in ax.yaxis.get_majorticklabels() if t.get_text()]
    assert major  # values can always be read off
    assert (len(minor) > 0) == (decades < 1), minor
