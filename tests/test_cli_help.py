"""The command line explains itself: every flag has help, methods come from the registry, help is fast."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from secateurs.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_of_every_subcommand_has_help_text():
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            sub.format_help()  # fills lazy help texts
            assert action.help and action.help.strip(), f"secateurs {name} {action.option_strings or action.dest}"


def test_prune_help_lists_every_registered_method(capsys):
    from secateurs.criteria import CRITERIA

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in [*CRITERIA, "shortgpt", "flap", "sparsegpt"]:
        assert f" {name}," in text or f" {name}." in text or text.endswith(f" {name}"), name


def test_a_criterion_registered_later_is_listed_too(capsys):
    from secateurs.criteria import CRITERIA, Criterion, register

    @register
    class Listed(Criterion):
        name = "listed_in_help"

    try:
        with pytest.raises(SystemExit):
            main(["prune", "--help"])
        assert "listed_in_help" in capsys.readouterr().out
    finally:
        CRITERIA.unregister("listed_in_help")


def test_descriptions_show_no_rst_markup(capsys):
    for command in ("eval", "prune", "report", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "``" not in capsys.readouterr().out, command


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["report", "--help"], ["demo", "--help"]])
def test_help_does_not_import_torch(argv):
    code = (
        "import sys\nfrom secateurs.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')"
    )
    result = _fresh_python(code)
    assert result.stdout.strip().endswith("torch not imported"), result.stdout + result.stderr


def test_python_dash_m_secateurs_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "secateurs", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: secateurs ") and "prune" in result.stdout


def test_import_secateurs_stays_light_and_names_load_on_use():
    result = _fresh_python(
        "import sys, secateurs\nlight = 'torch' not in sys.modules\n"
        "from secateurs import prune, LayerCollapseError\n"
        "print(light, callable(prune), secateurs.structural.save_structured.__name__, sorted(secateurs.__all__) == "
        "sorted(secateurs._EXPORTS))"
    )
    assert result.stdout.split() == ["True", "True", "save_structured", "True"], result.stderr
