"""validate: the JSON Schema plus turn-order rules; problems name file, record, line and pointer."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from minicpm_data.errors import FormatError
from minicpm_data.validate import SCHEMA_PATH, Problem, load_schema, require_valid, validate_file

GOOD = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                     {"role": "assistant", "content": "a"}]}


def _msgs(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


BAD = [
    (_msgs(("user", "q"), ("assistant", "  ")), "/messages/1/content", "content is empty or only whitespace"),
    (_msgs(("user", "q"), ("bot", "a")), "/messages/1/role", "'bot' is not one of"),
    (_msgs(("user", "q")), "/messages", "at least a user turn and an assistant turn"),
    (_msgs(("assistant", "a"), ("user", "q"), ("assistant", "a")), "/messages/0", "turn is assistant, expected user"),
    (_msgs(("user", "q"), ("assistant", "a"), ("user", "q")), "/messages/2", "must end with an assistant turn"),
    (_msgs(("user", "q"), ("system", "s"), ("assistant", "a")), "/messages/1", "only the first turn may be system"),
    (_msgs(("user", "q"), ("user", "q"), ("assistant", "a")), "/messages/1", "turn is user, expected assistant"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "/messages/0/content",
     "3 is not of type 'string'"),
    ({"conversations": []}, "", "'messages' is a required property"),
]


def test_schema_is_valid_2020_12_and_in_the_repository(repo_root):
    assert SCHEMA_PATH == repo_root / "schemas" / "messages.schema.json"
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert Draft202012Validator(schema).is_valid([GOOD])


def test_all_problems_of_a_record_are_reported(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_msgs(("assistant", "hi"), ("user", " ")), _msgs(("user", "q"), ("system", "s"),
                                                                               ("assistant", "a"))]))
    assert [(p.index, p.pointer) for p in validate_file(path)] == [
        (0, "/0/messages/1/content"), (0, "/0/messages/0"), (0, "/0/messages/1"), (1, "/1/messages/1")]


def test_valid_file_has_no_problems(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps([GOOD, GOOD]))
    assert validate_file(path) == []


@pytest.mark.parametrize("record, pointer, message", BAD)
def test_each_rule_in_a_json_list(tmp_path, record, pointer, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, record]))
    problems = validate_file(path)
    assert problems and all(p.index == 1 and p.line is None for p in problems)
    assert any(p.pointer == "/1" + pointer and message in p.message for p in problems), problems


@pytest.mark.parametrize("record, pointer, message", BAD[:3])
def test_jsonl_problems_carry_the_line(tmp_path, record, pointer, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (GOOD, GOOD, record)) + "\n")
    problems = validate_file(path)
    assert problems and {(p.index, p.line) for p in problems} == {(2, 3)}
    problem = next(p for p in problems if p.pointer == pointer and message in p.message)
    assert str(problem).startswith(f"{path}:3 record 2 at {pointer}:")


@pytest.mark.parametrize("name, content, message", [
    ("broken.json", '[{"messages": ]', "invalid JSON"),
    ("object.json", json.dumps(GOOD, indent=2), "top level is a single object"),
    ("data.csv", "a,b\n", "not a .json or .jsonl file"),
])
def test_unreadable_files_are_problems_not_crashes(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    problems = validate_file(path)
    assert len(problems) == 1 and message in problems[0].message
    assert isinstance(problems[0], Problem)


@pytest.mark.parametrize("name, content, message", [
    ("zero.json", "", "file is empty"),
    ("blank.jsonl", " \n\n\t\n", "file is empty"),
    ("empty.json", "[ ]\n", "no records: the list is empty"),
])
def test_files_without_records_are_problems(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    assert validate_file(path) == [Problem(str(path), None, None, "", message)]


def test_a_directory_is_a_problem(tmp_path):
    assert [p.message for p in validate_file(tmp_path)] == ["is a directory; name the files in it"]


def test_fast_path_agrees_with_the_schema():
    from minicpm_data.validate import _fits_schema, _record_validator

    contents = ["a", " ", "", "\n", " x ", 3, None, ["a"]]
    roles = ["user", "assistant", "system", "bot", 1]
    records = [GOOD, [], "x", {}, {"messages": "x"}, {"messages": []}, {"messages": [GOOD["messages"][0]]}]
    records += [{"messages": [{"role": r, "content": c}, {"role": "assistant", "content": "a"}]}
                for r in roles for c in contents]
    records += [{"messages": [{"role": "user", "content": "q", "extra": 1}, {"role": "assistant", "content": "a"}]},
                {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, {**GOOD, "id": 1}]
    records += [{"messages": [{"role": "user", "content": "q", **user}, {"role": "assistant", "content": "a", **answer}]}
                for user in ({}, {"train": False}, {"train": True})
                for answer in ({}, {"train": False}, {"train": True}, {"train": 0}, {"train": None}, {"weight": 0})]
    for record in records:
        assert _fits_schema(record) == _record_validator().is_valid(record), record


def test_require_valid_says_how_many_where_the_first_and_how_to_see_all(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (GOOD, _msgs(("user", "q"), ("bot", "a")),
                                                        _msgs(("assistant", "a"), ("user", "q"), ("assistant", "a"))))
                    + "\n")
    with pytest.raises(FormatError) as caught:
        require_valid(path)
    assert str(caught.value) == (
        f"{path}: 2 problem(s) in record(s) 1, 2; first: {path}:2 record 1 at /messages/1/role: 'bot' is not one of "
        f"['system', 'user', 'assistant']; see all with: minicpm-data validate {path}")
    path.write_text(json.dumps(GOOD) + "\n")
    require_valid(path)


@pytest.mark.parametrize("content, message", [("", "file is empty"), ('[{"messages": ]', ":1: invalid JSON")])
def test_require_valid_names_a_whole_file_problem_alone(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(FormatError, match=rf"^{path}{message}" if message.startswith(":") else rf"^{path}: {message}$"):
        require_valid(path)


def test_train_flags_only_on_assistant_turns(tmp_path):
    path = tmp_path / "flags.jsonl"
    records = [_msgs(("user", "q"), ("assistant", "a")), _msgs(("user", "q"), ("assistant", "a"))]
    records[0]["messages"][1]["train"] = False
    records[1]["messages"][0]["train"] = False
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [(p.index, p.pointer, p.message) for p in validate_file(path)] == [
        (1, "/messages/0", "train is only for assistant turns (user and system turns are never trained)")]
