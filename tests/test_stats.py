"""minicpm-data stats: numbers from render(), truncation counts, padding, suggestion, tables, JSON, plot."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from test_data_cli import run_cli

from minicpm_data.conversation import Conversation, Message
from minicpm_data.io import read_conversations
from minicpm_data.render import IGNORE_INDEX, render
from minicpm_data.stats import Distribution, FileStats, compute_stats, padding_to_longest, suggest_max_length
from minicpm_data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def chatml(fixtures_dir):
    return load_tokenizer(str(fixtures_dir / "tokenizers" / "chatml"))


@pytest.fixture(scope="module")
def lengths_file(fixtures_dir):
    return fixtures_dir / "chat" / "lengths.json"


@pytest.fixture(scope="module")
def valid_lengths_file(lengths_file, tmp_path_factory):
    """lengths.json without its record that has no answer (which validate, training and the CLI refuse)."""
    path = tmp_path_factory.mktemp("lengths") / "lengths.json"
    path.write_text(json.dumps(json.loads(lengths_file.read_text(encoding="utf-8"))[:4], ensure_ascii=False),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def conversations(lengths_file):
    return [conversation for _, conversation in read_conversations(lengths_file)]


def test_numbers_come_from_render(chatml, conversations):
    full = [render(c, chatml) for c in conversations]
    lengths = np.array([s.num_tokens for s in full])
    stats = compute_stats("f", conversations, chatml, model_max_length=10_000)
    assert stats.records == 5 and stats.roles == {"user": 6, "assistant": 5, "system": 1}
    assert (stats.turns.min, stats.turns.max, stats.turns.mean) == (1, 4, 2.4)
    assert stats.tokens.to_dict() == {"min": lengths.min(), "mean": lengths.mean(), "p50": np.percentile(lengths, 50),
                                      "p90": np.percentile(lengths, 90), "p95": np.percentile(lengths, 95),
                                      "p99": np.percentile(lengths, 99), "max": lengths.max()}
    assert stats.trained.max == max(s.trained_tokens for s in full)
    assert stats.total_tokens == sum(s.num_tokens for s in full if s.trained_tokens)  # no answer: not trained
    assert stats.trained_tokens == sum(s.trained_tokens for s in full)
    assert stats.no_trained_tokens == 1 and stats.trainable_samples == 4
    assert stats.over_max_length == stats.labels_partly_truncated == stats.labels_fully_truncated == 0
    # <s><|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n costs the same for every 2-turn sample.
    empty = render(Conversation([Message("user", ""), Message("assistant", "")]), chatml).num_tokens
    assert stats.template_overhead > empty - 1


def test_truncation_counts(chatml, conversations):
    full = [render(c, chatml) for c in conversations]
    # A length that cuts the longest sample inside its answers, and the second one before its answer.
    limit = next(i for i, label in enumerate(full[1].labels) if label != IGNORE_INDEX)
    stats = compute_stats("f", conversations, chatml, model_max_length=limit)
    cut = [render(c, chatml, max_length=limit) for c in conversations]
    assert stats.over_max_length == sum(s.num_tokens > limit for s in full)
    assert stats.labels_fully_truncated == sum(s.trained_tokens > 0 and not s.trainable for s in cut) >= 1
    assert stats.labels_partly_truncated == sum(s.trainable and s.trained_tokens_lost > 0 for s in cut)
    assert stats.trained_tokens_lost == sum(s.trained_tokens_lost for s in cut)
    assert stats.total_tokens == sum(len(s.input_ids) for s in cut if s.trainable)
    dropped = compute_stats("f", conversations, chatml, model_max_length=limit, truncation="drop")
    assert dropped.labels_partly_truncated == 0
    assert dropped.labels_fully_truncated == stats.over_max_length - (full[4].num_tokens > limit)


def test_padding_and_suggestion():
    lengths = np.array([10, 4, 7, 7, 1])
    assert padding_to_longest(lengths, 2) == (10 - 4) + 0 + 0
    assert padding_to_longest(lengths, 5) == 10 * 5 - 29
    assert padding_to_longest(np.array([], dtype=int), 8) == 0
    assert suggest_max_length(np.arange(1, 1001)) == 1024  # p99 = 990.01 -> 1024
    assert suggest_max_length(np.array([65] * 100)) == 128
    assert suggest_max_length(np.array([3])) == 64


def test_histogram_bins_split_at_model_max_length(chatml, conversations):
    from minicpm_data.report import histogram

    limit = 30
    stats = compute_stats("f", conversations * 3, chatml, model_max_length=limit)
    table = histogram(stats).renderables[1]
    labels, bars, counts = (list(column.cells) for column in table.columns[:3])
    counts = [int(count.replace(",", "")) for count in counts]
    assert sum(counts) == 15
    over = sum(count for count, bar in zip(counts, bars) if bar.style == "red")
    assert over == stats.over_max_length == sum(int(length) > limit for length in stats.lengths) > 0
    assert all(int(label.split("-")[0]) > limit for label, bar in zip(labels, bars) if bar.style == "red")


def _histogram_rows(lengths, limit):
    """(first, last, count, red, marker) per row of the terminal histogram of ``lengths``."""
    from minicpm_data.report import histogram

    lengths = np.array(lengths)
    stats = FileStats("f.json", len(lengths), limit, "right", 8, tokens=Distribution.of(lengths), lengths=lengths)
    rows = []
    for label, bar, count, marker in zip(*(column.cells for column in histogram(stats).renderables[1].columns)):
        first, _, last = re.fullmatch(r"(\d+)(-(\d+))?", label.replace(",", "")).group(1, 2, 3)
        rows.append((int(first), int(last or first), int(count.replace(",", "")), bar.style == "red", marker))
    return rows


@pytest.mark.parametrize("lengths, limit", [
    ([40] * 7, 1024),                   # all equal
    ([5, 6, 7, 6, 5], 1024),            # narrow, far below the limit
    ([5, 6, 7, 6, 5], 6),               # narrow, around the limit
    ([3] * 50 + [900], 30),             # one outlier; the limit's grid would start below 0
    ([100, 101, 5000], 64),             # all longer than the limit
    (list(range(10, 5000, 7)), 1024),
])
def test_histogram_bins_are_disjoint_whole_token_ranges_over_the_lengths(lengths, limit):
    rows = _histogram_rows(lengths, limit)
    assert 0 <= rows[0][0] <= min(lengths) and rows[-1][1] >= max(lengths) and len(rows) <= 17
    assert all(last + 1 == first for (_, last, *_), (first, *_) in zip(rows, rows[1:]))
    assert [count for _, _, count, _, _ in rows] == [sum(a <= n <= b for n in lengths) for a, b, *_ in rows]
    assert all(red == (first > limit) and not first <= limit < last for first, last, _, red, _ in rows)
    assert [bool(marker) for *_, marker in rows].count(True) == (min(lengths) - 1 <= limit <= max(lengths))
    assert sum(count > 0 for _, _, count, _, _ in rows) >= min(len(set(lengths)), 2)


def test_histogram_of_few_distinct_lengths_has_a_bin_each():
    assert [(a, b, count) for a, b, count, _, _ in _histogram_rows([5, 6, 7, 6, 5], 1024)] == [
        (5, 5, 2), (6, 6, 2), (7, 7, 1)]
    assert [(a, b, count) for a, b, count, _, _ in _histogram_rows([40] * 7, 1024)] == [(40, 40, 7)]


def test_progress_is_reported(chatml, conversations):
    seen = []
    compute_stats("f", conversations * 600, chatml, model_max_length=64, on_progress=seen.append)
    assert sum(seen) == 3000 and len(seen) == 3


def test_cli_tables_histogram_and_plot(capsys, fixtures_dir, valid_lengths_file, tmp_path):
    plot = tmp_path / "lengths.png"
    code, out, err = run_cli(capsys, "stats", valid_lengths_file, fixtures_dir / "train" / "dev.json", "--tokenizer",
                             fixtures_dir / "tokenizers" / "chatml", "--model-max-length", 64, "--plot", plot)
    assert code == 0, err
    for expected in ("lengths.json", "dev.json", "tokens per sample: p99", "lose all trained tokens",
                     "padding to 64 (reference trainer)", "suggested model_max_length", "← model_max_length 64"):
        assert expected in out
    import matplotlib.image

    image = matplotlib.image.imread(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 300 and image.shape[1] > 600
    assert image.std() > 0.05  # bars and lines, not a blank canvas


def test_cli_json(capsys, fixtures_dir, valid_lengths_file, conversations):
    code, out, err = run_cli(capsys, "stats", valid_lengths_file, "--tokenizer", fixtures_dir / "tokenizers" / "chatml",
                             "--model-max-length", 48, "--json")
    assert code == 0, err
    [entry] = json.loads(out)
    tokenizer = load_tokenizer(str(fixtures_dir / "tokenizers" / "chatml"))
    stats = compute_stats(str(valid_lengths_file), conversations[:4], tokenizer, model_max_length=48)
    assert entry["file"] == str(valid_lengths_file) and entry["records"] == 4
    assert set(entry["tokens"]) == {"min", "mean", "p50", "p90", "p95", "p99", "max"}
    for key in ("total_tokens", "trained_tokens", "over_max_length", "labels_partly_truncated",
                "labels_fully_truncated"):
        assert entry[key] == getattr(stats, key)
    assert entry["tokens"]["max"] == stats.tokens.max and entry["suggested_model_max_length"] % 64 == 0


def test_cli_real_minicpm4(capsys, shared_dir):
    data = shared_dir / "realdata" / "minicpm" / "ocnli_public_chatml" / "dev.json"
    folder = shared_dir / "tokenizers" / "minicpm4"
    code, out, err = run_cli(capsys, "stats", data, "--tokenizer", folder, "--model-max-length", 64, "--json")
    assert code == 0, err
    [entry] = json.loads(out)
    tokenizer = load_tokenizer(str(folder))
    texts = [tokenizer.apply_chat_template([m.to_dict() for m in c.messages], tokenize=False)
             for _, c in read_conversations(data)]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert entry["records"] == len(lengths) == 13
    assert (entry["tokens"]["min"], entry["tokens"]["max"]) == (min(lengths), max(lengths))
    assert entry["over_max_length"] == sum(length > 64 for length in lengths)


@pytest.mark.parametrize("argv, message", [
    (["--template", "llama3"], "unknown template 'llama3'"),
    (["--truncation", "left"], "unknown truncation 'left'"),
    (["--train-on", "first"], "unknown train-on 'first'"),
])
def test_cli_errors_are_one_line(capsys, fixtures_dir, valid_lengths_file, argv, message):
    code, out, err = run_cli(capsys, "stats", valid_lengths_file, "--tokenizer", fixtures_dir / "tokenizers" / "chatml",
                             *argv)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_cli_hub_id_offline(capsys, monkeypatch, valid_lengths_file):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(capsys, "stats", valid_lengths_file, "--tokenizer", "openbmb/MiniCPM4-8B")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "could not fetch openbmb/MiniCPM4-8B from the hub" in err and "local model folder" in err


def test_files_training_would_refuse_are_refused(capsys, tmp_path, fixtures_dir, lengths_file):
    tokenizer = ["--tokenizer", fixtures_dir / "tokenizers" / "chatml"]
    bot = tmp_path / "bot.jsonl"
    bot.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}) + "\n")
    first = tmp_path / "first.json"
    first.write_text(json.dumps([{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]}]))
    empty, zero = tmp_path / "empty.json", tmp_path / "zero.json"
    empty.write_text("[]", encoding="utf-8")
    zero.write_bytes(b"")
    for command in (["stats"], ["stats", "--json"], ["inspect"]):
        for path, message in ((bot, f"{bot}: 1 problem(s) in record(s) 0; first: {bot}:1 record 0 at /messages/1/role: "
                                    "'bot' is not one of"),
                              (first, f"{first}: 1 problem(s) in record(s) 0; first: {first} record 0 at /0/messages/0: "
                                      "turn is assistant, expected user"),
                              (lengths_file, f"{lengths_file}: 2 problem(s) in record(s) 4;"),
                              (empty, f"{empty}: no records: the list is empty"), (zero, f"{zero}: file is empty")):
            code, out, err = run_cli(capsys, command[0], path, *tokenizer, *command[1:])
            assert code == 1 and not out and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1
            assert "see all with: minicpm-data validate" in err or path in (empty, zero)


def test_no_records_are_reported_as_such(chatml):
    from minicpm_data.report import histogram, suggestion_text

    stats = compute_stats("empty.json", [], chatml, model_max_length=64)
    assert stats.records == stats.total_tokens == stats.over_max_length == 0
    assert suggestion_text(stats).plain == "empty.json: no records, so no length to suggest."
    assert histogram(stats).renderables[0].plain == "empty.json: no records"


def test_unwritable_plot(capsys, tmp_path, fixtures_dir, valid_lengths_file):
    tokenizer = ["--tokenizer", fixtures_dir / "tokenizers" / "chatml"]
    code, out, err = run_cli(capsys, "stats", valid_lengths_file, *tokenizer, "--plot", tmp_path / "missing" / "x.png")
    assert code == 1 and "cannot write plot" in err and len(err.strip().splitlines()) == 1


def test_histogram_without_colours_says_what_marks_the_long_bins(chatml, conversations):
    from minicpm_data.report import OVER_BAR, histogram

    stats = compute_stats("lengths.json", conversations, chatml, model_max_length=40)
    plain = histogram(stats, markers=True)
    title, bars = plain.renderables[0].plain, plain.renderables[1].columns[1].cells
    assert "red" not in title and f"{OVER_BAR * 3}: longer than model_max_length 40" in title
    assert any(OVER_BAR in bar.plain for bar in bars)
    assert all((OVER_BAR in bar.plain) == (bar.style == "red") for bar in bars if bar.plain)
    assert "red: longer than" in histogram(stats).renderables[0].plain


def test_plot_marks_every_files_suggested_length(chatml, conversations):
    from minicpm_data.report import plot_figure

    short = compute_stats("short.json", conversations[:2], chatml, model_max_length=64)
    every = compute_stats("all.json", conversations, chatml, model_max_length=64)
    none = compute_stats("none.json", [], chatml, model_max_length=64)
    figure = plot_figure([short, every, none])
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert [label for label in labels if label.startswith("suggested")] == [
        f"suggested for short.json = {short.suggested_max_length}", f"suggested for all.json = {every.suggested_max_length}"]
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert len(lines) == 3 and len({tuple(line.get_color()) for line in lines.values() if line.get_linestyle() == ":"}) == 2


def test_plot_path_gets_png_and_is_reported_as_written(capsys, tmp_path, fixtures_dir, valid_lengths_file):
    tokenizer = ["--tokenizer", fixtures_dir / "tokenizers" / "chatml"]
    code, out, err = run_cli(capsys, "stats", valid_lengths_file, *tokenizer, "--plot", tmp_path / "lengths")
    assert code == 0, err
    assert f"plot written to {tmp_path / 'lengths.png'}" in out
    assert [p.name for p in tmp_path.iterdir()] == ["lengths.png"]
    for plot, message in ((tmp_path, "is a directory"), (tmp_path / "lengths.svg", "the plot is a PNG")):
        code, out, err = run_cli(capsys, "stats", valid_lengths_file, *tokenizer, "--plot", plot)
        assert code == 1 and f"--plot {plot}: {message}" in err and len(err.strip().splitlines()) == 1


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    from minicpm_data.errors import MinicpmError
    from minicpm_data.report import plot_path

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(MinicpmError, match="--plot needs matplotlib: pip install matplotlib"):
        plot_path(tmp_path / "x.png")


def test_trained_tokens_follow_train_flags_and_train_on(capsys, chatml, fixtures_dir, tmp_path):
    multi = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "first answer"},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "second answer"}]}
    flagged = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "skip", "train": False}]}
    path = tmp_path / "flags.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (multi, flagged)) + "\n", encoding="utf-8")
    conversations = [c for _, c in read_conversations(path)]
    trained = {}
    for train_on in ("all", "last"):
        samples = [render(c, chatml, train_on=train_on) for c in conversations]
        stats = compute_stats(str(path), conversations, chatml, model_max_length=1024, train_on=train_on)
        assert stats.trained_tokens == sum(s.trained_tokens for s in samples if s.trainable)
        assert (stats.no_trained_tokens, stats.trainable_samples, stats.train_on) == (1, 1, train_on)
        code, out, err = run_cli(capsys, "stats", path, "--tokenizer", fixtures_dir / "tokenizers" / "chatml",
                                 "--train-on", train_on, "--json")
        assert code == 0, err
        [entry] = json.loads(out)
        assert (entry["trained_tokens"], entry["train_on"]) == (stats.trained_tokens, train_on)
        trained[train_on] = stats.trained_tokens
    assert 0 < trained["last"] < trained["all"]  # last trains only the second answer
