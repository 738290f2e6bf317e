"""Convert a llama2.c checkpoint (train.py's .pt, or the legacy .bin that run.c reads) to ours.

    python scripts/convert_llama2c_checkpoint.py --checkpoint_path stories260K.bin \\
        --tokenizer_path tok512.model --output_dir checkpoints/lit/stories260K

Writes lit_model.safetensors, lit_config.json and (with --tokenizer_path) tokenizer.model. llama2.c
models are small (15M-110M parameters), so the state dict is built in memory in one go.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from lit_llama.checkpoint import TOKENIZER_NAME, atomic_copy, save_config, save_weights
from lit_llama.cli import run
from lit_llama.convert_llama2c import load_llama2c


def main(
    checkpoint_path: Path = Path("stories260K.bin"),
    output_dir: Path = Path("checkpoints/lit/stories260K"),
    tokenizer_path: Path | None = None,
) -> Path:
    """Convert a llama2.c checkpoint into a lit_llama checkpoint folder.

    Args:
        checkpoint_path: A llama2.c train.py checkpoint (.pt) or a legacy run.c export (.bin).
        output_dir: Where to write lit_model.safetensors, lit_config.json and tokenizer.model.
        tokenizer_path: The SentencePiece model the checkpoint was trained with (tok512.model for stories260K, Meta's tokenizer.model for stories15M/42M/110M).
    """
    t0 = time.perf_counter()
    if tokenizer_path is not None and not tokenizer_path.is_file():
        raise FileNotFoundError(f"--tokenizer_path {str(tokenizer_path)!r} does not exist")
    config, state_dict = load_llama2c(checkpoint_path)
    if tokenizer_path is not None:
        n_pieces = SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
        if n_pieces != config.vocab_size:
            raise ValueError(
                f"{tokenizer_path} has {n_pieces} pieces but the model's vocabulary is {config.vocab_size}; "
                "pass the tokenizer this checkpoint was trained with"
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    weights_path = output_dir / "lit_model.safetensors"
    save_weights(state_dict, weights_path)
    save_config(config, output_dir)
    if tokenizer_path is not None:
        atomic_copy(tokenizer_path, output_dir / TOKENIZER_NAME)
    else:
        print(f"note: no --tokenizer_path given; generate/base.py will need --tokenizer_path or a {TOKENIZER_NAME} in {output_dir}", file=sys.stderr)
    n_params = sum(t.numel() for t in state_dict.values())
    print(
        f"Wrote {weights_path} ({n_params / 1e6:.3f} M parameters, {config.n_layer} layers, "
        f"{'tied' if config.tie_embeddings else 'separate'} head) in {time.perf_counter() - t0:.2f} s",
        file=sys.stderr,
    )
    return weights_path


if __name__ == "__main__":
    run(main)
