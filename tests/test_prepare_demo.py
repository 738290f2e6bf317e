"""scripts/prepare_demo.py: the synthetic world is deterministic, held out, and its answers are right.

The answers are recomputed here from each record's text alone (regular expressions and Python
arithmetic), not with the generator's tables.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--n_docs", "2000", "--n_train", "90", "--n_test", "60", "--max_operand", "9"]


def prepare(dest: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/prepare_demo.py", "--destination_path", str(dest), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("demo")
    result = prepare(dest, *SMALL)
    assert result.returncode == 0, result.stderr
    return dest


def load(demo: Path, name: str) -> list[dict]:
    return json.loads((demo / name).read_text())


def test_same_seed_gives_identical_bytes_and_another_seed_differs(demo, tmp_path):
    again = prepare(tmp_path / "again", *SMALL)
    other = prepare(tmp_path / "other", *SMALL, "--seed", "7")
    assert again.returncode == 0 and other.returncode == 0, again.stderr + other.stderr
    for name in ("corpus.txt", "train.json", "test.json"):
        assert (demo / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
        assert (demo / name).read_bytes() != (tmp_path / "other" / name).read_bytes(), name


def test_records_have_alpaca_fields_and_at_least_three_task_types(demo):
    for name, n in (("train.json", 90), ("test.json", 60)):
        records = load(demo, name)
        assert len(records) == n
        for r in records:
            assert set(r) == {"instruction", "input", "output", "task"}
            assert all(isinstance(v, str) for v in r.values()) and r["input"] == ""
            # short answers: one word or number, no surrounding space
            assert r["output"] and r["output"] == r["output"].strip() and " " not in r["output"]
        assert len({r["task"] for r in records}) >= 3, name


def test_held_out_records_are_disjoint_from_training(demo):
    train, test = load(demo, "train.json"), load(demo, "test.json")
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    assert not {(r["instruction"], r["input"]) for r in train} & {(r["instruction"], r["input"]) for r in test}
    assert len({r["instruction"] for r in test}) == len(test)  # no duplicates either


SUM = re.compile(r"What is (\d+) plus (\d+)\?")
QUESTIONS = {
    "town": re.compile(r"Where does (\w+) live\?"),
    "color": re.compile(r"What is (\w+)'s favorite color\?"),
    "pet": re.compile(r"What pet does (\w+) have\?"),
    "job": re.compile(r"What is (\w+)'s job\?"),
}
STATEMENTS = {
    "town": re.compile(r'(\w+) lives in "(\w+)"\.'),
    "color": re.compile(r'(\w+)\'s favorite color is "(\w+)"\.'),
    "pet": re.compile(r'(\w+) has a pet "(\w+)"\.'),
    "job": re.compile(r'(\w+) works as a "(\w+)"\.'),
}


def corpus_facts(corpus: str) -> dict[tuple[str, str], str]:
    """(person, relation) -> value as the corpus states it, checking it never states two values."""
    facts: dict[tuple[str, str], str] = {}
    for relation, statement in STATEMENTS.items():
        for person, value in statement.findall(corpus):
            assert facts.setdefault((person, relation), value) == value, f"{person}'s {relation} stated twice, differently"
    return facts


def test_sum_answers_recomputed_from_the_instruction(demo):
    records = [r for r in load(demo, "train.json") + load(demo, "test.json") if r["task"] == "sum"]
    assert len(records) >= 20
    for r in records:
        a, b = SUM.fullmatch(r["instruction"]).groups()
        assert int(a) <= 9 and int(b) <= 9
        assert r["output"] == str(int(a) + int(b)), r


def test_facts_answers_are_what_the_corpus_states(demo):
    facts = corpus_facts((demo / "corpus.txt").read_text())
    assert len({person for person, _ in facts}) >= 40 and len({rel for _, rel in facts}) == 4
    records = [r for r in load(demo, "train.json") + load(demo, "test.json") if r["task"] == "facts"]
    assert len(records) >= 20
    for r in records:
        relation, person = next((rel, m[1]) for rel, q in QUESTIONS.items() if (m := q.fullmatch(r["instruction"])))
        assert (person, relation) in facts, f"the corpus never says {r['instruction']}"
        assert r["output"] == facts[(person, relation)], r


def test_opposites_are_stated_in_the_corpus_and_symmetric(demo):
    corpus = (demo / "corpus.txt").read_text()
    stated = set(re.findall(r'The opposite of (\w+) is "(\w+)"\.', corpus))
    stated |= set(re.findall(r'What is the opposite of (\w+)\?[^"]* The answer is "(\w+)"\.', corpus))
    stated |= {(a.lower(), b) for a, b in re.findall(r"(\w+) and (\w+) are opposites\.", corpus)}
    symmetric = stated | {(b, a) for a, b in stated}
    records = [r for r in load(demo, "train.json") + load(demo, "test.json") if r["task"] == "opposite"]
    assert records
    for r in records:
        word = re.fullmatch(r"What is the opposite of (\w+)\?", r["instruction"])[1]
        assert (word, r["output"]) in symmetric, r
        assert all(b == r["output"] for a, b in symmetric if a == word), f"{word} has two opposites"


def test_corpus_is_prose_without_the_instruction_format(demo):
    corpus = (demo / "corpus.txt").read_text()
    docs = corpus.strip("\n").split("\n\n")
    assert len(docs) == 2000 and all(doc.strip() == doc for doc in docs)
    assert "###" not in corpus and "Response" not in corpus
    # answers sit inside sentences: a bare answer never ends a line
    answers = {r["output"] for r in load(demo, "train.json") + load(demo, "test.json")}
    assert not any(line.strip() in answers for line in corpus.splitlines())


def test_cli_help_and_bad_input(tmp_path):
    help_ = subprocess.run([sys.executable, "scripts/prepare_demo.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert help_.returncode == 0 and "--n_train" in help_.stdout and "--max_operand" in help_.stdout
    bad = prepare(tmp_path / "bad", "--n_test", "1")
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--n_test" in errors[0], bad.stderr
    assert not (tmp_path / "bad").exists()
