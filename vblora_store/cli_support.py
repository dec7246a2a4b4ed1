"""The command line's machinery: one-line errors and exit codes, option types, the output protocol.

``cli.py`` holds the commands; this module how every one of them parses,
fails and prints.  Imports only click and torch-free modules.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import traceback
from typing import Optional

import click

from .choices import ReportFormat
from .errors import VBLoRAStoreError, WriteError, os_problem
from .results import EXIT_BAD_INPUT, EXIT_OK

__all__ = ["Group", "Number", "Choice", "enum_option", "format_option", "sources", "emit", "print_now"]


#: click >= 8.2 raises this UsageError, whose message is the whole help, for a bare group; older click
#: prints the help itself and exits 0 (then nothing matches this empty tuple).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class Group(click.Group):
    """One line per error, exit code 2: usage errors, library errors, the operating system's refusals.

    A traceback only with ``--debug``.  No arguments at all is a usage error too, answered with the
    help unchanged on stderr (as click >= 8.2, black and POSIX tools answer a missing operand).
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as e:  # bare `vblora-store`: the help itself, as click >= 8.2 prints it
            _fail(e.format_message())
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "vblora-store"
            message = e.format_message().rstrip(".")
            _fail(f"error: {message[:1].lower()}{message[1:]}; see {where} --help")
        except click.ClickException as e:
            _fail(f"error: {e.format_message()}", e.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        sys.exit(code if isinstance(code, int) else EXIT_OK)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except VBLoRAStoreError as e:
            _debug(ctx)
            _fail(f"error: {e}")
        except Exception as e:  # the operating system's refusal, a bug, or input no check caught
            _debug(ctx)
            problem = os_problem(e)
            if problem is not None:
                where = getattr(e, "filename", None)
                _fail(
                    f"error: {problem.message('access', where) if where else problem.message('write', 'standard output')}"
                )
            _fail(f"error: unexpected {type(e).__name__}: {e}; rerun with --debug and report it.")


def _debug(ctx: click.Context) -> None:
    if ctx.obj and ctx.obj.get("debug"):
        traceback.print_exc()


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``message`` on stderr and exit; if stdout itself failed, drop what it still holds."""
    try:
        sys.stdout.flush()
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    click.echo(message, err=True)
    sys.exit(code)


def sources(*names: str):
    """Let the arguments ``names`` be Hub repo ids too: add ``--revision`` and ``--subfolder``.

    The command gets them as ``revision`` and ``subfolder`` and hands them, with the argument as
    given, to the library call that reads it: that call resolves the source, once
    (:func:`vblora_store.sources.resolve_source`: a local path that exists wins; a repo id is
    downloaded, the adapter files it uses only).
    """

    def decorate(command):
        command.__doc__ = (
            f"{inspect.cleandoc(command.__doc__)}\n\n{'/'.join(n.upper() for n in names)} may also be a Hub repo id "
            "(namespace/name); a local path that exists wins."
        )
        subfolder_help = "The adapter's folder inside each source (repo or local)."
        command = click.option("--subfolder", help=subfolder_help)(command)
        return click.option("--revision", help="Branch, tag or commit of Hub repo sources  [default: main]")(
            command
        )

    return decorate


class Number(click.ParamType):
    """A float at least ``minimum`` (infinity allowed, NaN refused: every comparison with it fails)."""

    name = "float"

    def __init__(self, minimum: float = 0.0):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if math.isnan(number) or number < self.minimum:
            self.fail(f"{value!r} is not a number >= {self.minimum:g}", param, ctx)
        return number


class Choice(click.Choice):
    """A choice among the members of a ``str`` Enum or registry, read when used (forms registered later count)."""

    def __init__(self, members, keep=lambda member: True):
        self._members, self._keep = members, keep
        super().__init__([])

    @property
    def choices(self):
        return [m.value for m in self._members if self._keep(m)]

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns it
        pass


def enum_option(flag: str, enum, default, help: str, *names: str, keep=lambda member: True):
    """A ``--flag`` choosing one member of a ``str`` Enum (or the storage forms) by value, default shown."""
    default = None if default is None else default.value
    return click.option(
        flag, *names, type=Choice(enum, keep), default=default, show_default=default is not None, help=help
    )


def format_option(command):
    """``--format text|json|markdown``: every command that prints a result takes it."""
    return enum_option("--format", ReportFormat, ReportFormat.TEXT, "How to print the result.", "fmt")(
        command
    )


def print_now(text: str) -> None:
    """Print ``text`` on stdout and flush it: a stdout that cannot take it fails here, as a ``WriteError``."""
    try:
        click.echo(text)
        sys.stdout.flush()
    except OSError as e:
        problem = os_problem(e)
        if problem is None:
            raise
        raise WriteError(problem.message("write", "standard output")) from e


def emit(result, fmt: str) -> None:
    """Print ``result`` in ``fmt`` and exit with its exit code: the one output and exit protocol."""
    click.echo(result.render(fmt))
    sys.exit(result.exit_code)
