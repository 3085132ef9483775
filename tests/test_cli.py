import subprocess
import sys

from mean_nav.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_fails_with_usage(capsys):
    assert main(["fly-to-moon"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_every_command_module_has_the_subcommand_protocol():
    import importlib
    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments), name
        assert callable(module.run), name


def test_runtime_commands_do_not_import_torch():
    code = ("import sys, importlib; from mean_nav.cli import COMMANDS;"
            "[importlib.import_module(COMMANDS[c][0]) for c in ('run', 'replay', 'cache', 'simulate-flight')];"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
