"""convert: nothing lost (read = written + rejected), every reject reason, dedupe, paths, formats."""

from __future__ import annotations

import json

import pytest

from minicpm_data.convert import ConvertOptions, convert_files
from minicpm_data.errors import FormatError, InputError
from minicpm_data.sources import REJECT_REASONS
from minicpm_data.sources.ocnli import LABELS
from minicpm_data.validate import validate_file

# Fixture, options: together these produce every reject reason.
RUNS = [
    ("sharegpt.json", ConvertOptions()),
    ("alpaca.json", ConvertOptions()),
    ("ocnli.json", ConvertOptions()),
    ("messages.jsonl", ConvertOptions(dedupe=True)),
    ("sharegpt.json", ConvertOptions(repair=False)),
    ("llamafactory_v1.jsonl", ConvertOptions()),
    ("openai_parts.jsonl", ConvertOptions()),
    ("prompt_completion.jsonl", ConvertOptions()),
    ("trl_kto.jsonl", ConvertOptions(source="prompt-completion")),  # labelled rows as SFT: auto reads them as trl-kto
    ("llamafactory_v1.jsonl", ConvertOptions(reasoning="think", tool_turns="drop")),
    ("qa.json", ConvertOptions(user_col="question", assistant_col="answer")),
    ("mllm.json", ConvertOptions()),
    ("mllm.json", ConvertOptions(media="drop")),
    # Preference data (hostile records included): every source by auto detection, and an SFT source refusing pairs.
    *((name, ConvertOptions()) for name in ("dpo_sharegpt.json", "alpaca_pairs.json", "hh.jsonl", "ultrafeedback.jsonl",
                                            "trl_preference.jsonl", "llamafactory_v1_dpo.jsonl", "orca_pairs.jsonl",
                                            "kto.json", "kto_alpaca.json", "trl_kto.jsonl")),
    ("dpo_sharegpt.json", ConvertOptions(source="sharegpt")),
]


def _rejects(path):
    """The rejects file's records; none when there is no file (convert writes one only when it rejected a record)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


@pytest.mark.parametrize("name, options", RUNS)
def test_nothing_is_lost(fixtures_dir, tmp_path, name, options):
    source = fixtures_dir / "raw" / name
    summary = convert_files([source], tmp_path / "out.json", options=options)
    rejects = _rejects(tmp_path / "out.rejects.jsonl")
    written = json.loads((tmp_path / "out.json").read_text(encoding="utf-8")) if summary.output else []
    assert summary.read == summary.written + summary.rejected
    assert (tmp_path / "out.rejects.jsonl").is_file() == bool(summary.rejected)
    assert (len(written), len(rejects)) == (summary.written, summary.rejected)
    assert sum(summary.rejects.values()) == summary.rejected
    assert not summary.output or validate_file(tmp_path / "out.json") == []
    originals = json.loads(source.read_text()) if name.endswith("sharegpt.json") else None
    for reject in rejects:
        assert set(reject) == {"file", "index", "line", "reason", "detail", "record"}
        assert reject["file"] == str(source) and reject["reason"] in REJECT_REASONS
        if originals is not None:
            assert reject["record"] == originals[reject["index"]]


def test_every_reject_reason_is_produced(fixtures_dir, tmp_path):
    seen = set()
    for number, (name, options) in enumerate(RUNS):
        seen |= set(convert_files([fixtures_dir / "raw" / name], tmp_path / f"{number}.jsonl", options=options).rejects)
    assert seen == set(REJECT_REASONS)


def test_rejects_carry_jsonl_line_numbers(fixtures_dir, tmp_path):
    convert_files([fixtures_dir / "raw" / "ocnli.json"], tmp_path / "out.jsonl")
    assert [(r["index"], r["line"], r["reason"]) for r in _rejects(tmp_path / "out.rejects.jsonl")] == [
        (3, 4, "no consensus label"), (4, 5, "no label"), (5, 6, "unknown label")]


def test_repairs_are_counted_by_kind(fixtures_dir, tmp_path):
    summary = convert_files([fixtures_dir / "raw" / "sharegpt.json"], tmp_path / "out.json")
    assert summary.repairs == {"merge same-role turns": 2, "strip whitespace": 1, "drop leading assistant turn": 1,
                               "drop trailing user turn": 1, "drop empty turns": 1}
    no_repair = convert_files([fixtures_dir / "raw" / "sharegpt.json"], tmp_path / "strict.json",
                              options=ConvertOptions(repair=False))
    assert no_repair.rejects["needs repair"] == 6 and not no_repair.repairs  # records 4-8 and 16


def test_dedupe_writes_duplicates_to_rejects(fixtures_dir, tmp_path):
    summary = convert_files([fixtures_dir / "raw" / "messages.jsonl"], tmp_path / "out.jsonl",
                            options=ConvertOptions(dedupe=True))
    duplicates = [r for r in _rejects(tmp_path / "out.rejects.jsonl") if r["reason"] == "duplicate"]
    assert summary.rejects["duplicate"] == 1 and duplicates[0]["index"] == 5
    assert duplicates[0]["detail"].endswith("messages.jsonl record 4")


def test_multiple_inputs_and_default_system(fixtures_dir, tmp_path):
    raw = fixtures_dir / "raw"
    summary = convert_files([raw / "alpaca.json", raw / "sharegpt_gbk.jsonl"], tmp_path / "out.jsonl",
                            options=ConvertOptions(system="Be helpful."))
    assert [(f.format, f.detected, f.read) for f in summary.files] == [("alpaca", True, 9), ("sharegpt", True, 2)]
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    systems = [r["messages"][0]["content"] for r in records]
    assert systems.count("You translate.") == 1 and systems.count("Be helpful.") == len(records) - 1
    assert "你好，请介绍一下北京。" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")  # not ASCII-escaped


def test_table_sources_need_their_columns(fixtures_dir, tmp_path):
    options = ConvertOptions(source="csv", user_col="question", assistant_col="answer", system_col="persona")
    for name in ("table.csv", "table.tsv", "table_gb18030.csv", "table.parquet"):
        summary = convert_files([fixtures_dir / "raw" / name], tmp_path / "out.json", options=options)
        assert (summary.read, summary.written) == (4, 4)
    from minicpm_data.errors import FormatError

    with pytest.raises(FormatError, match=r"table.csv: missing column 'Q'"):
        convert_files([fixtures_dir / "raw" / "table.csv"], tmp_path / "out.json",
                      options=ConvertOptions(source="csv", user_col="Q", assistant_col="answer"))


def test_inputs_are_checked_before_any_work(fixtures_dir, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match="data: is a directory; name the files in it"):
        convert_files([fixtures_dir / "raw" / "alpaca.json", tmp_path / "data"], tmp_path / "out.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_output_may_not_overwrite_an_input(fixtures_dir, tmp_path):
    source = tmp_path / "data.json"
    source.write_bytes((fixtures_dir / "raw" / "alpaca.json").read_bytes())
    with pytest.raises(InputError, match="the output is also an input"):
        convert_files([source], source)
    with pytest.raises(InputError, match="the rejects file is also an input"):
        convert_files([source], tmp_path / "out.json", rejects_path=source)
    assert source.read_bytes() == (fixtures_dir / "raw" / "alpaca.json").read_bytes()


def test_a_failed_run_leaves_no_output(fixtures_dir, tmp_path):
    with pytest.raises(InputError, match="broken.json:3"):
        convert_files([fixtures_dir / "raw" / "alpaca.json", fixtures_dir / "raw" / "broken.json"],
                      tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []


def test_output_format_by_extension_or_flag(fixtures_dir, tmp_path):
    convert_files([fixtures_dir / "raw" / "alpaca.json"], tmp_path / "out.data", fmt="jsonl")
    lines = (tmp_path / "out.data").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and all(json.loads(line)["messages"] for line in lines)
    with pytest.raises(InputError, match="cannot tell the output format"):
        convert_files([fixtures_dir / "raw" / "alpaca.json"], tmp_path / "out.txt")


def test_worker_processes_give_the_same_files(fixtures_dir, tmp_path, monkeypatch):
    import minicpm_data.convert

    monkeypatch.setattr(minicpm_data.convert, "_BATCH_BYTES", 10_000)  # many batches, several in flight
    source = tmp_path / "many.jsonl"
    lines = (fixtures_dir / "raw" / "messages.jsonl").read_text(encoding="utf-8")
    source.write_text(lines * 400, encoding="utf-8")  # 2,400 records: several batches
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.jsonl"
        summary = convert_files([source], out, options=ConvertOptions(workers=workers, dedupe=True))
        runs[workers] = (summary.to_dict() | {"output": None, "rejects_file": None},
                         out.read_bytes(), (tmp_path / f"out{workers}.rejects.jsonl").read_bytes())
    assert runs[1] == runs[2]
    assert runs[2][0]["written"] == 3 and runs[2][0]["rejects"]["duplicate"] == 2400 - 3 - 800


def test_worker_processes_report_broken_lines(tmp_path):
    source = tmp_path / "broken.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    source.write_text(f"{good}\n" * 3000 + "{broken\n", encoding="utf-8")
    with pytest.raises(InputError, match="broken.jsonl:3001: invalid JSON"):
        convert_files([source], tmp_path / "out.jsonl", options=ConvertOptions(workers=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl"]


def test_progress_reports_detection_then_counts(fixtures_dir, tmp_path, monkeypatch):
    import minicpm_data.convert

    monkeypatch.setattr(minicpm_data.convert, "PROGRESS_EVERY", 4)
    calls = []
    convert_files([fixtures_dir / "raw" / "alpaca.json"], tmp_path / "out.json",
                  progress=lambda item: calls.append((item.format, item.detected, item.read)))
    assert calls == [("alpaca", True, 0), ("alpaca", True, 4), ("alpaca", True, 8)]


def test_all_rejected_writes_no_output_but_the_rejects(fixtures_dir, tmp_path):
    source = tmp_path / "unlabelled.jsonl"
    lines = (fixtures_dir / "raw" / "ocnli.json").read_text("utf-8").splitlines(True)
    source.write_text("".join(line for line in lines if json.loads(line).get("label") not in LABELS), encoding="utf-8")
    (tmp_path / "out.json").write_text("an earlier run's output\n")
    summary = convert_files([source], tmp_path / "out.json")
    assert (summary.read, summary.written, summary.output) == (3, 0, None)
    assert (tmp_path / "out.json").read_text() == "an earlier run's output\n"  # left as it was, not replaced by []
    assert len(_rejects(tmp_path / "out.rejects.jsonl")) == 3
    (tmp_path / "out.json").unlink()
    (tmp_path / "empty.jsonl").write_text("\n")
    summary = convert_files([tmp_path / "empty.jsonl"], tmp_path / "out.json")
    assert (summary.read, summary.output) == (0, None) and not (tmp_path / "out.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "out.rejects.jsonl", "unlabelled.jsonl"]


def test_messages_whitespace_passes_verbatim_even_without_repair(tmp_path):
    records = [{"messages": [{"role": "user", "content": f"question {i}\n"}, {"role": "assistant", "content": " a"}]}
               for i in range(3)]
    source = tmp_path / "chatml.json"
    source.write_text(json.dumps(records, ensure_ascii=False, indent=4), encoding="utf-8")
    for options in (ConvertOptions(source="messages"), ConvertOptions(source="messages", repair=False)):
        summary = convert_files([source], tmp_path / "out.json", options=options)
        assert summary.written == 3 and not summary.repairs
        assert json.loads((tmp_path / "out.json").read_text(encoding="utf-8")) == records


def test_header_only_table_still_checks_its_columns(tmp_path):
    (tmp_path / "header.csv").write_text("question,answer\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"header.csv: missing column 'Q' \(columns: question, answer\)"):
        convert_files([tmp_path / "header.csv"], tmp_path / "out.json",
                      options=ConvertOptions(source="csv", user_col="Q", assistant_col="answer"))
    summary = convert_files([tmp_path / "header.csv"], tmp_path / "out.json",
                            options=ConvertOptions(source="csv", user_col="question", assistant_col="answer"))
    assert (summary.read, summary.output) == (0, None)


def test_template_rows_with_an_empty_placeholder_are_rejected(tmp_path):
    (tmp_path / "t.csv").write_text("n,q,a\n2,two?,yes\n,none?,no\n", encoding="utf-8")
    summary = convert_files([tmp_path / "t.csv"], tmp_path / "out.jsonl",
                            options=ConvertOptions(template="N={n}: {q}", assistant_col="a"))
    [reject] = _rejects(tmp_path / "out.rejects.jsonl")
    assert (summary.written, reject["line"], reject["reason"]) == (1, 3, "missing field")
    assert json.loads((tmp_path / "out.jsonl").read_text())["messages"][0]["content"] == "N=2: two?"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_cut_off_last_line_names_its_line(tmp_path, workers):
    source = tmp_path / "cut.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    source.write_text(f"{good}\n{good}\n{good[:30]}\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"cut.jsonl:3: invalid JSON: unexpected end of data"):
        convert_files([source], tmp_path / "out.jsonl", options=ConvertOptions(workers=workers))


@pytest.mark.parametrize("workers", [1, 2])
def test_late_gbk_jsonl_converts_alike_in_workers(tmp_path, workers):
    lines = [json.dumps({"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]})
             for i in range(3000)]
    lines.append(json.dumps({"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "好"}]},
                            ensure_ascii=False))
    source = tmp_path / "late.jsonl"
    source.write_bytes(("\n".join(lines) + "\n").encode("gbk"))
    summary = convert_files([source], tmp_path / "out.jsonl", options=ConvertOptions(workers=workers))
    last = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()[-1]
    assert summary.written == 3001 and json.loads(last)["messages"][0]["content"] == "你好"


def test_json_key_mapping_checks_the_keys_and_needs_no_from(fixtures_dir, tmp_path):
    qa = fixtures_dir / "raw" / "qa.json"
    summary = convert_files([qa], tmp_path / "out.jsonl", options=ConvertOptions(user_col="question",
                                                                                 assistant_col="answer"))
    assert (summary.files[0].format, summary.read, summary.written) == ("csv", 5, 3)
    assert summary.rejects == {"missing field": 1, "prompt without answer": 1}
    with pytest.raises(FormatError, match=r"qa.json: missing key 'questio' \(keys: question, answer, topic\)"):
        convert_files([qa], tmp_path / "bad.jsonl", options=ConvertOptions(user_col="questio", assistant_col="answer"))
    with pytest.raises(InputError, match="do not apply to --from sharegpt"):
        convert_files([qa], tmp_path / "bad.jsonl", options=ConvertOptions(source="sharegpt", user_col="question",
                                                                           assistant_col="answer"))


def test_reasoning_policies_count_and_keep_every_record(fixtures_dir, tmp_path):
    source = fixtures_dir / "raw" / "openai_parts.jsonl"
    counts = {}
    for policy in ("reject", "drop", "think"):
        summary = convert_files([source], tmp_path / f"{policy}.jsonl", options=ConvertOptions(reasoning=policy))
        assert summary.read == summary.written + summary.rejected == 7
        counts[policy] = (summary.rejects.get("reasoning", 0), summary.repairs.get("drop reasoning", 0),
                          summary.repairs.get("reasoning into <think>", 0))
    assert counts == {"reject": (1, 0, 0), "drop": (0, 1, 0), "think": (0, 0, 1)}
    with pytest.raises(InputError, match="unknown reasoning policy 'keep'"):
        convert_files([source], tmp_path / "x.jsonl", options=ConvertOptions(reasoning="keep"))


def test_parquet_prompt_completion_and_weighted_messages(tmp_path):
    """Hub datasets come as Parquet: part structs and turns carry every key, null where unused."""
    import polars as pl

    conversational = tmp_path / "trl.parquet"
    pl.DataFrame({"prompt": [[{"role": "user", "content": "What color is the sky?"}]],
                  "completion": [[{"role": "assistant", "content": "It is blue."}]]}).write_parquet(conversational)
    weighted = tmp_path / "weighted.parquet"
    turns = [{"role": "user", "content": [{"type": "text", "text": "Hi", "value": None}], "train": None, "weight": None},
             {"role": "assistant", "content": [{"type": "text", "text": None, "value": "Hello"}], "train": None,
              "weight": 0},
             {"role": "user", "content": [{"type": "text", "text": "Bye", "value": None}], "train": None, "weight": None},
             {"role": "assistant", "content": [{"type": "text", "text": "Bye!", "value": None}], "train": None,
              "weight": 1}]
    pl.DataFrame({"messages": [turns]}).write_parquet(weighted)
    summary = convert_files([conversational, weighted], tmp_path / "out.jsonl")
    assert [f.format for f in summary.files] == ["prompt-completion", "messages"]
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()] == [
        {"messages": [{"role": "user", "content": "What color is the sky?"},
                      {"role": "assistant", "content": "It is blue."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "train": False},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]}]
