"""Prepare the Alpaca instruction data set for finetuning.

    python scripts/prepare_alpaca.py --data_file alpaca_data_cleaned.json \
        --checkpoint_dir checkpoints/lit/7B --destination_path data/alpaca

Writes data/alpaca/{train,test}.safetensors and prepare_meta.json; see howto/prepare_data.md.
"""

from __future__ import annotations

from pathlib import Path

from lit_llama.cli import run
from lit_llama.data import download, load_records, prepare_instruction_data
from lit_llama.prompts import PromptStyleName

DATA_URL = "https://raw.githubusercontent.com/gururise/AlpacaDataCleaned/main/alpaca_data_cleaned.json"


def main(
    data_file: Path | None = None,
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    destination_path: Path = Path("data/alpaca"),
    test_size: int | float = 0.05,
    max_seq_length: int = 256,
    mask_inputs: bool = True,
    seed: int = 42,
    prompt_style: PromptStyleName = "alpaca",
    tokenizer_path: Path | None = None,
) -> dict:
    """Tokenize Alpaca records (a JSON list of instruction/input/output objects) into train/test files.

    Args:
        data_file: The Alpaca JSON file; default: download alpaca_data_cleaned.json into destination_path.
        checkpoint_dir: The checkpoint whose tokenizer (tokenizer.model, else tokenizer.json) is used.
        destination_path: Where train.safetensors, test.safetensors and prepare_meta.json are written.
        test_size: How many records go to the test split (a count, or a fraction such as 0.05).
        max_seq_length: Samples longer than this many tokens are cut (and counted as truncated).
        mask_inputs: Set the labels of the prompt tokens to -100 so only the response is learned.
        seed: Seed of the shuffle before the train/test split.
        prompt_style: The prompt template (lit_llama/prompts.py): alpaca, plain, chatml, llama3, or chat_template (the checkpoint's own chat template: the instruction and input are the user turn, the output the assistant's, trained up to and including the turn's end token).
        tokenizer_path: A SentencePiece .model or a Hugging Face tokenizer.json; default: the one in checkpoint_dir.
    """
    if data_file is None:
        data_file = destination_path / DATA_URL.rsplit("/", 1)[1]
        if not data_file.is_file():
            download(DATA_URL, data_file)
    records = load_records(data_file)
    return prepare_instruction_data(
        records, destination_path, checkpoint_dir, tokenizer_path, source=data_file.name, test_size=test_size,
        max_seq_length=max_seq_length, mask_inputs=mask_inputs, seed=seed, prompt_style=prompt_style,
    )


if __name__ == "__main__":
    run(main)
