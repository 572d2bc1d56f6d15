"""Repairs: small, explicit fixes applied to a converted conversation, each counted by kind.

Applied in this order; with ``repair=False`` a record that needs any of them is rejected instead
(reason ``needs repair``, the detail names the repair):

- ``strip whitespace``: trim each turn's text (skipped for verbatim sources: ocnli's template, messages);
- ``drop empty turns``: remove turns whose text is empty after stripping;
- ``merge same-role turns``: join consecutive turns of one role with a newline;
- ``drop leading assistant turn``: the first non-system turn must be the user's;
- ``drop trailing user turn``: a conversation must end with the answer.

Tool turns are handled first by the tool policy: ``reject`` (default; reason ``tool turn``) or
``drop`` (counted as the repair ``drop tool turns``).
"""

from __future__ import annotations

from collections.abc import Callable

from minicpm_data.conversation import Conversation, Message
from minicpm_data.sources.base import TOOL_ROLE, RecordRejected
from minicpm_data.validate import turn_problems

TOOL_POLICIES = ("reject", "drop")
REPAIRS = ("drop tool turns", "strip whitespace", "drop empty turns", "merge same-role turns",
           "drop leading assistant turn", "drop trailing user turn")

Messages = list[Message]


# Each step returns the repaired turns, or None when it has nothing to repair.


def _strip(messages: Messages) -> Messages | None:
    stripped = [m if (text := m.content.strip()) == m.content else Message(m.role, text) for m in messages]
    return stripped if any(new is not old for new, old in zip(stripped, messages)) else None


def _drop_empty(messages: Messages) -> Messages | None:
    kept = [m for m in messages if m.content.strip()]
    return kept if len(kept) < len(messages) else None


def _merge_same_role(messages: Messages) -> Messages | None:
    if all(a.role != b.role for a, b in zip(messages, messages[1:])):
        return None
    merged: Messages = []
    for message in messages:
        if merged and merged[-1].role == message.role:
            merged[-1] = Message(message.role, f"{merged[-1].content}\n{message.content}")
        else:
            merged.append(message)
    return merged


def _drop_leading_assistant(messages: Messages) -> Messages | None:
    start = 1 if messages and messages[0].role == "system" else 0
    if len(messages) > start and messages[start].role == "assistant":
        return messages[:start] + messages[start + 1:]
    return None


def _drop_trailing_user(messages: Messages) -> Messages | None:
    return messages[:-1] if messages and messages[-1].role == "user" else None


def _drop_tools(messages: Messages) -> Messages:
    return [m for m in messages if m.role != TOOL_ROLE]


_STEPS: tuple[tuple[str, Callable[[Messages], Messages | None]], ...] = (
    ("strip whitespace", _strip),
    ("drop empty turns", _drop_empty),
    ("merge same-role turns", _merge_same_role),
    ("drop leading assistant turn", _drop_leading_assistant),
    ("drop trailing user turn", _drop_trailing_user),
)


def _already_valid(messages: Messages, verbatim: bool) -> bool:
    """One cheap pass: True when no repair applies and the turn order is valid (the common case)."""
    if not messages:
        return False
    start = 1 if messages[0].role == "system" else 0
    expected = "user"
    for position, message in enumerate(messages):
        content = message.content
        if not content or content[0].isspace() or content[-1].isspace():
            if not verbatim or not content.strip():
                return False
        if position >= start:
            if message.role != expected:
                return False
            expected = "assistant" if expected == "user" else "user"
    return expected == "user" and len(messages) > start


def finish(conversation: Conversation, *, repair: bool = True, tool_turns: str = "reject",
           verbatim: bool = False, default_system: str | None = None) -> tuple[Conversation, list[str]]:
    """Apply the tool policy and repairs, add ``default_system`` where there is none, check turn order.

    Returns the finished conversation and the repairs applied; raises :class:`RecordRejected`.
    """
    messages = conversation.messages
    if _already_valid(messages, verbatim) and (not default_system or messages[0].role == "system"):
        return conversation, []
    applied: list[str] = []
    if any(m.role == TOOL_ROLE for m in messages):
        if tool_turns == "reject":
            raise RecordRejected("tool turn", "has tool turns (function_call / observation / tool)")
        messages = _drop_tools(messages)
        applied.append("drop tool turns")
    for kind, step in _STEPS:
        if verbatim and kind == "strip whitespace":
            continue
        repaired = step(messages)
        if repaired is not None:
            if not repair:
                raise RecordRejected("needs repair", kind)
            applied.append(kind)
            messages = repaired
    if default_system and not (messages and messages[0].role == "system"):
        messages = [Message("system", default_system), *messages]
    problems = turn_problems([m.role for m in messages])
    if problems:
        reason = "invalid turn order" if any(m.role == "system" for m in messages[1:]) else "empty conversation"
        raise RecordRejected(reason, problems[0][1])
    return Conversation(messages), applied
