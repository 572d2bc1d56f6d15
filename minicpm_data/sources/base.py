"""What every source shares: the rejection error, its reasons, and text helpers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from minicpm_data.conversation import Conversation

# Role every source gives tool-calling turns; the pipeline applies the tool policy to it.
TOOL_ROLE = "tool"

# Every reason a record can be rejected for, with what it means (shown in the README and help).
REJECT_REASONS = {
    "not an object": "the record is not a JSON object (e.g. a bare string in the list)",
    "missing field": "a field the format needs is absent, or a --template column is empty (the detail names it)",
    "malformed field": "a field has the wrong shape, e.g. turns that are not a list of objects",
    "not text": "a text field holds a number, list, or non-text content part",
    "unknown role": "a turn's role is none of system/user/assistant or their known aliases",
    "tool turn": "the record has tool turns (function_call, observation, tool) and the policy is reject",
    "no label": "an OCNLI record without a label (the unlabelled test split)",
    "no consensus label": "an OCNLI record labelled '-': the annotators did not agree",
    "unknown label": "an OCNLI label other than entailment, neutral, contradiction",
    "needs repair": "with --no-repair: the record needs the repair named in the detail",
    "empty conversation": "no user/assistant exchange is left (after repairs)",
    "invalid turn order": "a system turn after the first turn, which no repair moves",
    "duplicate": "with --dedupe: the same conversation was already written (the detail says where)",
}


class RecordRejected(Exception):
    """A record that cannot become a conversation; ``reason`` is a key of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Source:
    """One raw format: ``convert(record) -> Conversation``; ``matches(record)`` drives auto-detection.

    Conversations a source returns may still need repairs (empty, same-role or misplaced turns);
    tool turns carry the role :data:`TOOL_ROLE`. ``verbatim`` sources produce text whose whitespace
    is meant (a fixed template's, or the target format's own), so the strip repair leaves it alone.
    """

    name: ClassVar[str]
    verbatim: ClassVar[bool] = False

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return False

    def check_columns(self, columns: list[str], path: str) -> None:
        """Raise :class:`~minicpm_data.errors.FormatError` when a table lacks a column the source needs."""

    def convert(self, record: Mapping[str, Any]) -> Conversation:
        raise NotImplementedError


def field(record: Mapping[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` present in ``record``; rejects when none is."""
    for name in names:
        if name in record:
            return record[name]
    raise RecordRejected("missing field", " or ".join(repr(name) for name in names))


def text(value: Any, where: str) -> str:
    """A text field: a string, or ``None`` (empty); anything else is rejected as ``not text``."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    raise RecordRejected("not text", f"{where} is {type(value).__name__}")


def content_text(value: Any, where: str) -> str:
    """A chat turn's content: like :func:`text`, or OpenAI-style content parts joined by newlines."""
    if isinstance(value, list):
        return "\n".join(_part_text(part, where) for part in value)
    return text(value, where)


def _part_text(part: Any, where: str) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
    raise RecordRejected("not text", f"{where} has a {kind} part")


def optional_text(record: Mapping[str, Any], name: str) -> str:
    """An optional text field: absent, null and empty all mean none (no repair counted)."""
    value = text(record.get(name), repr(name))
    return value if value.strip() else ""


ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    **dict.fromkeys(("function_call", "observation", "tool", "function", "tool_call", "tool_response"), TOOL_ROLE),
}


def role(name: Any) -> str:
    """The target role for a source's role name (case-insensitive); rejects unknown names."""
    try:
        return ROLE_ALIASES[name]
    except (KeyError, TypeError):  # not exactly a known name, or not hashable
        mapped = ROLE_ALIASES.get(name.strip().lower()) if isinstance(name, str) else None
    if mapped is None:
        raise RecordRejected("unknown role", repr(name))
    return mapped
