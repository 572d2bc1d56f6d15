"""`minicpm-train`: run, plan, doctor, merge, chat, eval.

Command functions stay thin: parse options, call library code, print. Library code raises
``MinicpmError`` subclasses; ``main`` turns them into one line on stderr and exit code 1.
Heavy libraries are imported inside the commands that need them.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from minicpm_data.errors import MinicpmError

app = typer.Typer(
    name="minicpm-train",
    help="Train MiniCPM on minicpm-data output; plan memory, check the machine, merge, chat, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def main() -> None:
    """Console-script entry: run the app, turning library errors into one-line messages."""
    try:
        app()
    except MinicpmError as error:
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(1)


# --- run (issue: training) -----------------------------------------------------------------------


# --- plan / doctor / merge / chat / eval (issue: before and after training) ------------------------


if __name__ == "__main__":
    main()
