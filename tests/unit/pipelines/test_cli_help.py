"""`cnnexp --help` and every subcommand's --help are complete: each flag, its default, its allowed values."""
import dataclasses
import importlib
import re
import subprocess
import sys
import typing

import pytest

from pipelines import cli
from pipelines.flags import flag


def _config_class(command: str) -> type:
    # Every entry point is main(config: SomeConfig); the hint says which dataclass its flags come from.
    module = importlib.import_module(cli.COMMANDS[command].module)
    config_class = typing.get_type_hints(module.main)["config"]
    assert cli.COMMANDS[command].config is config_class  # the flags checked first are main's own
    return config_class


def _help_text(command: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: a default or a choice stays on one line
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _option_entries(text: str) -> list[str]:
    """Each option's flags and help as one line (argparse puts long flags' help on the next line)."""
    options = text.split("options:", 1)[1]
    return [" ".join(e.split()) for e in re.split(r"\n(?=  -)", options) if e.strip()]


def test_cnnexp_help_lists_every_command_with_a_summary(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command, summary in ((name, c.summary) for name, c in cli.COMMANDS.items()):
        assert re.search(rf"^\s+{command}\s+{re.escape(summary)}$", out, re.M), command


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_subcommand_help_shows_every_flag_with_help_default_and_choices(command, capsys, monkeypatch):
    text = _help_text(command, capsys, monkeypatch)
    assert f"usage: cnnexp {command}" in text and "--verbose" in text
    for f in dataclasses.fields(_config_class(command)):
        line = next((e for e in _option_entries(text) if e.startswith(flag(f.name) + " ")), None)
        assert line is not None, f"{command}: no line for {flag(f.name)}"
        assert f.metadata.get("help") and f.metadata["help"] in line, f"{command} {f.name}: no help text"
        assert f"[default: {f.default!r}]" in line, f"{command} {f.name}: no default"
        if "choices" in f.metadata:
            assert f"(one of: {', '.join(f.metadata['choices'])})" in line, f"{command} {f.name}"
        if f.type == "bool":
            assert "(true or false)" in line, f"{command} {f.name}"


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("1", True), ("no", False)])
def test_bool_flags_read_what_mlflow_run_passes(text, value):
    from pipelines.flags import parse_bool

    assert parse_bool(text) is value


def test_a_bad_bool_is_one_line_naming_the_flag(capsys, workdir):
    assert cli.main(["train", "--system-metrics", "maybe"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--system-metrics" in err and "expected true or false" in err and "\n" not in err


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_an_abbreviated_or_unknown_flag_is_refused_naming_it(command, capsys, monkeypatch, workdir):
    flags = [e.split()[0] for e in _option_entries(_help_text(command, capsys, monkeypatch))]
    abbreviated = next(f for f in flags if f.startswith("--") and f != "--help")[:-1]
    for typo in (abbreviated, "--no-such-flag"):
        assert cli.main([command, typo, "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"unknown parameter {typo} " in err and "\n" not in err, err


HEAVY = ("torch", "mlflow", "optuna")
FILE = __file__  # a path that exists and is a file


@pytest.mark.parametrize("args", [["train", "--lr", "-1"], ["tune", "--n-trials", "0"], ["train", "--epoch", "1"],
                                  ["train", "--help"], ["evaluate", "--model-uri", " "], ["prepare", "--data-dir", FILE],
                                  ["train", "--checkpoint-dir", f"{FILE}/checkpoints"]])
def test_a_refusal_or_help_is_answered_before_torch_mlflow_or_optuna_load(args):
    # In a fresh interpreter: this process has them loaded already. Seconds of imports on a small machine.
    # A path that is a file (this test's own) is refused as a flag is, before any of them loads.
    code = ("import sys; from pipelines import cli\n"
            f"try:\n    code = cli.main({args!r})\nexcept SystemExit as done:\n    code = done.code\n"
            f"print(code, *sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split()[-1] == ("0" if "--help" in args else "2"), done.stdout + done.stderr
