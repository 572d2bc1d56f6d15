"""UltraFeedback-binarized rows (HuggingFaceH4/ultrafeedback_binarized and the many sets built like it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import PreferencePair
from minicpm_data.sources.base import RecordRejected
from minicpm_data.sources.messages import chat_messages
from minicpm_data.sources.preference import PairSource, implicit_pair, sides


class UltraFeedback(PairSource):
    """``chosen`` and ``rejected`` as whole conversations with their scores (``prompt``, ``prompt_id`` and
    ``messages`` are what ``chosen`` already holds)::

        {"prompt": "Name a prime.", "prompt_id": "7f3a",
         "chosen": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
         "rejected": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "8"}],
         "messages": [...], "score_chosen": 8.0, "score_rejected": 3.0}
        -> {"messages": [{"role": "user", "content": "Name a prime."}],
            "chosen": {"role": "assistant", "content": "7"}, "rejected": {"role": "assistant", "content": "8"}}

    A row whose ``score_chosen`` is not above ``score_rejected`` is rejected (``scores tie``): it prefers nothing.
    """

    name = "ultrafeedback"

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return "score_chosen" in record or "score_rejected" in record

    def convert(self, record: Mapping[str, Any]) -> PreferencePair:
        chosen, rejected = sides(record)
        better, worse = record.get("score_chosen"), record.get("score_rejected")
        if not all(isinstance(score, (int, float)) and not isinstance(score, bool) for score in (better, worse)):
            raise RecordRejected("malformed field", f"score_chosen {better!r} and score_rejected {worse!r} must be numbers")
        if better <= worse:
            raise RecordRejected("scores tie", f"score_chosen {better} is not above score_rejected {worse}")
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, list):
                raise RecordRejected("malformed field", f"{key} is {type(value).__name__}, not a list of messages")
        return implicit_pair(chat_messages(chosen, "chosen message"), chat_messages(rejected, "rejected message"))
