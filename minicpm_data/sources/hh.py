"""Anthropic HH-RLHF transcripts: ``chosen`` and ``rejected`` as ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` text."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import Message, PreferencePair
from minicpm_data.sources.base import RecordRejected, text
from minicpm_data.sources.preference import SHAPE_KEYS, PairSource, implicit_pair, sides

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class AnthropicHH(PairSource):
    """Two transcripts that share every turn before the final ``Assistant:`` answer::

        {"chosen": "\\n\\nHuman: What is 2+2?\\n\\nAssistant: 4.",
         "rejected": "\\n\\nHuman: What is 2+2?\\n\\nAssistant: Probably 5."}
        -> {"messages": [{"role": "user", "content": "What is 2+2?"}],
            "chosen": {"role": "assistant", "content": "4."},
            "rejected": {"role": "assistant", "content": "Probably 5."}}

    Text before the first ``Human:`` is rejected (``malformed field``), never dropped; a transcript that ends
    with an empty ``Assistant:`` has an ``empty answer``.
    """

    name = "hh"

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return "prompt" not in record and not any(key in record for key in SHAPE_KEYS) and is_transcript(record)

    def convert(self, record: Mapping[str, Any]) -> PreferencePair:
        chosen, rejected = sides(record)
        return implicit_pair(transcript(text(chosen, "chosen"), "chosen"), transcript(text(rejected, "rejected"), "rejected"))


def is_transcript(record: Mapping[str, Any]) -> bool:
    """Whether a record's ``chosen`` (or ``rejected``) is text with HH's Human/Assistant turn markers."""
    value = record.get("chosen", record.get("rejected"))
    return isinstance(value, str) and "\n\nHuman:" in value and "\n\nAssistant:" in value


def transcript(value: str, side: str) -> list[Message]:
    """The turns of an HH transcript (``\\n\\nHuman:`` / ``\\n\\nAssistant:`` markers)."""
    pieces = _TURN.split(value)
    if pieces[0].strip():
        raise RecordRejected("malformed field", f"{side} has text before its first Human: turn")
    if len(pieces) == 1:
        raise RecordRejected("malformed field", f"{side} has no Human:/Assistant: turns")
    messages = [Message(_ROLES[role], content) for role, content in zip(pieces[1::2], pieces[2::2])]
    if messages[-1].role == "assistant" and not messages[-1].content.strip():
        raise RecordRejected("empty answer", f"{side} ends with an empty Assistant: turn")
    return messages
