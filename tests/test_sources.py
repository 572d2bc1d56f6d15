"""Each source format: exact conversions, aliases, and auto-detection."""

from __future__ import annotations

import re

import pytest

from minicpm_data.errors import FormatError
from minicpm_data.io import iter_raw_records
from minicpm_data.repair import finish
from minicpm_data.sources import SOURCES, RecordRejected, detect_format, make_source
from minicpm_data.sources.ocnli import PROMPT


def _records(fixtures_dir, name):
    return [record.data for record in iter_raw_records(fixtures_dir / "raw" / name)]


def _turns(conversation):
    return [(m.role, m.content) for m in conversation.messages]


def _convert(source, record):
    conversation, _ = finish(source.convert(record), verbatim=source.verbatim)
    return _turns(conversation)


def test_sharegpt_turn_shapes_and_role_names(fixtures_dir):
    records, source = _records(fixtures_dir, "sharegpt.json"), make_source("sharegpt")
    assert _convert(source, records[0]) == [("user", "What is 2+2?"), ("assistant", "4")]
    # top-level system, `conversation` key, {human, assistant} pair items
    assert _convert(source, records[1]) == [("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello"),
                                            ("user", "Bye"), ("assistant", "Bye!")]
    # `messages` key with from/value, a system turn first, chatgpt
    assert _convert(source, records[2]) == [("system", "Be kind."), ("user", "Thanks"), ("assistant", "You're welcome")]
    # role/content turns, bot
    assert _convert(source, records[3]) == [("user", "Name a colour"), ("assistant", "Blue")]


@pytest.mark.parametrize("index, reason, detail", [
    (9, "tool turn", "tool turns"),
    (10, "unknown role", "'narrator'"),
    (11, "malformed field", "not a list"),
    (12, "not text", "turn 0 is int"),
    (13, "missing field", "'conversations' or 'conversation' or 'messages'"),
    (17, "malformed field", "none of from/value"),
])
def test_sharegpt_rejects(fixtures_dir, index, reason, detail):
    record = _records(fixtures_dir, "sharegpt.json")[index]
    with pytest.raises(RecordRejected) as caught:
        finish(make_source("sharegpt").convert(record))
    assert caught.value.reason == reason and detail in caught.value.detail


def test_alpaca_inputs_history_aliases(fixtures_dir):
    records, source = _records(fixtures_dir, "alpaca.json"), make_source("alpaca")
    assert _convert(source, records[0]) == [("user", "Translate to English\n你好"), ("assistant", "Hello")]
    assert _convert(source, records[1]) == [("user", "Tell a joke"), ("assistant", "Why did the chicken cross the road?")]
    assert _convert(source, records[2]) == [("user", "Give a tip"), ("assistant", "Sleep well.")]  # "<noinput>"
    assert _convert(source, records[3]) == [
        ("system", "You translate."), ("user", "Translate: hello"), ("assistant", "你好"),
        ("user", "To Spanish?"), ("assistant", "Hola"), ("user", "And in French?"), ("assistant", "Bonjour")]
    assert _convert(source, records[4]) == [("user", "What is AI?"), ("assistant", "Artificial intelligence.")]
    assert _convert(source, records[8]) == [("user", "Summarise\nThe text."), ("assistant", "Done.")]


@pytest.mark.parametrize("index, reason", [(5, "missing field"), (6, "malformed field"), (7, "not text")])
def test_alpaca_rejects(fixtures_dir, index, reason):
    with pytest.raises(RecordRejected) as caught:
        make_source("alpaca").convert(_records(fixtures_dir, "alpaca.json")[index])
    assert caught.value.reason == reason


def test_ocnli_prompt_is_minicpms_byte_for_byte(fixtures_dir):
    records, source = _records(fixtures_dir, "ocnli.json"), make_source("ocnli")
    assert _convert(source, records[0]) == [
        ("user", "请判断下边两个句子的关系属于 [entailment, neutral, contradiction]中的哪一种？\n句子1: 他在读书\n句子2：他在看书\n"),
        ("assistant", "entailment")]
    assert PROMPT.endswith("\n") and "句子1: " in PROMPT and "句子2：" in PROMPT


@pytest.mark.parametrize("index, reason", [(3, "no consensus label"), (4, "no label"), (5, "unknown label")])
def test_ocnli_rejects(fixtures_dir, index, reason):
    with pytest.raises(RecordRejected) as caught:
        make_source("ocnli").convert(_records(fixtures_dir, "ocnli.json")[index])
    assert caught.value.reason == reason


def test_messages_pass_through_normalised(fixtures_dir):
    records, source = _records(fixtures_dir, "messages.jsonl"), make_source("messages")
    assert _convert(source, records[0]) == [("system", "You are helpful."), ("user", "Hi"), ("assistant", "Hello!")]
    # developer -> system; content parts joined
    assert _convert(source, records[1]) == [("system", "Answer in one word."), ("user", "Capital of France?\nBe brief."),
                                            ("assistant", "Paris")]
    with pytest.raises(RecordRejected, match="tool turn"):
        finish(source.convert(records[2]))
    with pytest.raises(RecordRejected, match="^not text: image: message 0 has a image_url part; --media drop keeps the text$"):
        source.convert(records[3])


def test_messages_keep_their_whitespace_verbatim():
    """The target format already: contents are what the model sees, so only real repairs apply."""
    record = {"messages": [{"role": "user", "content": "  question\n"}, {"role": "assistant", "content": "\nanswer "}]}
    source = make_source("messages")
    conversation, repairs = finish(source.convert(record), repair=False, verbatim=source.verbatim)
    assert conversation.to_record() == record and repairs == []
    merged = {"messages": [*record["messages"], {"role": "assistant", "content": " more"}]}
    assert _convert(source, merged) == [("user", "  question\n"), ("assistant", "\nanswer \n more")]


@pytest.mark.parametrize("value", [None, "", "  "])
def test_table_template_placeholder_without_a_value_is_rejected(value):
    source = make_source("csv", template="N={n}: {question}", assistant_col="a")
    with pytest.raises(RecordRejected) as caught:
        source.convert({"n": value, "question": "q", "a": "A"})
    assert (caught.value.reason, caught.value.detail) == ("missing field", "'n' is empty (a --template placeholder)")
    assert _convert(source, {"n": 0, "question": "q", "a": "A"}) == [("user", "N=0: q"), ("assistant", "A")]


def test_table_columns_and_template(fixtures_dir):
    row = _records(fixtures_dir, "table.csv")[0]
    mapped = make_source("csv", user_col="question", assistant_col="answer", system_col="persona")
    assert _convert(mapped, row) == [("system", "You are a tea expert."), ("user", "What is tea?"),
                                     ("assistant", "A drink made from leaves.")]
    templated = make_source("csv", template="[{topic}] {question}", assistant_col="answer")
    assert _convert(templated, row) == [("user", "[drinks] What is tea?"), ("assistant", "A drink made from leaves.")]
    with pytest.raises(FormatError, match="missing column 'nope'"):
        make_source("csv", user_col="nope", assistant_col="answer").check_columns(list(row), "table.csv")
    with pytest.raises(FormatError, match="needs --assistant-col"):
        make_source("csv", user_col="question")


@pytest.mark.parametrize("template, message", [
    ("Q {", "--template 'Q {': Single '{' encountered"),
    ("{question} }", "Single '}' encountered"),
    ("{question!x}", "{question} has a conversion or format spec"),
    ("{question:>9}", "{question} has a conversion or format spec"),
    ("{}", "has an empty placeholder"),
    ("{ }", "has an empty placeholder"),
])
def test_table_template_must_hold_plain_column_placeholders(template, message):
    with pytest.raises(FormatError, match=re.escape(message)):
        make_source("csv", template=template, assistant_col="answer")


def test_table_template_placeholders_name_columns_verbatim():
    source = make_source("csv", template="{{{q.x}}} {q[0]} {0}", assistant_col="a")
    assert source.columns == ["a", "q.x", "q[0]", "0"]
    assert _convert(source, {"q.x": "dot", "q[0]": "index", "0": "zero", "a": "A"}) == [
        ("user", "{dot} index zero"), ("assistant", "A")]


@pytest.mark.parametrize("name, expected", [
    ("sharegpt.json", "sharegpt"), ("alpaca.json", "alpaca"), ("ocnli.json", "ocnli"),
    ("messages.jsonl", "messages"), ("sharegpt_gbk.jsonl", "sharegpt"), ("llamafactory_v1.jsonl", "messages"),
    ("openai_parts.jsonl", "messages"), ("prompt_completion.jsonl", "prompt-completion"),
])
def test_auto_detection(fixtures_dir, name, expected):
    assert detect_format(_records(fixtures_dir, name), name) == expected


def test_auto_detection_refuses_ambiguous_mixed_and_unknown():
    both = {"instruction": "q", "output": "a", "conversations": []}
    with pytest.raises(FormatError, match="fits sharegpt and alpaca"):
        detect_format([both], "x.json")
    with pytest.raises(FormatError, match="different formats"):
        detect_format([{"instruction": "q", "output": "a"}, {"conversations": []}], "x.json")
    with pytest.raises(FormatError, match=r"cannot detect the format from keys \['Q', 'A'\]"):
        detect_format([{"Q": "q", "A": "a"}], "x.csv")


def _messages(source, record, **policies):
    conversation, _ = finish(source.convert(record), verbatim=source.verbatim, **policies)
    return conversation.to_record()["messages"]


def test_llamafactory_v1_parts_weights_and_reasoning(fixtures_dir):
    records, source = _records(fixtures_dir, "llamafactory_v1.jsonl"), make_source("messages")
    assert _messages(source, records[0]) == [{"role": "system", "content": "You are a helpful assistant."},
                                             {"role": "user", "content": "What is 2+2?"},
                                             {"role": "assistant", "content": "4"}]
    # loss_weight 0.0 on an assistant turn: not trained; 1.0 leaves the choice to --train-on
    assert [m.get("train") for m in _messages(source, records[1])] == [None, False, None, None]
    assert _messages(source, records[2], reasoning="think")[1]["content"] == (
        "<think>\n17 has no divisor between 2 and 4.\n</think>\n\nYes, 17 is prime.")
    assert _messages(source, records[2], reasoning="drop")[1]["content"] == "Yes, 17 is prime."
    assert _messages(source, records[5])[0]["content"] == "Translate:\n你好"  # text parts join in order
    with pytest.raises(RecordRejected, match="^tool turn"):  # a tool_call part makes a tool turn
        finish(source.convert(records[6]))


@pytest.mark.parametrize("name, index, reason, detail", [
    ("llamafactory_v1.jsonl", 2, "reasoning", "turn 1 carries reasoning; choose --reasoning drop or think"),
    ("llamafactory_v1.jsonl", 3, "not text: image", "message 0 has a image_url part; --media drop keeps the text"),
    ("llamafactory_v1.jsonl", 4, "unsupported weight", "message 1 loss_weight is 0.5; only 0 (not trained) or 1 is supported"),
    ("openai_parts.jsonl", 0, "not text: audio", "message 0 has a input_audio part; --media drop keeps the text"),
    ("openai_parts.jsonl", 1, "not text: video", "message 0 has a video_url part; --media drop keeps the text"),
    ("openai_parts.jsonl", 2, "reasoning", "turn 1 carries reasoning; choose --reasoning drop or think"),
    ("openai_parts.jsonl", 5, "unsupported weight", "message 0 is a user turn marked as trained; only assistant turns are trained"),
    ("openai_parts.jsonl", 6, "unsupported weight", "message 1 train is 'no', not true or false"),
    ("prompt_completion.jsonl", 4, "malformed field", "prompt and completion must both be strings or both message lists"),
    ("prompt_completion.jsonl", 5, "malformed field", "completion must hold the assistant's turn(s)"),
])
def test_new_shapes_reject_with_their_reason(fixtures_dir, name, index, reason, detail):
    source = make_source(detect_format(_records(fixtures_dir, name), name))
    with pytest.raises(RecordRejected) as caught:
        finish(source.convert(_records(fixtures_dir, name)[index]))
    assert (caught.value.reason, caught.value.detail) == (reason, detail)


def test_openai_reasoning_content_refusal_and_axolotl_weight(fixtures_dir):
    records, source = _records(fixtures_dir, "openai_parts.jsonl"), make_source("messages")
    assert _messages(source, records[2], reasoning="think")[1]["content"] == (
        "<think>\nCompare the tenths: 9 > 1.\n</think>\n\n9.9 is larger.")
    assert _messages(source, records[3])[1]["content"] == "I can't help with that."
    assert [m.get("train") for m in _messages(source, records[4])] == [None, None, False, None, None]


def test_sharegpt_turns_take_weights_parts_and_reasoning():
    record = {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1", "weight": 0},
                                {"from": "human", "value": [{"type": "text", "text": "q2"}]},
                                {"from": "gpt", "value": "a2", "reasoning_content": "r"}]}
    assert _messages(make_source("sharegpt"), record, reasoning="think") == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "train": False},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\na2"}]


def test_target_format_train_flags_pass_through():
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": True},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "train": False}]}
    assert _messages(make_source("messages"), record) == record["messages"]


def test_prompt_completion_strings_system_and_conversational(fixtures_dir):
    records, source = _records(fixtures_dir, "prompt_completion.jsonl"), make_source("prompt-completion")
    assert _convert(source, records[0]) == [("user", "The sky is"), ("assistant", "blue.")]
    assert _convert(source, records[1]) == [("system", "Answer in French."), ("user", "Hello"), ("assistant", "Bonjour")]
    assert _convert(source, records[2]) == [("system", "Be brief."), ("user", "What color is the sky?"),
                                            ("assistant", "It is blue.")]
    # Labelled rows (TRL's unpaired preference data; auto reads them as trl-kto): true kept, false rejected.
    labelled = _records(fixtures_dir, "trl_kto.jsonl")
    assert _convert(source, labelled[1]) == [("user", "The sky is"), ("assistant", "blue.")]
    with pytest.raises(RecordRejected, match="^undesirable completion: label is false"):
        source.convert(labelled[0])


def test_json_records_map_keys_like_table_columns(fixtures_dir):
    records, source = _records(fixtures_dir, "qa.json"), make_source("csv", user_col="question", assistant_col="answer")
    assert [_convert(source, r) for r in records[:3]] == [
        [("user", "What is the boiling point of water?"), ("assistant", "100 °C at sea level.")],
        [("user", "2+2?"), ("assistant", "4")], [("user", "Capital of Japan?"), ("assistant", "Tokyo")]]
    with pytest.raises(RecordRejected, match="^missing field: 'answer'$"):
        source.convert(records[4])
    templated = make_source("csv", template="[{topic}] {question}", assistant_col="answer")
    assert _convert(templated, records[0])[0] == ("user", "[physics] What is the boiling point of water?")


def test_every_source_documents_input_and_output():
    for source in SOURCES.values():
        assert "->" in source.__doc__, source.__name__
