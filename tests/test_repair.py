"""Each repair, its counting, --no-repair rejection, the tool policy and the default system prompt."""

from __future__ import annotations

import pytest

from minicpm_data.conversation import Conversation, Message
from minicpm_data.repair import REPAIRS, finish
from minicpm_data.sources import RecordRejected


def _conv(*turns):
    return Conversation([Message(role, content) for role, content in turns])


def _turns(conversation):
    return [(m.role, m.content) for m in conversation.messages]


CASES = {
    "strip whitespace": ([("user", " q "), ("assistant", "a\n")], [("user", "q"), ("assistant", "a")]),
    "drop empty turns": ([("user", "q"), ("assistant", ""), ("assistant", "a")], [("user", "q"), ("assistant", "a")]),
    "merge same-role turns": ([("user", "q1"), ("user", "q2"), ("assistant", "a")],
                              [("user", "q1\nq2"), ("assistant", "a")]),
    "drop leading assistant turn": ([("system", "s"), ("assistant", "hi"), ("user", "q"), ("assistant", "a")],
                                    [("system", "s"), ("user", "q"), ("assistant", "a")]),
    "drop trailing user turn": ([("user", "q"), ("assistant", "a"), ("user", "more?")], [("user", "q"), ("assistant", "a")]),
    "drop tool turns": ([("user", "q"), ("assistant", "calling"), ("tool", "{}"), ("assistant", "done")],
                        [("user", "q"), ("assistant", "calling\ndone")]),
}


def test_every_repair_has_a_case():
    assert set(CASES) == set(REPAIRS)


@pytest.mark.parametrize("kind", list(CASES))
def test_repair_applies_and_is_counted(kind):
    before, after = CASES[kind]
    repaired, applied = finish(_conv(*before), tool_turns="drop")
    assert _turns(repaired) == after
    assert kind in applied


@pytest.mark.parametrize("kind", [k for k in CASES if k != "drop tool turns"])
def test_no_repair_rejects_naming_the_repair(kind):
    with pytest.raises(RecordRejected) as caught:
        finish(_conv(*CASES[kind][0]), repair=False)
    assert (caught.value.reason, caught.value.detail) == ("needs repair", kind)


def test_tool_turns_rejected_by_default():
    with pytest.raises(RecordRejected, match="tool turn"):
        finish(_conv(*CASES["drop tool turns"][0]))


def test_clean_conversation_needs_no_repair():
    clean = _conv(("system", "s"), ("user", "q"), ("assistant", "a"))
    assert finish(clean, repair=False) == (clean, [])


def test_verbatim_sources_keep_their_whitespace():
    templated = _conv(("user", "句子1: x\n句子2：y\n"), ("assistant", "neutral"))
    assert _turns(finish(templated, verbatim=True)[0]) == _turns(templated)


def test_default_system_only_where_missing():
    plain = finish(_conv(("user", "q"), ("assistant", "a")), default_system="Be nice.")[0]
    assert _turns(plain)[0] == ("system", "Be nice.")
    own = finish(_conv(("system", "Mine"), ("user", "q"), ("assistant", "a")), default_system="Be nice.")[0]
    assert [t for t in _turns(own) if t[0] == "system"] == [("system", "Mine")]


@pytest.mark.parametrize("turns, reason", [
    ([("user", "q"), ("assistant", "a"), ("system", "late"), ("user", "q"), ("assistant", "a")], "invalid turn order"),
    ([("user", " "), ("assistant", "")], "empty conversation"),
    ([("system", "only a system prompt")], "empty conversation"),
    ([], "empty conversation"),
])
def test_unrepairable_records_are_rejected(turns, reason):
    with pytest.raises(RecordRejected) as caught:
        finish(_conv(*turns))
    assert caught.value.reason == reason
