"""validate: three kinds of target file (messages, pairs, kto), told apart by keys, one kind per file."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from minicpm_data.conversation import LabeledConversation, PreferencePair
from minicpm_data.errors import FormatError, InputError
from minicpm_data.io import read_examples
from minicpm_data.validate import (SCHEMA_DIR, _fits_kto, _fits_pair, _record_validator, file_kind, record_kind,
                                   require_valid, validate_file)

USER, ANSWER = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
PAIR = {"messages": [{"role": "system", "content": "s"}, USER], "chosen": ANSWER,
        "rejected": {"role": "assistant", "content": "b"}}
KTO = {"messages": [USER, ANSWER], "label": False}
MESSAGES = {"messages": [USER, ANSWER]}


def _write(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return path


def test_schemas_are_valid_2020_12_and_accept_their_records():
    for name, record in (("pairs", PAIR), ("kto", KTO)):
        schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
        Draft202012Validator.check_schema(schema)
        assert _record_validator(name).is_valid(record)
        assert not _record_validator(name).is_valid(MESSAGES)


@pytest.mark.parametrize("record, kind", [(PAIR, "pairs"), (KTO, "kto"), (MESSAGES, "messages"),
                                          ({"messages": [USER], "rejected": ANSWER}, "pairs"), ([1], "messages")])
def test_kind_by_keys(record, kind):
    assert record_kind(record) == kind


@pytest.mark.parametrize("kind, record", [("pairs", PAIR), ("kto", KTO), ("messages", MESSAGES)])
def test_a_valid_file_of_each_kind_reads_back_as_its_type(tmp_path, kind, record):
    path = _write(tmp_path / f"{kind}.jsonl", [record, record])
    assert file_kind(path) == kind and validate_file(path) == []
    require_valid(path, kind)
    require_valid(path, None)
    items = [item for _, item in read_examples(path, kind)]
    assert [item.to_record() for item in items] == [record, record]
    if kind == "pairs":
        assert isinstance(items[0], PreferencePair)
    if kind == "kto":
        assert isinstance(items[0], LabeledConversation) and items[0].label is False


BAD_PAIRS = [
    ({**PAIR, "messages": [USER, ANSWER]}, "/messages/1", "must end with a user turn"),
    ({**PAIR, "messages": []}, "/messages", "at least the user turn"),
    ({**PAIR, "rejected": ANSWER}, "/rejected/content", "the same answer as chosen"),
    ({**PAIR, "chosen": {"role": "user", "content": "a"}}, "/chosen/role", "an answer's role is assistant"),
    ({**PAIR, "chosen": {"role": "assistant", "content": " "}}, "/chosen/content", "empty or only whitespace"),
    ({**PAIR, "chosen": {"role": "assistant", "content": "a", "train": True}}, "/chosen", "Additional properties"),
    ({k: v for k, v in PAIR.items() if k != "chosen"}, "", "'chosen' is a required property"),
    ({**PAIR, "chosen": "a"}, "/chosen", "is not of type 'object'"),
    ({**PAIR, "label": True}, "/label", "a pair has no label"),
    ({**PAIR, "messages": [{**USER, "train": False}]}, "/messages/0", "no train key here"),
]
BAD_KTO = [
    ({**KTO, "label": "yes"}, "/label", "is not of type 'boolean'"),
    ({**KTO, "label": None}, "/label", "is not of type 'boolean'"),
    ({**KTO, "messages": [USER]}, "/messages", "at least a user turn and an assistant turn"),
    ({**KTO, "messages": [ANSWER, USER]}, "/messages/0", "turn is assistant, expected user"),
    ({**KTO, "messages": [USER, {**ANSWER, "train": True}]}, "/messages/1", "no train key here"),
]


@pytest.mark.parametrize("record, pointer, message", BAD_PAIRS + BAD_KTO)
def test_each_rule_of_pairs_and_kto(tmp_path, record, pointer, message):
    good = PAIR if record_kind(record) == "pairs" else KTO
    path = _write(tmp_path / "data.jsonl", [good, record])
    problems = validate_file(path)
    assert problems and {p.index for p in problems} == {1}
    assert any(p.pointer == pointer and message in p.message for p in problems), problems


@pytest.mark.parametrize("found, expected, stage", [("pairs", "messages", "--stage dpo"), ("kto", "messages", "--stage kto"),
                                                    ("messages", "pairs", "--stage sft"), ("kto", "pairs", "--stage kto")])
def test_a_file_of_another_kind_is_one_line_naming_the_stage(tmp_path, found, expected, stage):
    record = {"pairs": PAIR, "kto": KTO, "messages": MESSAGES}[found]
    path = _write(tmp_path / "data.jsonl", [record] * 3)
    with pytest.raises(FormatError) as error:
        require_valid(path, expected)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: holds ") and f"train it with {stage}" in message


def test_a_mixed_file_names_each_record_of_another_kind(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [PAIR, KTO, PAIR, MESSAGES])
    problems = validate_file(path)
    assert [(p.index, p.line) for p in problems] == [(1, 2), (3, 4)]
    assert all("a file holds one kind of record" in p.message for p in problems)
    assert "holds KTO rows" in problems[0].message and "first record holds preference pairs" in problems[0].message


def test_file_kind_of_an_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(InputError, match="no records"):
        file_kind(tmp_path / "empty.json")


def test_fast_paths_agree_with_the_schemas():
    contents = ["a", " ", "", 3, None]
    pairs = [PAIR, {}, [], {"messages": [], "chosen": ANSWER, "rejected": ANSWER}, {**PAIR, "id": 3}]
    pairs += [{**PAIR, side: {"role": role, "content": content}} for side in ("chosen", "rejected")
              for role in ("assistant", "user", None) for content in contents]
    pairs += [{**PAIR, "messages": [{"role": role, "content": content}]} for role in ("user", "bot") for content in contents]
    pairs += [{**PAIR, "messages": [{**USER, "train": False}]}, {**PAIR, "chosen": {**ANSWER, "x": 1}},
              {**PAIR, "messages": "x"}, {**PAIR, "messages": [USER, "x"]}]
    for record in pairs:
        assert _fits_pair(record) == _record_validator("pairs").is_valid(record), record
    rows = [KTO, {}, [], "x", {**KTO, "label": 1}, {**KTO, "label": None}, {**KTO, "messages": [USER]}, {**KTO, "id": 1},
            {**KTO, "messages": [USER, {**ANSWER, "train": True}]}, {**KTO, "messages": [USER, {**ANSWER, "content": " "}]},
            {**KTO, "messages": [USER, {"role": "bot", "content": "a"}]}, {**KTO, "messages": [USER, 3]}]
    for record in rows:
        assert _fits_kto(record) == _record_validator("kto").is_valid(record), record
