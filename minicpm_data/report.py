"""Rich tables, terminal histograms, PNG plots and the inspect view; they build renderables, never print."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from minicpm_data.errors import InputError, MinicpmError
from minicpm_data.stats import FileStats, PairStats

HISTOGRAM_BINS = 16
BAR_WIDTH = 40
FIT_BAR, OVER_BAR = "█", "░"  # without colours, bins longer than model_max_length are drawn with OVER_BAR
TRAINED_STYLE, PROMPT_STYLE, CUT_STYLE = "bold black on green", "dim", "strike red"


def _count(value: int, whole: int) -> str:
    return f"{value:,} ({value / whole:.1%})" if whole else f"{value:,}"


def _num(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _spread(values: Any) -> str:
    return f"{_num(values.mean)}, {_num(values.p50)}, {values.max:,}"


def _file_columns(all_stats: Sequence[Any], tokenizer_name: str, template: str, what: str) -> tuple[Table, Any]:
    """A stats table with one column per file, titled with the rendering options, and ``row(label, cell)``
    that adds a row of ``cell(stats)`` per file."""
    first = all_stats[0]
    table = Table(title=Text(f"tokenizer {tokenizer_name} · layout {template} · model_max_length "
                             f"{first.model_max_length} · truncation {first.truncation} · {what}"),
                  title_justify="left", header_style="bold")
    table.add_column("")
    for stats in all_stats:
        table.add_column(Text(Path(stats.file).name), justify="right")

    def row(label: str, cell) -> None:
        table.add_row(label, *(cell(stats) for stats in all_stats))

    return table, row


def stats_table(all_stats: Sequence[FileStats], tokenizer_name: str, template: str) -> Table:
    """One column per file: records, lengths, truncation against model_max_length, tokens per epoch."""
    first = all_stats[0]
    table, row = _file_columns(all_stats, tokenizer_name, template, f"train on {first.train_on}")
    roles = sorted({role for stats in all_stats for role in stats.roles})
    row("records", lambda s: f"{s.records:,}")
    row("turns per record (mean, min-max)", lambda s: f"{s.turns.mean:.2f}, {s.turns.min}-{s.turns.max}")
    for role in roles:
        row(f"  {role} messages", lambda s, role=role: f"{s.roles.get(role, 0):,}")
    table.add_section()
    for name in ("min", "mean", "p50", "p90", "p95", "p99", "max"):
        row(f"tokens per sample: {name}", lambda s, name=name: _num(getattr(s.tokens, name)))
    row("trained tokens per sample: mean", lambda s: _num(s.trained.mean))
    row("trained tokens per sample: p50 / max", lambda s: f"{_num(s.trained.p50)} / {s.trained.max:,}")
    row("template overhead per sample", lambda s: f"{s.template_overhead:,.1f} tokens "
        f"({s.template_overhead / s.tokens.mean if s.tokens.mean else 0:.0%})")
    table.add_section()
    row(f"longer than {first.model_max_length}", lambda s: _count(s.over_max_length, s.records))
    row("  lose some trained tokens", lambda s: _count(s.labels_partly_truncated, s.records))
    row("  lose all trained tokens (never trained)", lambda s: _count(s.labels_fully_truncated, s.records))
    row("no trained token at all (no answer, or train: false)", lambda s: _count(s.no_trained_tokens, s.records))
    row("trained tokens cut away", lambda s: f"{s.trained_tokens_lost:,}")
    table.add_section()
    row("samples trained per epoch", lambda s: _count(s.trainable_samples, s.records))
    row("tokens per epoch", lambda s: f"{s.total_tokens:,}")
    row("trained tokens per epoch", lambda s: _count(s.trained_tokens, s.total_tokens))
    row(f"padding to {first.model_max_length} (reference trainer)",
        lambda s: _count(s.padding_to_max_length, s.padding_to_max_length + s.total_tokens))
    row(f"padding to longest in batch of {first.batch_size}",
        lambda s: _count(s.padding_to_longest, s.padding_to_longest + s.total_tokens))
    if any(stats.labels for stats in all_stats):  # KTO rows
        table.add_section()
        row("desirable answers (label true)", lambda s: _count(s.labels["desirable"], s.records))
        row("undesirable answers (label false)", lambda s: _count(s.labels["undesirable"], s.records))
    table.add_section()
    row("suggested model_max_length", lambda s: f"{s.suggested_max_length:,}")
    return table


def pair_stats_table(all_stats: Sequence[PairStats], tokenizer_name: str, template: str) -> Table:
    """One column per file of preference pairs: context and answer tokens, what truncation does to the pairs
    (drops them, or cuts them until no differing token is left), tokens per epoch."""
    first = all_stats[0]
    table, row = _file_columns(all_stats, tokenizer_name, template, "preference pairs")
    row("pairs", lambda s: f"{s.records:,}")
    table.add_section()
    for name, what in (("context", "context tokens"), ("chosen", "chosen answer tokens"),
                       ("rejected", "rejected answer tokens")):
        row(f"{what}: mean, p50, max", lambda s, name=name: _spread(getattr(s, name)))
    row("longer side: mean, p50, max", lambda s: _spread(s.tokens))
    table.add_section()
    row(f"a side longer than {first.model_max_length}", lambda s: _count(s.over_max_length, s.records))
    row("  answers cut, still trained", lambda s: _count(s.answers_cut, s.records))
    row("  an answer cut away (never trained)", lambda s: _count(s.problems["answer truncated away"], s.records))
    row("  no differing token left (never trained)", lambda s: _count(s.problems["no difference left"], s.records))
    row("identical answers (never trained)", lambda s: _count(s.problems["identical answers"], s.records))
    table.add_section()
    row("pairs trained per epoch", lambda s: _count(s.trainable_pairs, s.records))
    row("  an answer merged with the prompt's end", lambda s: _count(s.merged_boundary, s.records))
    row("tokens per epoch, both sides", lambda s: f"{s.total_tokens:,}")
    row("trained tokens per epoch", lambda s: _count(s.trained_tokens, s.total_tokens))
    row(f"padding, batches of {first.batch_size} pairs", lambda s: _count(s.padding_to_longest,
                                                                         s.padding_to_longest + s.total_tokens))
    table.add_section()
    row("suggested model_max_length", lambda s: f"{s.suggested_max_length:,}")
    return table


def suggestion_text(stats: FileStats | PairStats) -> Text:
    """Why the suggested length: the smallest multiple of 64 covering the 99th percentile."""
    if not stats.records:
        return Text(f"{Path(stats.file).name}: no records, so no length to suggest.")
    lengths = stats.lengths
    over = int((lengths > stats.suggested_max_length).sum()) if lengths is not None else 0
    return Text(f"{Path(stats.file).name}: suggested model_max_length {stats.suggested_max_length} is the smallest "
                f"multiple of 64 covering p99 ({stats.tokens.p99:,.0f} tokens); {over:,} of {stats.records:,} "
                f"{stats.unit}s are longer (longest {stats.tokens.max:,}).")


def _histogram_edges(low: int, high: int, limit: int) -> Any:
    """Edges of equal whole-token bins ``[edge, next edge)`` covering ``low..high`` in at most
    ``HISTOGRAM_BINS + 1`` bins, none below 0; when ``limit`` lies within, a bin starts right after it."""
    import numpy as np

    width = -(-(high - low + 1) // HISTOGRAM_BINS)
    anchor = limit + 1 if low - 1 <= limit <= high else low
    first = anchor - -(-(anchor - low) // width) * width  # the last grid point at or below low
    return np.maximum(np.arange(first, high + width + 1, width), 0)


def histogram(stats: FileStats, *, markers: bool = False) -> Group:
    """Length histogram in the terminal, on whole-token bins from the shortest to the longest sample;
    green bins fit, red bins are longer than model_max_length (a bin edge when it lies within the lengths).
    ``markers``: for output without colours, the longer bins are also drawn with :data:`OVER_BAR`."""
    import numpy as np

    name = Path(stats.file).name
    if not stats.records:
        return Group(Text(f"{name}: no records"))
    limit = stats.model_max_length
    edges = _histogram_edges(stats.tokens.min, stats.tokens.max, limit)
    counts = np.bincount(np.searchsorted(edges, stats.lengths, side="right") - 1, minlength=len(edges) - 1)
    table = Table(show_header=False, box=None, pad_edge=False)
    for justify in ("right", "left", "right", "left"):
        table.add_column(justify=justify)
    peak = int(counts.max())
    for count, start, end in zip(counts, edges[:-1], edges[1:] - 1):
        over = start > limit
        full, tiny = (OVER_BAR, OVER_BAR) if markers and over else (FIT_BAR, "▏")
        bar = full * int(round(BAR_WIDTH * count / peak)) or (tiny if count else "")
        label = f"{start:,}" if start == end else f"{start:,}-{end:,}"
        marker = f"← model_max_length {limit}" if end == limit else ""
        table.add_row(label, Text(bar, style="red" if over else "green"), f"{count:,}", marker)
    key = f"{OVER_BAR}{OVER_BAR}{OVER_BAR}" if markers else "red"
    title = Text(f"{name}: tokens per {_length_of(stats)} ({key}: longer than model_max_length {limit})", style="bold")
    return Group(title, table)


def _length_of(stats: FileStats | PairStats) -> str:
    return "pair (its longer side)" if stats.unit == "pair" else stats.unit


def plot_path(path: str | Path) -> Path:
    """Where ``--plot`` writes its PNG: ``.png`` is added to a name without one. Checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--plot {path}: is a directory; give a file name such as {path / 'lengths.png'}")
    if path.suffix.lower() not in ("", ".png"):
        raise InputError(f"--plot {path}: the plot is a PNG; give a .png file name")
    if importlib.util.find_spec("matplotlib") is None:
        raise MinicpmError("--plot needs matplotlib: pip install matplotlib")
    return path if path.suffix else path.with_suffix(".png")


def plot_figure(all_stats: Sequence[FileStats]) -> Any:
    """A matplotlib figure: histogram of tokens per sample, one series per file, model_max_length marked,
    and each file's suggested length (files with records) as a dotted line in its series' colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.8), dpi=110)
    limit = all_stats[0].model_max_length
    top = max(max(int(s.tokens.max) for s in all_stats), limit)
    for stats in all_stats:
        name = Path(stats.file).name
        *_, patches = axes.hist(stats.lengths, bins=60, range=(0, top), alpha=0.55,
                                label=f"{name} ({stats.records:,} {stats.unit}s, {stats.over_max_length:,} over)")
        if stats.records:
            axes.axvline(stats.suggested_max_length, color=patches[0].get_facecolor(), alpha=1, linestyle=":",
                         label=f"suggested for {name} = {stats.suggested_max_length}")
    axes.axvline(limit, color="red", linestyle="--", label=f"model_max_length = {limit}")
    axes.set_xlabel(f"tokens per {_length_of(all_stats[0])} (rendered as training sees them)")
    axes.set_ylabel(f"{all_stats[0].unit}s")
    axes.set_title("Sample lengths")
    axes.legend()
    figure.tight_layout()
    return figure


def save_plot(all_stats: Sequence[FileStats], path: str | Path) -> Path:
    """Write :func:`plot_figure` as a PNG; ``path`` as :func:`plot_path` returns it."""
    import matplotlib.pyplot as plt

    figure = plot_figure(all_stats)
    path = Path(path)
    try:
        figure.savefig(path)
    except (OSError, ValueError) as error:  # missing folder, no write permission, unknown image format
        raise InputError(f"cannot write plot {path}: {error}") from None
    finally:
        plt.close(figure)
    return path


def inspect_view(index: int, conversation: Any, full: Any, tokenizer: Any, cut: Any = None, *,
                 markers: bool = False, name: str | None = None) -> Group:
    """The "what will the model learn" view of one sample.

    ``full`` is the untruncated rendering, ``cut`` the same sample under the truncation policy (if any):
    trained tokens are highlighted, tokens cut by truncation struck out, with per-turn token counts.
    ``markers`` also writes ⟦trained⟧ and ✂ before the cut, for output without colours. ``name`` titles the
    view (default ``sample INDEX``).
    """
    cut = cut or full
    ids, kept = full.input_ids, len(cut.input_ids)
    labels = cut.labels + full.labels[kept:]
    changes = (i for i in range(1, len(labels)) if (labels[i] == -100) != (labels[i - 1] == -100))
    boundaries = sorted({0, len(ids), kept, *full.turn_ends, *changes})
    text, decoded = Text(), ""
    for start, end in zip(boundaries, boundaries[1:]):
        # Decoding prefixes keeps multi-token characters and the tokenizer's own spacing intact.
        upto = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece, decoded = upto[len(decoded):], upto
        style = CUT_STYLE if start >= kept else TRAINED_STYLE if labels[start] != -100 else PROMPT_STYLE
        if markers and start == kept:
            text.append("✂", style=CUT_STYLE)
        if markers and style == TRAINED_STYLE:
            piece = f"⟦{piece}⟧"
        text.append(piece, style=style)
    title = f"{name or f'sample {index}'}: {full.num_tokens:,} tokens, {full.trained_tokens:,} trained"
    if cut.truncated:
        title += (f"; over {kept:,}: {cut.trained_tokens_lost:,} trained tokens cut"
                  + ("" if cut.trainable else ", never trained"))
    turns = Table(title=Text(title), title_justify="left", header_style="bold")
    for name in ("turn", "role", "tokens", "trained", "content"):
        # The short columns keep their full header even in a narrow pipe; only the content column gives way
        # (its cells are single lines cut with an ellipsis, so the table stays one row per turn).
        turns.add_column(name, justify="left" if name in ("role", "content") else "right",
                         no_wrap=name != "content", max_width=60 if name == "content" else None,
                         min_width=None if name == "content" else max(len(name), 9 if name == "role" else 0))
    start = 0
    for number, (message, end) in enumerate(zip(conversation.messages, full.turn_ends)):
        trained = sum(label != -100 for label in cut.labels[start:min(end, kept)])
        turns.add_row(str(number), Text(message.role), f"{end - start:,}", f"{trained:,}",
                      Text(repr(message.content), no_wrap=True, overflow="ellipsis"))
        start = end
    legend = Text.assemble(("⟦trained⟧" if markers else "trained", TRAINED_STYLE), "  ",
                           ("not trained", PROMPT_STYLE), "  ", ("✂ cut by truncation" if markers else
                                                                 "cut by truncation", CUT_STYLE))
    return Group(turns, legend, text, Text(""))


def pair_view(index: int, pair: Any, full: Any, tokenizer: Any, cut: Any = None, *, markers: bool = False) -> Group:
    """Both sides of a preference pair (``full``/``cut``: :class:`~minicpm_data.render.RenderedPair` at full length
    and under the truncation policy), each as :func:`inspect_view` shows a sample, under a line that says how
    many context tokens they share and why training would skip the pair, if it would."""
    cut = cut or full
    problem = cut.problem or full.problem
    head = Text(f"pair {index}: {full.prompt_tokens:,} context tokens shared by both sides", style="bold")
    if full.merged_boundary:
        head.append("; the tokenizer merged one answer's first token with the prompt's last: both sides are "
                    "trained from the shared tokens")
    if problem:
        head.append(f"; never trained: {problem}", style="bold red")
    chosen, rejected = pair.sides()
    return Group(head, *(inspect_view(index, side, getattr(full, which), tokenizer, getattr(cut, which), markers=markers,
                                      name=f"pair {index}, {which}")
                         for which, side in (("chosen", chosen), ("rejected", rejected))))
