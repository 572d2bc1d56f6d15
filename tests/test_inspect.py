"""minicpm-data inspect: the rendered sample, trained spans highlighted, per-turn token counts."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from test_data_cli import run_cli
from test_stats import valid_lengths_file  # noqa: F401 (a fixture)

from minicpm_data.io import read_conversations
from minicpm_data.render import render
from minicpm_data.report import CUT_STYLE, TRAINED_STYLE, inspect_view
from minicpm_data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def lengths_file(fixtures_dir):
    return fixtures_dir / "chat" / "lengths.json"


def _styled_text(view, style):
    """The characters of the view's sample text that carry ``style``."""
    text = view.renderables[2]
    return "".join(text.plain[span.start:span.end] for span in text.spans if span.style == style)


def test_trained_spans_are_the_answers_and_their_ends(fixtures_dir, lengths_file):
    tokenizer = load_tokenizer(str(fixtures_dir / "tokenizers" / "chatml"))
    index, conversation = list(read_conversations(lengths_file))[3]
    sample = render(conversation, tokenizer)
    view = inspect_view(index, conversation, sample, tokenizer)
    assert view.renderables[2].plain == tokenizer.decode(sample.input_ids)
    answers = [m.content for m in conversation.messages if m.role == "assistant"]
    assert _styled_text(view, TRAINED_STYLE) == "".join(answer + "<|im_end|>" for answer in answers)
    turns = view.renderables[0]
    assert [cell.plain for cell in turns.columns[1].cells] == ["user", "assistant", "user", "assistant"]
    counts = [int(cell.replace(",", "")) for cell in turns.columns[2].cells]
    trained = [int(cell.replace(",", "")) for cell in turns.columns[3].cells]
    assert sum(counts) == sample.num_tokens and sum(trained) == sample.trained_tokens
    assert trained[0] == trained[2] == 0 and trained[1] > 0 and trained[3] > 0


def test_truncated_part_is_struck(fixtures_dir, lengths_file):
    tokenizer = load_tokenizer(str(fixtures_dir / "tokenizers" / "chatml"))
    index, conversation = list(read_conversations(lengths_file))[3]
    full = render(conversation, tokenizer)
    cut = render(conversation, tokenizer, max_length=full.num_tokens - 5)
    view = inspect_view(index, conversation, full, tokenizer, cut)
    assert _styled_text(view, CUT_STYLE) == tokenizer.decode(full.input_ids[-5:])
    marked = inspect_view(index, conversation, full, tokenizer, cut, markers=True).renderables[2].plain
    assert marked.replace("⟦", "").replace("⟧", "").replace("✂", "") == view.renderables[2].plain
    assert marked.count("⟦") == 2 and marked.index("✂") > marked.rindex("⟦")
    assert f"{cut.trained_tokens_lost} trained tokens cut" in view.renderables[0].title.plain


def test_cli_shows_several_samples(capsys, fixtures_dir, valid_lengths_file):
    code, out, err = run_cli(capsys, "inspect", valid_lengths_file, "--tokenizer", fixtures_dir / "tokenizers" / "minicpm2",
                             "--index", 1, "-n", 2)
    assert code == 0, err
    assert "layout minicpm2" in out and "sample 1:" in out and "sample 2:" in out and "sample 3:" not in out
    # No colours here, so markers; the fixture merges ">你" across <AI>'s edge: that token is trained.
    assert "<用户>你好，世界！今天天气很好。<AI⟦>你好" in out and "</s>⟧" in out


def test_markup_in_content_is_shown_verbatim(capsys, tmp_path, fixtures_dir):
    data = tmp_path / "brackets.json"
    data.write_text('[{"messages": [{"role": "user", "content": "pick [entailment, neutral] [bold]x[/bold]"}, '
                    '{"role": "assistant", "content": "[red]neutral"}]}]', encoding="utf-8")
    code, out, err = run_cli(capsys, "inspect", data, "--tokenizer", fixtures_dir / "tokenizers" / "chatml")
    assert code == 0, err
    assert "pick [entailment, neutral] [bold]x[/bold]<|im_end|>" in out and "[red]neutral<|im_end|>" in out
    assert "'pick [entailment" in out and "'[red]neutral'" in out  # the per-turn table too


def test_cli_real_tokenizer_and_missing_record(capsys, shared_dir, valid_lengths_file):
    folder = shared_dir / "tokenizers" / "minicpm3"
    code, out, err = run_cli(capsys, "inspect", valid_lengths_file, "--tokenizer", folder, "--model-max-length", 20)
    assert code == 0, err
    assert "sample 0:" in out and "<|im_start|>" in out
    code, out, err = run_cli(capsys, "inspect", valid_lengths_file, "--tokenizer", folder, "--index", 99)
    assert code == 1 and "has no record 99" in err


def test_turn_table_keeps_its_headers_in_a_narrow_pipe(fixtures_dir, lengths_file):
    tokenizer = load_tokenizer(str(fixtures_dir / "tokenizers" / "chatml"))
    index, conversation = list(read_conversations(lengths_file))[3]
    view = inspect_view(index, conversation, render(conversation, tokenizer), tokenizer, markers=True)
    console = Console(width=50, record=True, file=io.StringIO(), color_system=None)
    console.print(view.renderables[0])
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "role" in line)
    assert all(name in header for name in ("turn", "role", "tokens", "trained", "content"))
    assert all(len(line) <= 50 for line in lines)
    rows = [line for line in lines if "assistant" in line or "user" in line]
    assert len(rows) == len(conversation.messages) and any("…" in row for row in rows)


def test_cli_train_on_last_marks_only_the_final_answer(capsys, tmp_path, fixtures_dir):
    path = tmp_path / "two.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "early"}, '
                    '{"role": "user", "content": "q2"}, {"role": "assistant", "content": "late"}]}\n', encoding="utf-8")
    chatml = fixtures_dir / "tokenizers" / "chatml"
    code, out, err = run_cli(capsys, "inspect", path, "--tokenizer", chatml)
    assert code == 0, err
    assert "⟦early<|im_end|>⟧" in out and "⟦late<|im_end|>⟧" in out
    code, out, err = run_cli(capsys, "inspect", path, "--tokenizer", chatml, "--train-on", "last")
    assert code == 0, err
    assert "⟦early" not in out and "early<|im_end|>" in out and "⟦late<|im_end|>⟧" in out
