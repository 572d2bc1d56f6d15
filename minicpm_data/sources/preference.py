"""What the preference sources share: their base classes, and how answers and implicit prompts are read.

A pair source's ``convert`` returns a :class:`PreferencePair` (the context, then the chosen and the
rejected answer); a KTO source's returns a :class:`LabeledConversation`. Convert then repairs them as it
repairs conversations (:func:`minicpm_data.repair.finished_pair`), so a pair's two sides always share one
context, and writes ``docs/preference-data.md``'s target formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from minicpm_data.conversation import LabeledConversation, Message, PreferencePair
from minicpm_data.sources.base import TOOL_ROLE, RecordRejected, Source, chat_message, text
from minicpm_data.sources.messages import chat_messages

SIDES = ("chosen", "rejected")
# Keys that tell the pair shapes apart (a record with one of them belongs to the source that reads it).
SHAPE_KEYS = ("conversations", "conversation", "messages", "instruction", "query", "question", "score_chosen",
              "score_rejected", "chosen_messages", "rejected_messages")


class PairSource(Source):
    """A source of preference pairs."""

    kind: ClassVar[str] = "pairs"

    def convert(self, record: Mapping[str, Any]) -> PreferencePair:
        raise NotImplementedError


class LabeledSource(Source):
    """A source of KTO rows: conversations whose final answer is labelled desirable or undesirable."""

    kind: ClassVar[str] = "kto"

    def convert(self, record: Mapping[str, Any]) -> LabeledConversation:
        raise NotImplementedError


def has_side(record: Mapping[str, Any]) -> bool:
    return "chosen" in record or "rejected" in record


def sides(record: Mapping[str, Any], keys: tuple[str, str] = SIDES) -> tuple[Any, Any]:
    """The chosen and rejected values under ``keys``; a record without one is rejected (``side missing``)."""
    missing = [key for key in keys if record.get(key) is None]
    if missing:
        raise RecordRejected("side missing", f"no {' and no '.join(map(repr, missing))}")
    return record[keys[0]], record[keys[1]]


def answer(value: Any, side: str) -> Message:
    """An answer given as text, as one turn object (``{"from", "value"}`` or ``{"role", "content"}``), or as a
    list holding one assistant turn (TRL's conversational form)."""
    if isinstance(value, list):
        turns = chat_messages(value, f"{side} message")
        if len(turns) != 1:
            raise RecordRejected("malformed field", f"{side} holds {len(turns)} turns; an answer is one assistant turn")
        return _assistant(turns[0], side)
    if isinstance(value, Mapping):
        if "from" in value or "value" in value:
            return _assistant(chat_message(value, value.get("from"), value.get("value"), side), side)
        return _assistant(chat_message(value, value.get("role"), value.get("content"), side), side)
    return Message("assistant", text(value, side))


def _assistant(message: Message, side: str) -> Message:
    if message.role == TOOL_ROLE:
        raise RecordRejected("tool turn", f"{side} calls a tool")
    if message.role != "assistant":
        raise RecordRejected("malformed field", f"{side} is a {message.role} turn, not the assistant's answer")
    return message


def implicit_pair(chosen: list[Message], rejected: list[Message]) -> PreferencePair:
    """A pair from two whole conversations that share everything before their final assistant turn (TRL's
    implicit prompt, LLaMA-Factory v1, UltraFeedback, HH transcripts)."""
    for side, turns in zip(SIDES, (chosen, rejected)):
        if not turns:
            raise RecordRejected("side missing", f"{side} has no turns")
        _assistant(turns[-1], f"{side}'s last turn")
    context, other = chosen[:-1], rejected[:-1]
    if [(m.role, m.content) for m in context] != [(m.role, m.content) for m in other]:
        where = next((i for i, (a, b) in enumerate(zip(context, other)) if (a.role, a.content) != (b.role, b.content)),
                     min(len(context), len(other)))
        raise RecordRejected("prompts differ", f"chosen and rejected differ at turn {where}, before their final answers")
    return PreferencePair(context, chosen[-1], rejected[-1])


def kto_label(record: Mapping[str, Any], *keys: str) -> bool:
    """The boolean label under the first of ``keys`` present (LLaMA-Factory ``kto_tag``/``label``, TRL ``label``)."""
    key = next((key for key in keys if key in record), None)
    if key is None:
        raise RecordRejected("missing field", " or ".join(map(repr, keys)))
    if type(record[key]) is not bool:
        raise RecordRejected("malformed field", f"{key} is {record[key]!r}, not true or false")
    return record[key]
