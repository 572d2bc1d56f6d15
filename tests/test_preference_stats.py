"""stats and inspect on preference pairs and KTO rows: the numbers of render_pairs, what truncation does to
pairs, both sides shown with their trained spans; one-line errors for files of mixed kinds."""

from __future__ import annotations

import json

import pytest
from test_data_cli import run_cli

from minicpm_data.conversation import Message, PreferencePair
from minicpm_data.render import render_pairs
from minicpm_data.stats import compute_pair_stats
from minicpm_data.tokenizer import load_tokenizer

TOKENIZERS = {"chatml": "chatml", "minicpm2": "minicpm2"}


def _pair(question, chosen, rejected):
    return {"messages": [{"role": "user", "content": question}], "chosen": {"role": "assistant", "content": chosen},
            "rejected": {"role": "assistant", "content": rejected}}


# 0: fine; 1: differs only late (truncation at a small length leaves no differing token); 2: long answer;
# 3: equal once MiniCPM-2's layout strips the contents.
PAIRS = [_pair("Capital of France?", "Paris.", "Lyon."),
         _pair("Count.", "one two three four five six seven eight nine ten", "one two three four five six seven eight nine zero"),
         _pair("Tell a story.", "Once upon a time " * 12, "No."),
         _pair("Say yes.", "Yes.", " Yes. ")]


@pytest.fixture(scope="module")
def tokenizers(fixtures_dir):
    return {name: load_tokenizer(str(fixtures_dir / "tokenizers" / name)) for name in TOKENIZERS}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    return path


def _pairs():
    return [PreferencePair.from_record(p) for p in PAIRS]


@pytest.mark.parametrize("layout", TOKENIZERS)
def test_pair_numbers_come_from_render_pairs(tokenizers, layout):
    tokenizer = tokenizers[layout]
    full = list(render_pairs(_pairs(), tokenizer))
    limit = full[1].prompt_tokens + 8  # inside pair 1's shared answer beginning, past pair 0's answers
    cut = list(render_pairs(_pairs(), tokenizer, max_length=limit))
    stats = compute_pair_stats("f", _pairs(), tokenizer, model_max_length=limit, batch_size=2)
    assert stats.records == 4 and stats.context.max == max(p.prompt_tokens for p in full)
    assert stats.chosen.max == max(p.chosen.trained_tokens for p in full)
    assert stats.tokens.max == max(max(p.chosen.num_tokens, p.rejected.num_tokens) for p in full)
    expected = {"no difference left": 1, "answer truncated away": 0}
    expected["identical answers"] = 1 if layout == "minicpm2" else 0
    assert {name: stats.problems[name] for name in expected} == expected
    assert stats.cut_by_truncation == 1 and [p.problem for p in cut][:2] == [None, "no difference left"]
    kept = [p for p in cut if p.problem is None]
    assert stats.trainable_pairs == len(kept) and stats.answers_cut == 1  # the story: cut, still trained
    assert stats.total_tokens == sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in kept)
    assert stats.over_max_length == sum(max(p.chosen.num_tokens, p.rejected.num_tokens) > limit for p in full)


def test_cli_stats_and_json_for_pairs(capsys, fixtures_dir, pairs_file):
    tokenizer = str(fixtures_dir / "tokenizers" / "minicpm2")
    code, out, err = run_cli(capsys, "stats", pairs_file, "-t", tokenizer, "--model-max-length", "24")
    assert code == 0, err
    out = " ".join(out.split())  # Rich wraps long titles and labels in a narrow pipe
    for line in ("preference pairs", "context tokens: mean, p50, max", "no differing token left (never trained)",
                 "identical answers (never trained)", "pairs trained per epoch", "tokens per pair (its longer side)"):
        assert line in out, line
    code, out, _ = run_cli(capsys, "stats", pairs_file, "-t", tokenizer, "--model-max-length", "24", "--json")
    data = json.loads(out)[0]
    assert code == 0 and data["kind"] == "pairs" and data["problems"]["identical answers"] == 1
    assert data["trainable_pairs"] + sum(data["problems"].values()) == data["records"] == 4


def test_cli_stats_of_kto_rows_counts_labels(capsys, fixtures_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}], "label": label}
            for label in (True, False, False)]
    path = tmp_path / "kto.json"
    path.write_text(json.dumps(rows))
    code, out, _ = run_cli(capsys, "stats", path, "-t", fixtures_dir / "tokenizers" / "chatml", "--json")
    data = json.loads(out)[0]
    assert code == 0 and data["labels"] == {"desirable": 1, "undesirable": 2} and data["train_on"] == "last"
    code, out, _ = run_cli(capsys, "stats", path, "-t", fixtures_dir / "tokenizers" / "chatml")
    assert code == 0 and "undesirable answers (label false)" in out and "2 (66.7%)" in out


def test_cli_inspect_shows_both_sides_and_why_a_pair_is_skipped(capsys, fixtures_dir, pairs_file):
    code, out, err = run_cli(capsys, "inspect", pairs_file, "-t", fixtures_dir / "tokenizers" / "minicpm2", "-n", "4")
    assert code == 0, err
    out = " ".join(out.split())
    assert "pair 0, chosen:" in out and "pair 0, rejected:" in out and "⟦Paris.</s>⟧" in out and "⟦Lyon.</s>⟧" in out
    assert "pair 3: " in out and "never trained: identical answers" in out
    code, out, _ = run_cli(capsys, "inspect", pairs_file, "-t", fixtures_dir / "tokenizers" / "chatml", "-i", "1",
                           "--model-max-length", "20")
    assert code == 0 and "never trained: no difference left" in " ".join(out.split()) and "✂" in out


def test_cli_inspect_kto_row_trains_only_its_final_answer(capsys, fixtures_dir, tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "early"},
                                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "late"}],
                                "label": False}) + "\n")
    code, out, _ = run_cli(capsys, "inspect", path, "-t", fixtures_dir / "tokenizers" / "chatml")
    assert code == 0 and "sample 0 (undesirable answer)" in out and "⟦late<|im_end|>⟧" in out and "⟦early" not in out


def test_files_of_different_kinds_are_one_error_line(capsys, fixtures_dir, pairs_file):
    messages = fixtures_dir / "train" / "dev.json"
    code, _, err = run_cli(capsys, "stats", pairs_file, messages, "-t", fixtures_dir / "tokenizers" / "chatml")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "the files hold different kinds of record" in err and "measure each kind on its own" in err


def test_merged_boundary_pairs_are_counted_by_stats_and_shown_by_inspect(capsys, tokenizers, fixtures_dir, tmp_path):
    """The fixture MiniCPM-2 tokenizer merges "<AI>"'s ">" with "H": such a pair is trained and counted."""
    merged, plain = _pair("Say hi.", "Hello there.", "Bye."), _pair("Say hi.", "Sure.", "Bye.")
    stats = compute_pair_stats("f", [PreferencePair.from_record(p) for p in (merged, plain)], tokenizers["minicpm2"],
                               model_max_length=64)
    assert (stats.merged_boundary, stats.trainable_pairs, sum(stats.problems.values())) == (1, 2, 0)
    assert stats.to_dict()["merged_boundary"] == 1
    path = tmp_path / "merged.jsonl"
    path.write_text(json.dumps(merged) + "\n")
    code, out, err = run_cli(capsys, "stats", path, "-t", fixtures_dir / "tokenizers" / "minicpm2")
    assert code == 0 and "an answer merged with the prompt's end │ 1 (100.0%)" in " ".join(out.split()), err
    code, out, err = run_cli(capsys, "inspect", path, "-t", fixtures_dir / "tokenizers" / "minicpm2")
    out = " ".join(out.split())
    assert code == 0 and "merged one answer's first token with the prompt's last" in out, err
    assert "⟦>Hello there.</s>⟧" in out and "⟦>Bye.</s>⟧" in out  # both sides trained from the shared prefix
