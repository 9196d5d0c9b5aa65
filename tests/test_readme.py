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


def readme_command_lines():
    """Every command line of README's bash blocks, continuation lines joined, comments dropped."""
    import shlex
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)\n```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(shlex.split(line))
    return lines


def test_every_readme_spach_command_parses():
    """README's `spach ...` (and `torchrun ... -m spach ...`) lines use real sub-commands and flags; the
    behaviour behind each is exercised by the suite (training, eval, launchers, export, predict, plot,
    benchmark tests), and the two fresh-machine commands by CI."""
    from spach.cli import build_parser
    parser = build_parser()
    checked = 0
    for argv in readme_command_lines():
        if argv[0] == "spach":
            args = argv[1:]
        elif argv[0] == "torchrun":
            args = argv[argv.index("spach") + 1:]
            assert argv[argv.index("spach") - 1] == "-m"
        elif argv[0] == "bash":
            assert (ROOT / argv[1]).is_file(), argv
            continue
        else:
            continue
        parsed, unknown = parser.parse_known_args(args)
        assert not unknown, (argv, unknown)
        checked += 1
    assert checked >= 12
