# The `pingjia` command line: every command documented, exit codes honoured.
import subprocess
import sys

import click

from hub.cli import cli


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        path = prefix + (name,)
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path)


def test_every_command_has_help_text():
    missing = [" ".join(path) for path, cmd in _commands(cli) if not (cmd.help or cmd.short_help)]
    assert not missing, "commands without help: %s" % missing


def test_every_component_has_its_group():
    assert {"hub", "device", "province", "sim", "agent"} <= set(cli.commands)


def test_ctx_exit_code_reaches_the_shell():
    proc = subprocess.run([sys.executable, "-c",
                           "import sys, click\n"
                           "from hub.cli import cli, main\n"
                           "@cli.command('probe')\n"
                           "@click.pass_context\n"
                           "def probe(ctx):\n"
                           "    ctx.exit(3)\n"
                           "sys.argv = ['pingjia', 'probe']\n"
                           "main()\n"], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr


def test_user_mistake_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "hub.cli", "hub", "status", "--config", "no-such.toml"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
