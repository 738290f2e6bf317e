"""Generate the synthetic world of the end-to-end demo: a pretraining corpus and instruction sets.

    python scripts/prepare_demo.py --destination_path data/demo

Everything is produced by the code below from a seed (no downloaded or copied text), so the demo
runs offline and two runs with the same seed write byte-identical files:

    corpus.txt   prose for pretraining, one document per paragraph (documents separated by a blank line)
    train.json   Alpaca-format records {instruction, input, output, task} for instruction finetuning
    test.json    held-out records: no instruction of test.json occurs in train.json

The split of work between the two stages is the point of the demo. The corpus teaches the knowledge:
where each person of the world lives, their favorite color, pet and job; sums of small numbers; a
table of opposites. It always shows an answer in quotes inside a sentence (`Answer: "Oakvale".`),
never bare at the start of a line. The instruction set teaches only the format: after the question
and a newline (the quickstart's "plain" prompt; Alpaca's "### Response:" works the same way) give
the bare short answer and stop. So a pretrained base model knows the answers but answers in a
sentence and goes on talking (exact match 0%), and a LoRA adapter learns the format in seconds.

Task types (the "task" field), all answered from what the corpus taught:
    facts     "Where does Mira live?" about the world's people
    sum       "What is 7 plus 5?" with operands in 0..max_operand
    opposite  "What is the opposite of hot?" from a fixed table
Half of each task's questions are held out for test.json; training asks only the other half.

Why quotes: SentencePiece marks a word that follows a space with "▁", so "in Oakvale" ends in the
piece "▁Oakvale", while an answer at the start of a line (or after "### Response:", which Alpaca's
template ends without a space) is "Oakvale". A quote is followed by the unmarked pieces too, so the
corpus teaches the answers in exactly the pieces the model has to produce. (Measured: a 1M-parameter
model did not learn to copy answers from an instruction's input within the demo's pretraining
budget, so every task here asks for knowledge the corpus states, which it learns quickly.)
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

from lit_llama.checkpoint import atomic_write_text
from lit_llama.cli import run

TASKS = ("facts", "sum", "opposite")
HELD_OUT = 0.5  # share of each task's questions that only test.json asks

# The world's vocabulary. Names and towns are made up; the rest are plain English words.
NAMES = (
    "Mira", "Tomas", "Lena", "Arlo", "Nina", "Oskar", "Ivy", "Bram", "Cora", "Dax", "Elsa", "Finn", "Gita",
    "Hugo", "Iris", "Jonah", "Kira", "Leo", "Maya", "Nico", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tara",
    "Vera", "Wren", "Yuri", "Zoe", "Abel", "Bea", "Cyril", "Dina", "Emil", "Fay", "Gus", "Hana", "Ines", "Jago",
    "Kofi", "Lars", "Mona", "Otto", "Pia", "Rafe", "Suki", "Theo", "Alma", "Boris", "Clem", "Della", "Egon", "Flora",
    "Gil", "Hedy", "Ike", "Juno", "Kai", "Lulu",
)
TOWNS = (
    "Oakvale", "Brookfield", "Stonebridge", "Millford", "Ashport", "Redhill", "Pinecrest", "Lakeside",
    "Fernwood", "Clearwater", "Silverton", "Elmstead", "Foxley", "Marshby", "Westmoor", "Highgate",
)
COLORS = ("red", "blue", "green", "teal", "gold", "pink", "gray", "white", "black", "purple", "orange", "brown")
PETS = ("cat", "dog", "fox", "goat", "horse", "rabbit", "parrot", "turtle", "hamster", "frog", "duck", "pony")
JOBS = ("baker", "farmer", "doctor", "teacher", "painter", "sailor", "pilot", "singer", "tailor", "builder",
        "writer", "nurse")
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("wet", "dry"), ("old", "young"),
    ("happy", "sad"), ("light", "dark"), ("full", "empty"), ("hard", "soft"), ("loud", "quiet"), ("early", "late"),
    ("open", "closed"), ("long", "short"), ("rich", "poor"), ("strong", "weak"), ("day", "night"), ("left", "right"),
    ("high", "low"), ("clean", "dirty"), ("thick", "thin"), ("near", "far"), ("first", "last"), ("inside", "outside"),
    ("awake", "asleep"), ("sweet", "sour"), ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("give", "take"),
    ("true", "false"), ("safe", "risky"), ("smooth", "rough"), ("wide", "narrow"), ("brave", "afraid"),
    ("begin", "end"), ("north", "south"), ("east", "west"), ("summer", "winter"), ("friend", "enemy"),
)

# relation -> (possible values, fact sentence, question); {n} is a name, {v} a value
RELATIONS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "town": (TOWNS, '{n} lives in "{v}".', "Where does {n} live?"),
    "color": (COLORS, """{n}'s favorite color is "{v}".""", "What is {n}'s favorite color?"),
    "pet": (PETS, '{n} has a pet "{v}".', "What pet does {n} have?"),
    "job": (JOBS, '{n} works as a "{v}".', "What is {n}'s job?"),
}
# Prose around the facts, so the corpus reads as small stories rather than a list.
FILLERS = (
    "{n} walks to the market every morning.", "{n} likes to read by the window.", "{n} sings while cooking.",
    "{n} has two brothers.", "{n} visits the river on Sundays.", "{n} keeps a small garden.",
    "{n} writes letters to old friends.", "{n} bakes bread for the neighbors.", "{n} rides a bike to work.",
)

World = dict[tuple[str, str], str]  # (person, relation) -> value


def make_world(rng: random.Random) -> World:
    """Every person's town, favorite color, pet and job, drawn once per seed."""
    return {(person, rel): rng.choice(values) for person in NAMES for rel, (values, _, _) in RELATIONS.items()}


def opposite_table() -> dict[str, str]:
    """Each word of the table -> its opposite, in both directions."""
    table = {}
    for a, b in OPPOSITES:
        table[a], table[b] = b, a
    return table


# What may stand between a question and its answer in the corpus. The instruction format puts
# "\n\n### Response:" there; varying gaps and lead-ins teach the model to find the question by its
# content, not at a fixed distance, and to answer after a colon as well as after "is".
GAPS = ("", "", " Think about it.", " Let me see.", "\n", " Take your time.\n", " Here is a hint. Think it through.")
LEAD_INS = ("The answer is ", "The answer is ", "Answer: ", "It is ", "")


def quoted(question: str, answer: str, rng: random.Random) -> str:
    return f'{question}{rng.choice(GAPS)} {rng.choice(LEAD_INS)}"{answer}".'


def fact_question(person: str, rel: str) -> str:
    return RELATIONS[rel][2].format(n=person)


def fact_sentence(person: str, rel: str, world: World) -> str:
    return RELATIONS[rel][1].format(n=person, v=world[(person, rel)])


# ------------------------------------------------------------------------------------ instructions
def record(instruction: str, output: str, task: str) -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": output, "task": task}


def task_questions(world: World, max_operand: int) -> dict[str, list[dict[str, str]]]:
    """Every question each task can ask, as records (in a fixed order)."""
    table = opposite_table()
    return {
        "facts": [record(fact_question(p, rel), world[(p, rel)], "facts") for p, rel in world],
        "sum": [record(f"What is {a} plus {b}?", str(a + b), "sum")
                for a in range(max_operand + 1) for b in range(max_operand + 1)],
        "opposite": [record(f"What is the opposite of {w}?", table[w], "opposite") for w in sorted(table)],
    }


def instruction_sets(
    rng: random.Random, world: World, n_train: int, n_test: int, max_operand: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test): each task's questions are shuffled and split in two halves; test takes up to
    n_test from the held-out halves (in proportion to their sizes), train draws n_train from the
    other halves, cycling through the tasks (questions repeat when n_train is larger)."""
    held_out, asked = {}, {}
    for task, questions in task_questions(world, max_operand).items():
        rng.shuffle(questions)
        cut = round(len(questions) * HELD_OUT)
        held_out[task], asked[task] = questions[:cut], questions[cut:]
    available = sum(len(q) for q in held_out.values())
    shares = {task: len(held_out[task]) if n_test >= available else round(n_test * len(held_out[task]) / available)
              for task in TASKS}
    if n_test < available:  # rounding may miss n_test by one or two; facts has the largest pool
        shares["facts"] += n_test - sum(shares.values())
    test = [r for task in TASKS for r in held_out[task][: shares[task]]]
    train = []
    while len(train) < n_train:
        train.append(rng.choice(asked[TASKS[len(train) % len(TASKS)]]))

    overlap = {r["instruction"] for r in train} & {r["instruction"] for r in test}
    assert not overlap, f"held-out test instructions leaked into training: {sorted(overlap)[:3]}"
    rng.shuffle(test)
    return train, test


# ------------------------------------------------------------------------------------ the corpus
def facts_document(rng: random.Random, world: World) -> str:
    """A short story about one or two people: some of their facts, a little filler, and questions
    about them answered in quotes."""
    people = rng.sample(NAMES, rng.choice((1, 1, 2)))
    told = [(p, rel) for p in people for rel in rng.sample(tuple(RELATIONS), rng.randint(2, 4))]
    sentences = [fact_sentence(p, rel, world) for p, rel in told]
    sentences += [rng.choice(FILLERS).format(n=p) for p in people if rng.random() < 0.3]
    rng.shuffle(sentences)
    asked = [(p, rel) for p in people for rel in rng.sample(tuple(RELATIONS), rng.randint(1, 2))]
    return " ".join(sentences + [quoted(fact_question(p, rel), world[(p, rel)], rng) for p, rel in asked])


def sum_document(rng: random.Random, max_operand: int) -> str:
    """Sums stated as sentences and asked as questions, every pair equally likely."""
    parts = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if rng.random() < 0.5:
            parts.append(f"{a} plus {b} is {a + b}.")
        else:
            parts.append(quoted(f"What is {a} plus {b}?", str(a + b), rng))
    return " ".join(parts)


def opposite_document(rng: random.Random, table: dict[str, str]) -> str:
    parts = []
    for word in rng.sample(sorted(table), rng.randint(3, 6)):
        r = rng.random()
        if r < 0.4:
            parts.append(f'The opposite of {word} is "{table[word]}".')
        elif r < 0.6:
            parts.append(f"{word.capitalize()} and {table[word]} are opposites.")
        else:
            parts.append(quoted(f"What is the opposite of {word}?", table[word], rng))
    return " ".join(parts)


def corpus_documents(rng: random.Random, world: World, n_docs: int, max_operand: int) -> list[str]:
    table = opposite_table()
    docs = []
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.45:
            docs.append(facts_document(rng, world))
        elif r < 0.7:
            docs.append(sum_document(rng, max_operand))
        else:
            docs.append(opposite_document(rng, table))
    return docs


# ------------------------------------------------------------------------------------ the script
def main(
    destination_path: Path = Path("data/demo"),
    seed: int = 42,
    n_train: int = 3000,
    n_test: int = 300,
    n_docs: int = 30000,
    max_operand: int = 9,
) -> dict[str, int]:
    """Write the demo's synthetic corpus.txt, train.json and test.json (same seed, same bytes).

    Args:
        destination_path: Folder that receives corpus.txt, train.json and test.json.
        seed: Seed of everything random; the same seed writes byte-identical files.
        n_train: Number of instruction records for finetuning.
        n_test: Most held-out records to write (fewer when the world holds fewer; half of each task is held out).
        n_docs: Number of documents (paragraphs) in the pretraining corpus.
        max_operand: Largest number added in the sum task (operands are 0..max_operand).
    """
    if n_train < len(TASKS) or n_test < len(TASKS):
        raise ValueError(f"--n_train and --n_test must be at least {len(TASKS)} (one record per task type)")
    if n_docs < 1:
        raise ValueError(f"--n_docs must be at least 1, got {n_docs}")
    if not 1 <= max_operand <= 99:
        raise ValueError(f"--max_operand must be between 1 and 99, got {max_operand}")
    if destination_path.exists() and not destination_path.is_dir():
        raise ValueError(f"--destination_path {str(destination_path)!r} is a file; pass a directory")

    t0 = time.perf_counter()
    # One generator per output, so changing --n_docs does not change the instruction sets.
    world = make_world(random.Random(f"{seed}-world"))
    train, test = instruction_sets(random.Random(f"{seed}-instructions"), world, n_train, n_test, max_operand)
    docs = corpus_documents(random.Random(f"{seed}-corpus"), world, n_docs, max_operand)
    corpus = "\n\n".join(docs) + "\n"

    destination_path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(destination_path / "corpus.txt", corpus)
    for name, records in (("train.json", train), ("test.json", test)):
        atomic_write_text(destination_path / name, json.dumps(records, indent=1) + "\n")

    words = Counter(corpus.replace(".", " ").replace('"', " ").replace("?", " ").split())
    elapsed = time.perf_counter() - t0
    print(f"corpus.txt: {len(docs):,} documents, {len(corpus):,} characters, {len(words)} distinct words")
    for name, records in (("train.json", train), ("test.json", test)):
        counts = Counter(r["task"] for r in records)
        distinct = len({r["instruction"] for r in records})
        print(f"{name}: {len(records)} records, {distinct} distinct ({', '.join(f'{t} {counts[t]}' for t in TASKS)})")
    print(f"wrote {destination_path}/{{corpus.txt,train.json,test.json}} in {elapsed:.2f} s")
    return {"documents": len(docs), "characters": len(corpus), "train": len(train), "test": len(test)}


if __name__ == "__main__":
    run(main)
