"""The README's commands are the ones CI runs, so a missing install step fails in CI, not for a user."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def ci_commands() -> list[str]:
    text = (ROOT / ".ci" / "run").read_text()
    section = text.split("# --- the README's install and test commands, as written ---", 1)[1]
    return [line.strip() for line in section.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    readme = readme_commands()
    ci = ci_commands()
    assert ci, ".ci/run lost its README section"
    for command in ci:
        normalised = command.replace("python -m pip", "pip")
        assert command in readme or normalised in readme, f".ci/run runs {command!r}, which the README does not show"


def test_every_script_the_readme_names_exists():
    text = (ROOT / "README.md").read_text()
    for howto in ROOT.glob("howto/*.md"):
        text += howto.read_text()
    for script in set(re.findall(r"python ((?:scripts|generate|finetune|pretrain)/\w+\.py)", text)):
        assert (ROOT / script).is_file(), f"the docs name {script}, which does not exist"
