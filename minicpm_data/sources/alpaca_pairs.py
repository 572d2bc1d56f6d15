"""LLaMA-Factory's ranking data in Alpaca form: ``chosen``/``rejected`` strings, or ``output`` a two-element list."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import PreferencePair
from minicpm_data.sources.alpaca import alpaca_context, is_answer_pair
from minicpm_data.sources.base import RecordRejected
from minicpm_data.sources.preference import PairSource, answer, has_side, sides


class AlpacaPairs(PairSource):
    """``instruction`` (+ ``input``, ``system``, ``history``) and the two answers, as ``chosen``/``rejected``
    (LLaMA-Factory's current Alpaca ranking form) or ``output: [chosen, rejected]`` (its older
    ``comparison_gpt4`` form); the context is built as :class:`~minicpm_data.sources.alpaca.Alpaca` builds it::

        {"instruction": "Translate to French", "input": "Good morning", "output": ["Bonjour", "Bonsoir"]}
        -> {"messages": [{"role": "user", "content": "Translate to French\\nGood morning"}],
            "chosen": {"role": "assistant", "content": "Bonjour"},
            "rejected": {"role": "assistant", "content": "Bonsoir"}}
    """

    name = "alpaca-pairs"

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return ("instruction" in record or "query" in record) and (has_side(record) or is_answer_pair(record.get("output")))

    def convert(self, record: Mapping[str, Any]) -> PreferencePair:
        chosen, rejected = self.answers(record)
        return PreferencePair(self.context(record), answer(chosen, "chosen"), answer(rejected, "rejected"))

    def context(self, record: Mapping[str, Any]) -> list:
        return alpaca_context(record)

    @staticmethod
    def answers(record: Mapping[str, Any]) -> tuple[Any, Any]:
        output = record.get("output")
        if has_side(record) or output is None:
            return sides(record)
        if not is_answer_pair(output):
            raise RecordRejected("malformed field", "output must be [chosen, rejected], a list of two answers")
        return output[0], output[1]
