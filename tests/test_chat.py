"""generate/chat.py driven through a pipe, on a tiny model with SmolLM2's tokenizer (ChatML template)
whose weights make it a bigram model with a known reply: after the generation prompt's last token
("\\n") it says "Hello", then " there", then <|im_end|>, the template's end token. So the replies are
known in advance, and stopping at the end token is what ends each one (--max_new_tokens is far larger)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sentencepiece import SentencePieceProcessor

from lit_llama.checkpoint import save_checkpoint
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.tokenizer import HF_TOKENIZER_FILES, Tokenizer

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "generate" / "chat.py"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPLY = "Hello there"


@pytest.fixture(scope="module")
def chat_checkpoint(smollm2_chat_dir, tmp_path_factory):
    """A 1-layer LLaMA with the blocks zeroed, so the last hidden state is the current token's embedding:
    the embedding rows put "\\n", "Hello" and " there" on their own axes (every other token on a fourth),
    and the head maps those axes to "Hello", " there" and <|im_end|>, and the fourth to <|im_end|>."""
    tokenizer = Tokenizer.from_checkpoint(smollm2_chat_dir)
    newline, hello, there = (tokenizer.encode(t, bos=False).tolist() for t in ("\n", "Hello", " there"))
    assert len(newline) == len(hello) == len(there) == 1, "the reply's tokens must be single tokens"
    newline, hello, there = newline[0], hello[0], there[0]
    end = tokenizer.added_tokens["<|im_end|>"]
    config = LLaMAConfig(block_size=160, vocab_size=tokenizer.vocab_size, padded_vocab_size=tokenizer.vocab_size,
                         n_layer=1, n_head=2, n_embd=8, intermediate_size=16)
    model = LLaMA(config)
    with torch.no_grad():
        for p in model.transformer.h.parameters():
            p.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        wte, head = model.transformer.wte.weight, model.lm_head.weight
        wte.zero_()
        wte[:, 3] = 1.0
        for axis, token in enumerate((newline, hello, there)):
            wte[token] = 0.0
            wte[token, axis] = 1.0
        head.zero_()
        head[hello, 0] = head[there, 1] = head[end, 2] = head[end, 3] = 10.0
    folder = tmp_path_factory.mktemp("chat_ckpt")
    save_checkpoint(model, folder)
    for name in HF_TOKENIZER_FILES:
        if (smollm2_chat_dir / name).is_file():
            shutil.copyfile(smollm2_chat_dir / name, folder / name)
    return folder


def chat(checkpoint: Path, stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHAT), "--checkpoint_dir", str(checkpoint), "--temperature", "0", "--max_new_tokens", "50",
         "--accelerator", "cpu", *args],
        input=stdin, capture_output=True, text=True, timeout=120,
    )


def test_two_piped_turns_get_two_replies_that_stop_at_the_end_token(chat_checkpoint):
    result = chat(chat_checkpoint, "Hi!\nWhat is 2 + 2?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{REPLY}\n{REPLY}\n"  # nothing else on stdout: no prompt decoration, no <|im_end|>
    assert "prompt style: chat_template (the checkpoint's own, ends turns with <|im_end|>)" in result.stderr


def test_reset_exit_blank_lines_and_dropping_old_turns(chat_checkpoint):
    # /exit ends the chat: the last line is never answered
    result = chat(chat_checkpoint, "one\n\n/reset\ntwo\n/exit\nthree\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{REPLY}\n{REPLY}\n"
    assert "(conversation reset)" in result.stderr
    # SmolLM2's default system prompt is ~20 tokens and a turn ~10 more: 160 - 50 holds about 5 turns
    many = "".join(f"message {i}\n" for i in range(12))
    result = chat(chat_checkpoint, many)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{REPLY}\n" * 12
    assert "(dropped the oldest 1 turn to fit the context)" in result.stderr
    # a message that cannot fit is refused on stderr and the chat goes on
    result = chat(chat_checkpoint, "word " * 200 + "\nshort\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{REPLY}\n"
    assert "error: the message is" in result.stderr


def test_a_checkpoint_without_a_template_needs_a_prompt_style(chat_checkpoint, tmp_path):
    folder = tmp_path / "no_template"
    shutil.copytree(chat_checkpoint, folder)
    (folder / "chat_template.jinja").unlink()
    result = chat(folder, "Hi\n")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "error: this checkpoint's tokenizer has no chat template"), result.stderr
    # the named ChatML style writes what SmolLM2's template writes when a system message is given
    result = chat(folder, "Hi\n", "--prompt_style", "chatml", "--system", "Be brief.")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{REPLY}\n"


def load_chat_script():
    spec = importlib.util.spec_from_file_location("chat_script", CHAT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["smollm2", "llama_sentencepiece"])
def test_streaming_prints_whole_characters_only(backend, request, capsys):
    """Multi-byte characters split over byte tokens (byte-level BPE, SentencePiece byte fallback) are
    printed once complete: stdout is exactly the reference tokenizer's decoding of the whole reply."""
    text = "café 🦙 中文 Ελληνικά 👩‍👩‍👧!"
    if backend == "smollm2":
        folder = request.getfixturevalue("smollm2_chat_dir")
        transformers = pytest.importorskip("transformers")
        reference = transformers.AutoTokenizer.from_pretrained(folder)
        tokenizer = Tokenizer.from_checkpoint(folder)
        ids = reference.encode(text, add_special_tokens=False)
        expected = reference.decode(ids)
    else:
        path = DATA / "llama-tokenizer.model"
        if not path.is_file():
            pytest.skip(f"{path} not found")
        sp = SentencePieceProcessor(model_file=str(path))
        tokenizer = Tokenizer(path)
        ids = sp.encode(text)
        expected = sp.decode(ids)
    # some characters do take several tokens: a prefix of the reply ends in the middle of one
    assert any(tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    printed, n = load_chat_script().print_streamed(tokenizer, iter(ids))
    assert (printed, n) == (expected, len(ids))
    assert capsys.readouterr().out == expected + "\n"
