"""What both CLIs share: how a Typer app is built, and how library errors become one-line messages."""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape

from minicpm_data.errors import MinicpmError

err_console = Console(stderr=True)


def make_app(name: str, help: str, *, flag_spelling: Callable[[str], str] | None = None) -> typer.Typer:
    """A Typer app with our settings: help when called bare, no shell completion, no pretty tracebacks.

    ``flag_spelling`` maps a flag name (without ``--``) to the one spelling the app's commands declare, so
    the other spelling of a multi-word flag is accepted too, and never shown."""
    return typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False,
                       context_settings={"token_normalize_func": flag_spelling} if flag_spelling else None)


def run_app(app: typer.Typer) -> None:
    """Run ``app``: library errors, and paths the system refuses (permission denied, a full disk, a folder
    where a file should go), become one line on stderr and exit code 1, never a traceback."""
    try:
        app()
    except MinicpmError as error:
        _fail(str(error))
    except OSError as error:
        where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        _fail(f"{error.strerror}: {where}" if error.strerror and where else str(error))


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(1)
