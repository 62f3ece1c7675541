"""The command line run in-process, as a user sees it: exit status, stdout and stderr.

A refusal is immediate, and a subprocess would cost seconds each; tests where the process
itself matters (exit codes of a real interpreter, memory limits) still use subprocesses.
"""

from __future__ import annotations

from click.testing import CliRunner

from cli import EXIT_ERROR, cli


def run_cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    return result.exit_code, result.stdout, result.stderr


def one_line_error(status: int, stderr: str, *words: str) -> None:
    """The error a user can fix: exit 1, one line starting with 'error: ', holding each of `words`."""
    assert status == EXIT_ERROR, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    for word in words:
        assert word in stderr, stderr
