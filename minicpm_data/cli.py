"""`minicpm-data`: convert, validate, split, stats, inspect.

Command functions stay thin: parse options, call library code, print. Library code raises
``MinicpmError`` subclasses; ``main`` turns them into one line on stderr and exit code 1.
Keep module-level imports light: `minicpm-data --help` must not import torch or transformers.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from minicpm_data.errors import MinicpmError

app = typer.Typer(
    name="minicpm-data",
    help="Convert raw chat data to MiniCPM's messages format, validate it, split it, and measure it.",
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


# --- convert / validate / split (issue: data conversion) ---------------------------------------


# --- stats / inspect (issue: rendering and statistics) ------------------------------------------


if __name__ == "__main__":
    main()
