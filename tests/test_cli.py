"""The console scripts pyproject.toml installs: each names a real entry point, and each explains every flag."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from preactresnet import cli, config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = dict(re.findall(r'^(preactresnet-[a-z]+) = "([\w.:]+)"$', (ROOT / "pyproject.toml").read_text(), re.M))


def test_every_command_is_a_console_script():
    assert set(SCRIPTS) == {f"preactresnet-{n}" for n in ("train", "test", "checkpoints", "predict", "export", "optimize")}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_answers_help(script, capsys):
    module, func = SCRIPTS[script].split(":")
    with pytest.raises(SystemExit) as exc:
        getattr(importlib.import_module(module), func)(["--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("parser", [config.build_parser, cli.export_parser, cli.test_parser, cli.checkpoints_parser,
                                    cli.predict_parser, cli.optimize_parser])
def test_every_flag_has_a_description(parser):
    missing = [a.option_strings or a.dest for a in parser()._actions if a.dest != "help" and not (a.help or "").strip()]
    assert not missing


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_every_bench_flag_has_a_description(script):
    import ast  # read, not run: a benchmark's main() times and trains

    calls = [n for n in ast.walk(ast.parse((ROOT / "bench" / script).read_text()))
             if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"]
    missing = [ast.literal_eval(c.args[0]) for c in calls if not any(k.arg == "help" for k in c.keywords)]
    assert not missing
