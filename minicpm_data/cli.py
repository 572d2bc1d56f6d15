"""`minicpm-data`: convert, validate, split, stats, inspect.

Command functions stay thin: parse options, call library code, print. Library code raises
``MinicpmError`` subclasses; ``main`` turns them into one line on stderr and exit code 1.
Keep module-level imports light: `minicpm-data --help` must not import torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from minicpm_data.cli_app import err_console, make_app, run_app

def flag_name(name: str) -> str:
    """The one spelling of a flag name here: hyphens (``model-max-length``); ``model_max_length`` is the same flag."""
    return name.replace("_", "-")


app = make_app("minicpm-data", "Convert raw chat data to MiniCPM's messages format, validate it, split it, and measure "
                               "it. Multi-word flags take either spelling: --dev-ratio or --dev_ratio.",
               flag_spelling=flag_name)
console = Console()


def main() -> None:
    """Console-script entry: library errors become one-line messages, exit code 1."""
    run_app(app)


# --- convert / validate / split ---------------------------------------


_MAX_PROBLEM_ROWS = 200


def _print_json(data) -> None:
    import json

    print(json.dumps(data, ensure_ascii=False, indent=2))


def _counts_table(title: str, header: str, counts) -> "Table":
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column(header)
    table.add_column("records", justify="right")
    for name, count in counts.most_common():
        table.add_row(name, str(count))
    return table


def _print_convert_summary(summary) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="convert", title_justify="left", header_style="bold")
    table.add_column("input", overflow="fold")  # a long path wraps in a narrow pipe, never cut
    for column in ("format", "read", "written", "rejected"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for item in summary.files:
        fmt = f"{item.format} (detected)" if item.detected else item.format or "-"
        table.add_row(escape(item.path), fmt, str(item.read), str(item.written), str(item.rejected))
    if len(summary.files) > 1:
        table.add_row("[bold]total", "", str(summary.read), str(summary.written), str(summary.rejected))
    console.print(table)
    if summary.repairs:
        console.print(_counts_table("repairs", "repair", summary.repairs))
    if summary.rejects:
        console.print(_counts_table("rejects", "reason", summary.rejects))
    console.print(f"read {summary.read} = written {summary.written} + rejected {summary.rejected}")
    for name, part in summary.splits.items():
        console.print(f"{name}: {part['records']} records -> {escape(part['path'])}")
    if not summary.splits:
        console.print(f"output: {escape(summary.output or 'none (no records written)')}")
    if summary.kind not in (None, "messages"):
        from minicpm_data.validate import KIND_NAMES

        console.print(f"holds: {KIND_NAMES[summary.kind]}")
    console.print(f"rejects: {escape(summary.rejects_path or 'none (every record written)')}")


def _nothing_written(summary) -> str:
    """Why a conversion wrote no record, and what to try: the CLI's one-line error."""
    if not summary.read:
        return f"no records in {', '.join(item.path for item in summary.files)}"
    reasons = ", ".join(f"{reason}: {count}" for reason, count in summary.rejects.most_common())
    hints = "".join(f"; {hint}" for hint in filter(None, (item.from_hint() for item in summary.files)))
    return f"no records written: all {summary.rejected} rejected ({reasons}); see {summary.rejects_path}{hints}"


@app.command("convert")
def convert_command(
    inputs: list[Path] = typer.Argument(..., metavar="INPUT...", help="Raw files: .json, .jsonl, .csv, .tsv, .parquet."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .json (a list) or .jsonl; a folder with --dev-ratio."),
    source: str = typer.Option("auto", "--from", help="sharegpt, alpaca, ocnli, csv (mapped columns or keys), messages, "
                                                       "prompt-completion; preference data: sharegpt-pairs, alpaca-pairs, "
                                                       "llamafactory-v1-dpo, trl-preference, hh, ultrafeedback, orca-pairs, "
                                                       "openbmb-dpo, llamafactory-kto, trl-kto; or auto."),
    fmt: str = typer.Option(None, "--format", help="json or jsonl (default: from the output's extension)."),
    rejects: Path = typer.Option(None, "--rejects", help="Rejects file (JSONL; default: OUT.rejects.jsonl beside the output)."),
    encoding: str = typer.Option(None, "--encoding", help="Input encoding (default: detected: UTF-8, BOM, GBK/GB18030)."),
    user_col: str = typer.Option(None, "--user-col", help="Column (table) or key (JSON record) holding the user turn."),
    assistant_col: str = typer.Option(None, "--assistant-col", help="Column or key holding the assistant turn."),
    system_col: str = typer.Option(None, "--system-col", help="Column or key holding the system prompt."),
    template: str = typer.Option(None, "--template", help="User turn from a template with {column} / {key} placeholders."),
    system: str = typer.Option(None, "--system", help="System prompt for every record that has none."),
    tool_turns: str = typer.Option("reject", "--tool-turns", help="Records with tool turns: reject (default) or drop those turns."),
    reasoning: str = typer.Option("reject", "--reasoning", help="Assistant turns with reasoning: reject the record "
                                  "(default), drop the reasoning, or think: write it as <think>...</think> before the answer."),
    media: str = typer.Option("reject", "--media", help="Records with images, audio or video (images/videos/audios "
                              "keys, <image>-style placeholders, media parts): reject (default), or drop the media "
                              "and keep the text."),
    no_repair: bool = typer.Option(False, "--no-repair", help="Reject records that need a repair instead of repairing them."),
    dedupe: bool = typer.Option(False, "--dedupe", help="Reject exact duplicate conversations (reason: duplicate)."),
    workers: int = typer.Option(1, "--workers", help="Worker processes for JSON Lines input (1: none)."),
    dev_ratio: float = typer.Option(None, "--dev-ratio", help="Also split: write OUT/train and OUT/dev with this dev share."),
    seed: int = typer.Option(42, "--seed", help="Seed for --dev-ratio."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Convert raw chat data into MiniCPM's messages format (preference data: into pairs or KTO rows); every record
    is written or rejected.

    Exits 1 when no record is written (no output file then; the rejects file says why)."""
    from rich.markup import escape

    from minicpm_data.convert import ConvertOptions, convert_and_split, convert_files
    from minicpm_data.errors import InputError

    options = ConvertOptions(source=source, encoding=encoding, user_col=user_col, assistant_col=assistant_col,
                             system_col=system_col, template=template, system=system, tool_turns=tool_turns,
                             reasoning=reasoning, media=media, repair=not no_repair, dedupe=dedupe, workers=workers)

    with err_console.status("converting...") as status:

        def progress(item) -> None:
            if item.read == 0 and item.detected:
                err_console.print(f"detected format [bold]{item.format}[/] for {escape(item.path)}", soft_wrap=True)
            status.update(f"converting {escape(item.path)}: {item.read:,} records")

        if dev_ratio is None:
            summary = convert_files(inputs, output, options=options, fmt=fmt, rejects_path=rejects, progress=progress)
        else:
            summary = convert_and_split(inputs, output, dev_ratio=dev_ratio, seed=seed, options=options, fmt=fmt,
                                        rejects_path=rejects, progress=progress)
    for item in summary.files:
        if not item.read and summary.read:  # with no records at all, the error below says so
            err_console.print(f"[yellow]warning:[/] {escape(item.path)}: no records (empty input)", soft_wrap=True)
        elif (hint := item.from_hint()) and summary.output is not None:  # else the error below says it
            err_console.print(f"[yellow]warning:[/] {escape(hint)}", soft_wrap=True)
    if as_json:
        _print_json(summary.to_dict())
    else:
        _print_convert_summary(summary)
    if summary.output is None:
        raise InputError(_nothing_written(summary))


def _data_paths(names: list[Path]) -> list[Path]:
    """The messages files ``names`` stand for, as training reads them: files, folders, globs; the rejects files of
    convert among them left out, with a note."""
    from rich.markup import escape

    from minicpm_data.io import expand_data_path, only_rejects, rejects_note

    found, skipped = [], []
    for name in names:
        files, rejects = expand_data_path(str(name))
        found, skipped = found + files, skipped + rejects
    if skipped and not found:
        raise only_rejects(skipped)
    if skipped:
        err_console.print(f"[yellow]note:[/] {escape(rejects_note(skipped))}", highlight=False, soft_wrap=True)
    return found


@app.command("validate")
def validate_command(
    names: list[Path] = typer.Argument(..., metavar="FILE...", help="Target-format .json (list) or .jsonl files, "
                                       "folders of them, or globs (as --train_data_path takes them)."),
    as_json: bool = typer.Option(False, "--json", help="Print the problems as JSON."),
) -> None:
    """Check files against their schema in schemas/ (SFT messages, preference pairs or KTO rows, told apart by
    keys) and the turn-order rules; exit 1 on any problem."""
    from rich.markup import escape
    from rich.table import Table

    from minicpm_data.validate import KIND_NAMES, file_kind, validate_file

    files = _data_paths(names)
    problems = [problem for path in files for problem in validate_file(path)]
    if as_json:
        kinds = {str(p): file_kind(p) for p in files if not any(q.file == str(p) and q.index is None for q in problems)}
        _print_json({"files": [str(p) for p in files], "kinds": kinds, "problems": [p.to_dict() for p in problems]})
    elif problems:
        title = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        table = Table(title=title, title_justify="left", header_style="bold")
        for column in ("file", "record", "line", "pointer", "problem"):
            table.add_column(column, overflow="fold")  # a long path wraps in a narrow terminal, never cut
        for problem in problems[:_MAX_PROBLEM_ROWS]:
            table.add_row(escape(problem.file), "" if problem.index is None else str(problem.index),
                          "" if problem.line is None else str(problem.line), escape(problem.pointer),
                          escape(problem.message))
        console.print(table)
        if len(problems) > _MAX_PROBLEM_ROWS:
            console.print(f"... and {len(problems) - _MAX_PROBLEM_ROWS} more; --json lists them all")
    else:
        console.print(f"[green]valid:[/] {', '.join(f'{escape(str(p))} ({KIND_NAMES[file_kind(p)]})' for p in files)}")
    raise typer.Exit(1 if problems else 0)


@app.command("split")
def split_command(
    file: Path = typer.Argument(..., help="A target-format .json or .jsonl file."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for train.<ext> and dev.<ext>."),
    dev_ratio: float = typer.Option(0.1, "--dev-ratio", help="Share of records for dev (0 < ratio < 1)."),
    seed: int = typer.Option(42, "--seed", help="Random seed: the same seed gives the same split."),
    fmt: str = typer.Option(None, "--format", help="json or jsonl (default: the input's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Split a file into OUT/train and OUT/dev: deterministic for a seed, disjoint, together the input."""
    from rich.markup import escape

    from minicpm_data.split import split_file

    result = split_file(file, output, dev_ratio=dev_ratio, seed=seed, fmt=fmt)
    if as_json:
        _print_json(result.to_dict())
    else:
        console.print(f"train: {result.train} records -> {escape(result.train_path)}")
        console.print(f"dev: {result.dev} records -> {escape(result.dev_path)}")


# --- stats / inspect ------------------------------------------

_TOKENIZER_HELP = "Local model folder (offline; custom auto_map code is never run) or hub id."
_TEMPLATE_HELP = "Chat layout: chatml (MiniCPM3/4/4.1/SALA/5) or minicpm2 (<用户>/<AI>). Default: detected."
_TRUNCATION_HELP = "right: keep the first N tokens; drop: never train on a sample longer than N."
_TRAIN_ON_HELP = "Assistant turns trained: all, or last (only the final one); a turn's own train flag wins."


def _no_colour() -> bool:
    """Whether stdout shows no colours (a pipe, NO_COLOR): then views mark with characters instead."""
    return console.color_system is None or console.no_color


def _one_kind(files: list[Path]) -> str:
    """The kind the files share (messages, pairs or kto), each checked as training checks it."""
    from minicpm_data.errors import InputError
    from minicpm_data.validate import KIND_NAMES, file_kind, require_valid

    for file in files:
        require_valid(file, None)
    kinds = {file: file_kind(file) for file in files}
    if len(set(kinds.values())) > 1:
        raise InputError("the files hold different kinds of record: " + "; ".join(
            f"{file} holds {KIND_NAMES[kind]}" for file, kind in kinds.items()) + "; measure each kind on its own")
    return kinds[files[0]]


def _load_for_render(tokenizer: str, template: str | None, trust_remote_code: bool):
    from minicpm_data.render import detect_template
    from minicpm_data.tokenizer import load_tokenizer

    loaded = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    return loaded, template or detect_template(loaded)


@app.command("stats", help="Token statistics of messages, preference-pair or KTO files, rendered exactly as training "
                            "renders them.")
def stats_command(
    names: list[Path] = typer.Argument(..., metavar="FILE...", help="Target-format .json / .jsonl files of one kind "
                                       "(one column each), folders of them, or globs."),
    tokenizer: str = typer.Option(..., "--tokenizer", "-t", help=_TOKENIZER_HELP),
    model_max_length: int = typer.Option(1024, "--model-max-length", min=1,
                                         help="Training's model_max_length."),
    template: str | None = typer.Option(None, "--template", help=_TEMPLATE_HELP),
    truncation: str = typer.Option("right", "--truncation", help=_TRUNCATION_HELP),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Per-device batch size, for padding waste."),
    train_on: str = typer.Option("all", "--train-on", help=_TRAIN_ON_HELP),
    plot: Path | None = typer.Option(None, "--plot", help="Also write a length histogram PNG here (.png added if missing)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per file) instead of tables."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let the tokenizer run its own code."),
) -> None:
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from functools import partial

    from minicpm_data import report
    from minicpm_data.stats import compute_kto_stats, compute_pair_stats, compute_stats, read_all

    plot = None if plot is None else report.plot_path(plot)
    files = _data_paths(names)
    kind = _one_kind(files)  # what training would refuse is not measured
    measure = {"messages": partial(compute_stats, train_on=train_on), "kto": compute_kto_stats,
               "pairs": compute_pair_stats}[kind]
    loaded, template = _load_for_render(tokenizer, template, trust_remote_code)
    all_stats = []
    for file in files:
        records = read_all(file, kind)
        with Progress(TextColumn("rendering {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=err_console, transient=True,
                      disable=len(records) < 2000) as progress:
            task = progress.add_task(file.name, total=len(records))
            all_stats.append(measure(str(file), records, loaded, model_max_length=model_max_length, template=template,
                                     truncation=truncation, batch_size=batch_size,
                                     on_progress=lambda done: progress.advance(task, done)))
    if plot is not None:
        report.save_plot(all_stats, plot)
    if as_json:
        print(json.dumps([stats.to_dict() for stats in all_stats], ensure_ascii=False, indent=2))
        return
    table = report.pair_stats_table if kind == "pairs" else report.stats_table
    console.print(table(all_stats, tokenizer, template))
    for stats in all_stats:
        console.print(report.suggestion_text(stats))
    for stats in all_stats:
        console.print(report.histogram(stats, markers=_no_colour()))
    if plot is not None:
        console.print(f"plot written to {plot}", markup=False, highlight=False, soft_wrap=True)


@app.command("inspect", help="Show rendered samples (both sides of a preference pair) with the trained tokens "
                              "highlighted: what the model will learn.")
def inspect_command(
    file: Path = typer.Argument(..., help="Target-format .json / .jsonl file (messages, pairs or KTO rows)."),
    tokenizer: str = typer.Option(..., "--tokenizer", "-t", help=_TOKENIZER_HELP),
    index: int = typer.Option(0, "--index", "-i", min=0, help="First record to show (0-based)."),
    count: int = typer.Option(1, "-n", "--count", min=1, help="How many records to show from --index."),
    template: str | None = typer.Option(None, "--template", help=_TEMPLATE_HELP),
    model_max_length: int | None = typer.Option(None, "--model-max-length", min=1,
                                                help="Also show what truncation to this length cuts."),
    truncation: str = typer.Option("right", "--truncation", help=_TRUNCATION_HELP),
    train_on: str = typer.Option("all", "--train-on", help=_TRAIN_ON_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let the tokenizer run its own code."),
) -> None:
    from itertools import islice

    from minicpm_data import report
    from minicpm_data.errors import InputError
    from minicpm_data.io import read_examples
    from minicpm_data.render import render, render_pairs

    kind = _one_kind([file])  # what training would refuse is not shown as if it were trained
    loaded, template = _load_for_render(tokenizer, template, trust_remote_code)
    chosen = list(islice(read_examples(file, kind), index, index + count))
    if not chosen:
        raise InputError(f"{file} has no record {index}")
    console.print(f"layout {template}; tokenizer {tokenizer}", style="bold", markup=False, highlight=False)
    cutting = {"max_length": model_max_length, "truncation": truncation}
    for number, item in chosen:
        if kind == "pairs":
            full = next(render_pairs([item], loaded, template=template))
            cut = None if model_max_length is None else next(render_pairs([item], loaded, template=template, **cutting))
            console.print(report.pair_view(number, item, full, loaded, cut, markers=_no_colour()))
            continue
        on = "last" if kind == "kto" else train_on  # a KTO row's label judges its final answer
        full = render(item, loaded, template=template, train_on=on)
        cut = None if model_max_length is None else render(item, loaded, template=template, train_on=on, **cutting)
        name = f"sample {number} ({'desirable' if item.label else 'undesirable'} answer)" if kind == "kto" else None
        console.print(report.inspect_view(number, item, full, loaded, cut, markers=_no_colour(), name=name))


if __name__ == "__main__":
    main()
