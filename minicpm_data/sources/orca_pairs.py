"""Orca-style pairs (Intel/orca_dpo_pairs): ``system``, ``question``, ``chosen``, ``rejected``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import Message, PreferencePair
from minicpm_data.sources.base import field, optional_text, text
from minicpm_data.sources.preference import PairSource, answer, has_side, sides


class OrcaPairs(PairSource):
    """A question with an optional system prompt and two answer strings::

        {"system": "You are an AI assistant.", "question": "Is 9 prime?", "chosen": "No: 9 = 3 x 3.", "rejected": "Yes."}
        -> {"messages": [{"role": "system", "content": "You are an AI assistant."},
                         {"role": "user", "content": "Is 9 prime?"}],
            "chosen": {"role": "assistant", "content": "No: 9 = 3 x 3."},
            "rejected": {"role": "assistant", "content": "Yes."}}
    """

    name = "orca-pairs"

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return "question" in record and has_side(record)

    def convert(self, record: Mapping[str, Any]) -> PreferencePair:
        chosen, rejected = sides(record)
        system = optional_text(record, "system")
        context = [Message("system", system)] if system else []
        context.append(Message("user", text(field(record, "question"), "question")))
        return PreferencePair(context, answer(chosen, "chosen"), answer(rejected, "rejected"))
