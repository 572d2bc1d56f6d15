"""Each repair, its counting, --no-repair rejection, the tool, media and reasoning policies, train flags through
repairs, the default system prompt, and why a record with no exchange left is rejected."""

from __future__ import annotations

import pytest

from minicpm_data.conversation import Conversation, Message
from minicpm_data.repair import REPAIRS, finish
from minicpm_data.sources import RecordRejected


def _conv(*turns):
    """Turns as (role, content[, train[, reasoning]])."""
    return Conversation([Message(*turn) for turn in turns])


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
    "drop media": ([("user", "<image>\nWho is he?"), ("assistant", "A cat."), ("user", "Look: <video><audio> here"),
                    ("assistant", "A dog.<image>")],
                   [("user", "Who is he?"), ("assistant", "A cat."), ("user", "Look: here"), ("assistant", "A dog.")]),
}


# Reasoning policy -> (turns before, turns after) for the repairs the policy counts.
REASONING_CASES = {
    "drop reasoning": ("drop", [("user", "q"), ("assistant", "a", None, "because")], [("user", "q"), ("assistant", "a")]),
    "reasoning into <think>": ("think", [("user", "q"), ("assistant", "\n\nThe answer.", None, "\n step 1\nstep 2 ")],
                               [("user", "q"), ("assistant", "<think>\nstep 1\nstep 2\n</think>\n\nThe answer.")]),
}


def test_every_repair_has_a_case():
    assert set(CASES) | set(REASONING_CASES) == set(REPAIRS)


@pytest.mark.parametrize("kind", list(REASONING_CASES))
def test_reasoning_policy_applies_and_is_counted_even_without_repairs(kind):
    policy, before, after = REASONING_CASES[kind]
    repaired, applied = finish(_conv(*before), reasoning=policy, repair=False)
    assert (_turns(repaired), applied) == (after, [kind])


def test_reasoning_rejected_by_default_and_only_on_assistant_turns():
    with pytest.raises(RecordRejected) as caught:
        finish(_conv(("user", "q"), ("assistant", "a", None, "why")))
    assert (caught.value.reason, caught.value.detail) == ("reasoning", "turn 1 carries reasoning; choose --reasoning "
                                                                       "drop or think")
    with pytest.raises(RecordRejected, match="^malformed field: turn 0 is a user turn with reasoning$"):
        finish(_conv(("user", "q", None, "why"), ("assistant", "a")), reasoning="think")


def test_train_flags_survive_repairs():
    kept, _ = finish(_conv(("user", " q "), ("assistant", " a ", False), ("user", "q2"), ("assistant", "b", True)))
    assert [m.train for m in kept.messages] == [None, False, None, True]
    assert kept.to_record()["messages"][1] == {"role": "assistant", "content": "a", "train": False}
    merged, _ = finish(_conv(("user", "q"), ("assistant", "a", True), ("assistant", "b", False)))
    assert [(m.content, m.train) for m in merged.messages] == [("q", None), ("a\nb", False)]
    merged, _ = finish(_conv(("user", "q"), ("assistant", "a", True), ("assistant", "b")))
    assert merged.messages[1].train is True


@pytest.mark.parametrize("kind", list(CASES))
def test_repair_applies_and_is_counted(kind):
    before, after = CASES[kind]
    repaired, applied = finish(_conv(*before), tool_turns="drop", media="drop")
    assert _turns(repaired) == after
    assert kind in applied


@pytest.mark.parametrize("kind", [k for k in CASES if k not in ("drop tool turns", "drop media")])  # policies
def test_no_repair_rejects_naming_the_repair(kind):
    with pytest.raises(RecordRejected) as caught:
        finish(_conv(*CASES[kind][0]), repair=False)
    assert (caught.value.reason, caught.value.detail) == ("needs repair", kind)


def test_tool_turns_rejected_by_default():
    with pytest.raises(RecordRejected, match="tool turn"):
        finish(_conv(*CASES["drop tool turns"][0]))


def test_media_rejected_by_default_naming_where_it_is():
    with pytest.raises(RecordRejected) as caught:
        finish(_conv(*CASES["drop media"][0]))
    assert (caught.value.reason, caught.value.detail) == (
        "not text: image", "<image> in turn 0; <video><audio> in turn 2; <image> in turn 3; --media drop keeps the "
                           "text without them")


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


@pytest.mark.parametrize("turns, reason, detail", [
    ([("user", "q"), ("assistant", "a"), ("system", "late"), ("user", "q"), ("assistant", "a")], "invalid turn order",
     "system turn at position 2; only the first turn may be system"),
    ([("assistant", "a"), ("user", "q")], "invalid turn order", "every assistant turn comes before the first user turn"),
    ([("user", " "), ("assistant", "")], "empty conversation", "every turn is empty"),
    ([("system", "only a system prompt")], "empty conversation", "only a system turn"),
    ([], "empty conversation", "no messages"),
    ([("user", "q")], "prompt without answer", "no assistant turn answers the user turn"),
    ([("system", "s"), ("user", "q")], "prompt without answer", "no assistant turn answers the user turn"),
    ([("user", "q"), ("assistant", " ")], "prompt without answer", "the assistant turn is empty"),
    ([("assistant", "a")], "answer without prompt", "no user turn comes before the assistant turn"),
    ([("user", ""), ("assistant", "a")], "answer without prompt", "the user turn is empty"),
])
def test_unrepairable_records_are_rejected(turns, reason, detail):
    with pytest.raises(RecordRejected) as caught:
        finish(_conv(*turns))
    assert (caught.value.reason, caught.value.detail) == (reason, detail)
