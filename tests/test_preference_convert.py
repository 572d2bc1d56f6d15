"""convert on preference data: every published shape, detected by keys, into pairs or KTO rows; hostile records
end as counted rejects, never as silently dropped preference keys."""

from __future__ import annotations

import json

import pytest
from test_data_cli import run_cli

from minicpm_data.convert import ConvertOptions, convert_files
from minicpm_data.errors import FormatError
from minicpm_data.sources import SOURCES, detect_format, make_source
from minicpm_data.validate import file_kind, validate_file


def _records(fixtures_dir, name):
    path = fixtures_dir / "raw" / name
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]


def _pair(context, chosen, rejected):
    return {"messages": [{"role": role, "content": content} for role, content in context],
            "chosen": {"role": "assistant", "content": chosen}, "rejected": {"role": "assistant", "content": rejected}}


def _convert(tmp_path, fixtures_dir, name, **options):
    out = tmp_path / f"{name}.out.jsonl"
    summary = convert_files([fixtures_dir / "raw" / name], out, options=ConvertOptions(**options))
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if summary.output else []
    rejects_file = tmp_path / f"{name}.out.rejects.jsonl"  # written only when a record was rejected
    rejects = [json.loads(line) for line in rejects_file.read_text().splitlines()] if rejects_file.is_file() else []
    assert rejects_file.is_file() == bool(summary.rejected)
    assert summary.read == summary.written + summary.rejected == len(written) + len(rejects)
    if summary.output:
        assert validate_file(out) == []
    return summary, written, {r["index"]: (r["reason"], r["detail"]) for r in rejects}


@pytest.mark.parametrize("name, source, kind", [
    ("dpo_sharegpt.json", "sharegpt-pairs", "pairs"), ("alpaca_pairs.json", "alpaca-pairs", "pairs"),
    ("hh.jsonl", "hh", "pairs"), ("ultrafeedback.jsonl", "ultrafeedback", "pairs"),
    ("trl_preference.jsonl", "trl-preference", "pairs"), ("llamafactory_v1_dpo.jsonl", "llamafactory-v1-dpo", "pairs"),
    ("orca_pairs.jsonl", "orca-pairs", "pairs"), ("kto.json", "llamafactory-kto", "kto"),
    ("kto_alpaca.json", "llamafactory-kto", "kto"), ("trl_kto.jsonl", "trl-kto", "kto"),
])
def test_each_shape_is_detected_and_written_as_its_kind(tmp_path, fixtures_dir, name, source, kind):
    assert detect_format(_records(fixtures_dir, name), name) == source
    summary, written, _ = _convert(tmp_path, fixtures_dir, name)
    assert summary.kind == SOURCES[source].kind == kind and summary.written
    assert file_kind(summary.output) == kind


def test_sharegpt_pairs_and_their_hostile_records(tmp_path, fixtures_dir):
    _, written, rejects = _convert(tmp_path, fixtures_dir, "dpo_sharegpt.json")
    assert written[0] == _pair([("user", "What is the capital of France?")], "Paris.", "Lyon.")
    assert written[1] == _pair([("system", "You are a concise assistant."), ("user", "Hi"),
                                ("assistant", "Hello! How can I help?"), ("user", "2+2?")], "4", "22")
    assert written[2]["chosen"]["content"] == "长城是中国古代修建的军事防御工程，绵延万余里。"
    assert written[3] == _pair([("user", "One token?")], "A", "B")  # 1-token answers are fine to convert
    assert {index: reason for index, (reason, _) in rejects.items()} == {
        3: "side missing", 4: "empty answer", 5: "identical answers", 6: "no prompt", 7: "not text",
        8: "malformed field", 9: "tool turn", 10: "unknown role", 11: "malformed field", 13: "not an object"}
    assert rejects[3][1] == "no 'rejected'" and rejects[11][1] == "chosen is a user turn, not the assistant's answer"


def test_implicit_prompts_split_where_the_sides_part(tmp_path, fixtures_dir):
    _, written, rejects = _convert(tmp_path, fixtures_dir, "trl_preference.jsonl")
    sky = _pair([("user", "What color is the sky?")], "It is blue.", "It is green.")
    assert written == [_pair([("user", "The sky is")], "blue.", "green."), sky, sky,
                       _pair([("user", "The sky is")], "blue.", "green.")]
    assert rejects[4] == ("prompts differ", "chosen and rejected differ at turn 0, before their final answers")
    assert rejects[5][0] == "no prompt" and rejects[6][0] == "malformed field" and rejects[7][0] == "not text"
    _, written, rejects = _convert(tmp_path, fixtures_dir, "hh.jsonl")
    assert written[1] == _pair([("user", "Hi there"), ("assistant", "Hello! How can I help?"),
                                ("user", "Tell me a fact about owls.")],
                               "Owls can turn their heads about 270 degrees.", "Owls are fish.")
    assert [rejects[i][0] for i in (2, 3, 4, 5)] == ["prompts differ", "empty answer", "malformed field", "side missing"]


def test_alpaca_forms_openbmb_and_v1(tmp_path, fixtures_dir):
    _, written, rejects = _convert(tmp_path, fixtures_dir, "alpaca_pairs.json")
    assert written[1] == _pair([("user", "Translate to French\nGood night")], "Bonne nuit", "Bonjour")  # output: [c, r]
    assert written[3] == _pair([("system", "Be brief."), ("user", "Empty input")], "A", "B")
    assert rejects == {3: ("side missing", "no 'rejected'")}
    # OpenBMB's own trainer joins instruction and input as they are, and has no system turn.
    _, written, _ = _convert(tmp_path, fixtures_dir, "alpaca_pairs.json", source="openbmb-dpo")
    assert written[2]["messages"][-1]["content"] == "写一句广告语\n类型#上衣*材质#牛仔布"
    assert written[3] == _pair([("user", "Empty input\n<noinput>")], "A", "B")
    _, written, rejects = _convert(tmp_path, fixtures_dir, "llamafactory_v1_dpo.jsonl")
    assert written[1] == _pair([("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")],
                               "Goodbye, take care!", "Whatever.")
    assert rejects[2][0] == "not text: image" and rejects[3][0] == "malformed field"


def test_scores_orca_and_kto(tmp_path, fixtures_dir):
    _, written, rejects = _convert(tmp_path, fixtures_dir, "ultrafeedback.jsonl")
    assert written == [_pair([("user", "Name a prime number.")], "7 is prime.", "8 is prime.")]
    assert rejects[1] == ("scores tie", "score_chosen 5.0 is not above score_rejected 5.0")
    _, written, rejects = _convert(tmp_path, fixtures_dir, "orca_pairs.jsonl")
    assert written[0]["messages"][0] == {"role": "system", "content": "You are an AI assistant."}
    assert rejects == {2: ("no prompt", "the context does not end with a user turn")}
    _, written, rejects = _convert(tmp_path, fixtures_dir, "kto.json")
    assert written[0] == {"messages": [{"role": "user", "content": "Which is the best summary? (A) World (B) Sports"},
                                       {"role": "assistant", "content": "Ooh ooh ah ah! B! Sports!"}], "label": False}
    assert [w["label"] for w in written] == [False, True]
    assert rejects[2][0] == "side missing" and rejects[3][0] == "empty answer"
    _, written, rejects = _convert(tmp_path, fixtures_dir, "kto_alpaca.json")
    assert written[1] == {"messages": [{"role": "user", "content": "Translate to French\nGood night"},
                                       {"role": "assistant", "content": "Bonjour"}], "label": False}
    assert rejects == {2: ("malformed field", "kto_tag is 'yes', not true or false")}
    _, written, _ = _convert(tmp_path, fixtures_dir, "trl_kto.jsonl")
    assert [w["label"] for w in written] == [False, True, False]


def test_an_sft_source_never_drops_preference_keys(tmp_path, fixtures_dir):
    """Explicit --from sharegpt on LLaMA-Factory ranking data: every pair rejected, naming the source that reads it."""
    summary, written, rejects = _convert(tmp_path, fixtures_dir, "dpo_sharegpt.json", source="sharegpt")
    assert not written and summary.rejects["preference record"] == 13
    assert rejects[0] == ("preference record", "has chosen, rejected, which --from sharegpt would drop; "
                                               "convert it with --from sharegpt-pairs")
    summary, _, rejects = _convert(tmp_path, fixtures_dir, "kto.json", source="messages")
    assert set(reason for reason, _ in rejects.values()) == {"preference record"}
    assert rejects[0][1].endswith("convert it with --from llamafactory-kto")


def test_detection_never_takes_preference_data_as_sft():
    lf_dpo = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
              "rejected": {"from": "gpt", "value": "b"}}
    lf_kto = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True}
    assert detect_format([lf_dpo], "x") == "sharegpt-pairs" and detect_format([lf_kto], "x") == "llamafactory-kto"
    assert detect_format([{"prompt": "q", "completion": "a", "label": False}], "x") == "trl-kto"
    assert detect_format([{"prompt": "q", "completion": "a"}], "x") == "prompt-completion"
    assert detect_format([{"instruction": "q", "output": ["a", "b"]}], "x") == "alpaca-pairs"
    with pytest.raises(FormatError, match="fits sharegpt-pairs and alpaca-pairs; choose one with --from"):
        detect_format([{**lf_dpo, "instruction": "q"}], "x")
    with pytest.raises(FormatError, match="different formats: sharegpt-pairs \\(record 0\\), llamafactory-kto \\(record 1\\)"):
        detect_format([lf_dpo, lf_kto], "x")
    assert make_source("openbmb-dpo").matches(lf_dpo) is False  # chosen by name only: its keys are alpaca-pairs'


def test_one_output_holds_one_kind(tmp_path, fixtures_dir):
    with pytest.raises(FormatError, match="its alpaca records become SFT conversations .* the inputs before it "
                                          "preference pairs .*convert them separately"):
        convert_files([fixtures_dir / "raw" / "dpo_sharegpt.json", fixtures_dir / "raw" / "alpaca.json"],
                      tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
    summary = convert_files([fixtures_dir / "raw" / "dpo_sharegpt.json", fixtures_dir / "raw" / "alpaca_pairs.json"],
                            tmp_path / "both.json")
    assert summary.kind == "pairs" and summary.written == 8


def test_convert_split_and_validate_pairs_through_the_cli(capsys, tmp_path, fixtures_dir):
    code, out, err = run_cli(capsys, "convert", str(fixtures_dir / "raw" / "dpo_sharegpt.json"), "-o", str(tmp_path / "p"),
                             "--dev-ratio", "0.25", "--seed", "1")
    assert code == 0 and "detected format sharegpt-pairs" in err and "holds: preference pairs (chosen/rejected)" in out
    train, dev = (json.loads((tmp_path / "p" / f"{part}.json").read_text()) for part in ("train", "dev"))
    assert len(train) + len(dev) == 4 and all(set(r) == {"messages", "chosen", "rejected"} for r in train + dev)
    code, out, err = run_cli(capsys, "validate", str(tmp_path / "p" / "train.json"), str(tmp_path / "p" / "dev.json"))
    assert code == 0 and "preference pairs" in out
    # A split keeps each pair whole: split the pairs file again and compare records.
    code, _, _ = run_cli(capsys, "split", str(tmp_path / "p" / "train.json"), "-o", str(tmp_path / "again"),
                         "--dev-ratio", "0.5")
    again = [json.loads((tmp_path / "again" / f"{part}.json").read_text()) for part in ("train", "dev")]
    assert code == 0 and sorted(map(json.dumps, again[0] + again[1])) == sorted(map(json.dumps, train))


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}}, "side missing: 1"),
    ({"chosen": [[["nested"]]], "rejected": {"deep": {"er": [1, 2]}}}, "malformed field: 1"),
    ({"prompt": 3, "chosen": None, "rejected": []}, "side missing: 1"),
])
def test_hostile_files_end_in_one_error_line(capsys, tmp_path, record, message):
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps([record]))
    code, out, err = run_cli(capsys, "convert", str(path), "-o", str(tmp_path / "out.json"))
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: no records written: all 1 rejected (" + message)


HOSTILE_TARGETS = [  # pairs/KTO files written by hand: a mismatched context, nested garbage, wrong types, mixed kinds
    [_pair([("user", "q")], "a", "b"), {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
                                        "chosen": {"role": "assistant", "content": "a"}, "rejected": {"role": "assistant", "content": "b"}}],
    [_pair([("user", "q")], "a", "b"), {"messages": [{"role": "user", "content": {"nested": ["garbage"]}}],
                                        "chosen": [[["a"]]], "rejected": {"role": "assistant", "content": 7}}],
    [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": "true"}],
    [_pair([("user", "q")], "a", "b"), {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
]


@pytest.mark.parametrize("records", HOSTILE_TARGETS)
def test_hostile_target_files_are_problems_or_one_error_line(capsys, tmp_path, fixtures_dir, records):
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(records))
    code, out, err = run_cli(capsys, "validate", path)
    assert code == 1 and "problem" in out and not err
    for command in ("stats", "inspect"):
        code, out, err = run_cli(capsys, command, path, "-t", fixtures_dir / "tokenizers" / "chatml")
        assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert err.startswith("error: ") and "see all with: minicpm-data validate" in err
