"""lit_llama/runtime.py: the CPU threads a script chooses, measured against processes this test runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_llama.runtime import busy_cpus, default_threads, set_threads

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/proc/loadavg").is_file(), reason="reads Linux's /proc/loadavg")
def test_busy_cpus_counts_processes_that_keep_cores_busy_and_the_default_leaves_them_alone():
    cpus = len(os.sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        time.sleep(0.5)  # the interpreters are up and spinning
        assert busy_cpus() >= cpus
        assert default_threads() == 1  # every core is taken: one thread, not a stalled team
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def test_set_threads_takes_an_explicit_count_and_refuses_zero():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="--threads must be a positive integer, got 0"):
            set_threads(0)
        assert 1 <= set_threads(None) <= len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


def test_threads_flag_is_on_every_script_with_one_error_line_for_zero():
    for script in ("generate/base.py", "generate/lora.py", "generate/chat.py", "finetune/lora.py", "finetune/full.py",
                   "pretrain/base.py", "scripts/evaluate.py", "scripts/quickstart.py"):
        help_text = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True).stdout
        assert "--threads THREADS" in help_text and "CPU threads for torch" in help_text, script
    bad = subprocess.run([sys.executable, "generate/base.py", "--threads", "0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        "error: --threads must be a positive integer, got 0"]
