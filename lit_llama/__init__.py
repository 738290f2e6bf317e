"""lit_llama: a small, hackable LLaMA implementation: pretrain, LoRA-finetune, generate."""

from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.tokenizer import Tokenizer

__all__ = ["LLaMA", "LLaMAConfig", "Tokenizer"]
