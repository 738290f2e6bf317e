from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="lit_llama",
    version="0.1.0",
    description="A small, hackable LLaMA implementation: pretrain, LoRA-finetune and generate",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lit_llama", "lit_llama.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",  # a lower bound, never a pin: scaled_dot_product_attention(enable_gqa=...)
        "lightning>=2.2",
        "sentencepiece>=0.1.99",
        "tokenizers>=0.19",  # Hugging Face tokenizer.json (Llama 3, SmolLM2, ...), read by the format's own library
        "jsonargparse[signatures]>=4.27",
        "safetensors>=0.4",  # checkpoints that cannot execute code when loaded
        "gguf>=0.10",  # llama.cpp's GGUF files, read and dequantized by the format's own reader (scripts/convert_gguf_checkpoint.py)
        "tqdm>=4.60",  # progress bars (already a dependency of lightning)
        "jinja2>=3.1.6",  # checkpoints' chat templates, in its sandbox (already a dependency of torch; older ones had sandbox escapes)
    ],
    extras_require={
        # transformers and peft are the references the tests compare against; matplotlib draws loss.png;
        # bitsandbytes stores the quantized base that tests/test_qlora.py checks
        "test": ["pytest>=7", "transformers>=4.40", "peft>=0.10", "ruff>=0.4", "matplotlib>=3.6", "bitsandbytes>=0.45"],
        "qlora": ["bitsandbytes>=0.45"],  # finetune/lora.py --quantize nf4|nf4-dq|int8 (lit_llama/qlora.py); CPU support since 0.45
        "plot": ["matplotlib>=3.6"],  # loss.png beside every training run's metrics.csv
        # scripts/benchmark.py's references: transformers + PEFT, with bitsandbytes for the nf4 rows (llama-cpp-python,
        # the llama.cpp rows, is left to the user: it compiles llama.cpp at install, see howto/performance.md)
        "bench": ["transformers>=4.40", "peft>=0.10", "bitsandbytes>=0.45"],
        "all": ["huggingface_hub>=0.20", "matplotlib>=3.6", "transformers>=4.40", "peft>=0.10"],
    },
)
