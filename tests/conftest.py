"""Fixtures shared by several test modules."""

import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine thread hand-offs cost seconds.
    Modules that want it for every test: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _need(*names):
    for name in names:
        if not (DATA / name).is_file():
            pytest.skip(f"{DATA / name} not found")


@pytest.fixture(scope="session")
def llama3_chat_dir(tmp_path_factory):
    """Llama 3's tokenizer.json and tokenizer_config.json (with its chat template) in a folder of their own."""
    _need("llama3-tokenizer.json", "llama3-tokenizer_config.json")
    folder = tmp_path_factory.mktemp("llama3_chat")
    shutil.copyfile(DATA / "llama3-tokenizer.json", folder / "tokenizer.json")
    shutil.copyfile(DATA / "llama3-tokenizer_config.json", folder / "tokenizer_config.json")
    return folder


@pytest.fixture(scope="session")
def smollm2_chat_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer (ChatML template), written by transformers from the GGUF file."""
    _need("SmolLM2-135M-Instruct.Q4_1.gguf")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("smollm2_chat")
    auto = transformers.AutoTokenizer.from_pretrained(str(DATA), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    auto.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """The real SmolLM2-135M-Instruct, converted once from its Q4_1 GGUF file to a float32 checkpoint folder."""
    _need("SmolLM2-135M-Instruct.Q4_1.gguf")
    pytest.importorskip("gguf")
    from lit_llama.convert_gguf import convert_gguf  # needs the optional gguf package

    out = tmp_path_factory.mktemp("smollm2") / "lit"
    convert_gguf(DATA / "SmolLM2-135M-Instruct.Q4_1.gguf", out, torch.float32, progress=False)
    return out
