"""Prepare any instruction data set in JSON or JSONL for finetuning.

    python scripts/prepare_json.py --data_file my_data.jsonl \
        --checkpoint_dir checkpoints/lit/7B --destination_path data/my_data

Records need "instruction" and "output" strings; "input" is optional. See howto/prepare_data.md.
"""

from __future__ import annotations

from pathlib import Path

from lit_llama.cli import run
from lit_llama.data import load_records, prepare_instruction_data
from lit_llama.prompts import PromptStyleName


def main(
    data_file: Path | None = None,
    checkpoint_dir: Path = Path("checkpoints/lit/SmolLM2-135M-Instruct"),
    destination_path: Path = Path("data/json"),
    test_size: int | float = 0.05,
    max_seq_length: int = 256,
    mask_inputs: bool = True,
    seed: int = 42,
    prompt_style: PromptStyleName = "alpaca",
    tokenizer_path: Path | None = None,
    special_tokens: list[str] | None = None,
) -> dict:
    """Tokenize instruction/input/output records from a JSON list or a JSONL file into train/test files.

    Args:
        data_file: The .json (a list of records) or .jsonl (one record per line) file; required.
        checkpoint_dir: The checkpoint whose tokenizer (tokenizer.model, else tokenizer.json) is used.
        destination_path: Where train.safetensors, test.safetensors and prepare_meta.json are written.
        test_size: How many records go to the test split (a count, or a fraction such as 0.05).
        max_seq_length: Samples longer than this many tokens are cut (and counted as truncated).
        mask_inputs: Set the labels of the prompt tokens to -100 so only the response is learned.
        seed: Seed of the shuffle before the train/test split.
        prompt_style: The prompt template (lit_llama/prompts.py): alpaca, plain, chatml, llama3, or chat_template (the checkpoint's own chat template: the instruction and input are the user turn, the output the assistant's, trained up to and including the turn's end token).
        tokenizer_path: A SentencePiece .model or a Hugging Face tokenizer.json; default: the one in checkpoint_dir.
        special_tokens: New tokens the records use, e.g. '["<|user|>", "<|assistant|>"]': each gets one new
            id; finetune/lora.py then grows and trains the embedding and head (howto/lora_targets.md).
    """
    if data_file is None:
        raise ValueError("pass --data_file: a .json list of records or a .jsonl file with one record per line")
    records = load_records(data_file)
    return prepare_instruction_data(
        records, destination_path, checkpoint_dir, tokenizer_path, source=data_file.name, test_size=test_size,
        max_seq_length=max_seq_length, mask_inputs=mask_inputs, seed=seed, prompt_style=prompt_style,
        special_tokens=special_tokens or (),
    )


if __name__ == "__main__":
    run(main)
