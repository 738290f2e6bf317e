"""Download a model repository from the Hugging Face Hub.

    python scripts/download.py --repo_id TinyLlama/TinyLlama-1.1B-Chat-v1.0
    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/TinyLlama/TinyLlama-1.1B-Chat-v1.0 \
        --output_dir checkpoints/lit/TinyLlama-1.1B-Chat-v1.0

Needs the optional dependency huggingface_hub (`pip install -e '.[all]'`). Only what the converter
reads is fetched: config.json, the tokenizer and one copy of the weights (safetensors when the
repository has them, else pytorch_model*.bin).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from lit_llama.cli import run

CONFIG_PATTERNS = ["*.json", "tokenizer.model", "chat_template.jinja"]  # the chat template, where it is not in tokenizer_config.json


def main(
    repo_id: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    checkpoint_dir: Path = Path("checkpoints"),
    token: str | None = None,
) -> Path:
    """Download a Hugging Face model repository into checkpoint_dir/repo_id.

    Args:
        repo_id: The repository on the Hub, as ORG/NAME (e.g. meta-llama/Llama-2-7b-hf, openlm-research/open_llama_3b).
        checkpoint_dir: The folder that receives ORG/NAME/.
        token: A Hugging Face access token, needed for gated repositories such as meta-llama (default: $HF_TOKEN or the saved login).
    """
    if repo_id.count("/") != 1:
        raise ValueError(f"--repo_id must look like ORG/NAME, got {repo_id!r}")
    try:
        import huggingface_hub
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise ValueError(
            "huggingface_hub is not installed; run pip install -e '.[all]' (or pip install huggingface_hub)"
        ) from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"could not download {repo_id}: HF_HUB_OFFLINE is set (no network use); unset it, "
                         "or copy the model folder from a machine with a network connection")
    endpoint = huggingface_hub.constants.ENDPOINT
    if not reachable(endpoint):  # before the Hub client, which retries for half a minute, printing each try
        raise ValueError(f"could not download {repo_id}: {endpoint} cannot be reached; check the network connection "
                         "(or a proxy setting), or copy the model folder from a machine that has one")
    token = token or os.environ.get("HF_TOKEN")
    local_dir = checkpoint_dir / repo_id
    # Any failure of the Hub client here means the same thing to the user: nothing (complete) was
    # downloaded. Its exception types differ between huggingface_hub versions (requests, httpx), so
    # they are caught as one and reported in a line.
    try:
        files = HfApi().list_repo_files(repo_id, token=token)
        has_safetensors = any(f.endswith(".safetensors") for f in files)
        weights = ["*.safetensors"] if has_safetensors else ["pytorch_model*.bin"]
        path = snapshot_download(repo_id, local_dir=local_dir, allow_patterns=CONFIG_PATTERNS + weights, token=token)
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"could not download {repo_id} ({type(e).__name__}: {detail[:200]}); check the network connection, "
            "the repository name, and --token for gated models"
        ) from None
    print(
        f"Downloaded {repo_id} to {path}; convert it with:\n"
        f"  python scripts/convert_hf_checkpoint.py --checkpoint_dir {local_dir} --output_dir checkpoints/lit/{repo_id.split('/')[1]}",
        file=sys.stderr,
    )
    return Path(path)


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Can a TCP connection to `url`'s host be opened within `timeout` seconds?"""
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    run(main)
