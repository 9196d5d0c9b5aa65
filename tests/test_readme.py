"""README's fresh-machine commands are the ones CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fresh_machine_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_gives_the_two_commands_first():
    commands = fresh_machine_commands()
    assert len(commands) == 2
    train, tests = commands
    assert train.rstrip().endswith("spach train")
    assert "pytest" in tests and 'pip install -e ".[test]"' in tests
    text = (ROOT / "README.md").read_text()
    assert text.index("## On a fresh machine") < text.index("## Models")


def test_ci_runs_readme_test_command():
    _, tests = fresh_machine_commands()
    # CI makes its own venv, then runs everything after README's "activate &&"
    test_part = tests.split("activate && ", 1)[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_part in ci
