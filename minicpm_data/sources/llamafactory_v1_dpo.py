"""LLaMA-Factory v1's DPO samples (``chosen_messages``/``rejected_messages``), as JSON Lines."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import PreferencePair
from minicpm_data.sources.base import RecordRejected
from minicpm_data.sources.messages import chat_messages
from minicpm_data.sources.preference import PairSource, implicit_pair, sides

KEYS = ("chosen_messages", "rejected_messages")


class LlamaFactoryV1DPO(PairSource):
    """Two whole conversations in LLaMA-Factory v1's message format (content part lists ``{"type": "text",
    "value"}``, a ``loss_weight`` per turn) that share everything before their final assistant turn::

        {"chosen_messages": [{"role": "user", "content": [{"type": "text", "value": "2+2?"}], "loss_weight": 0.0},
                             {"role": "assistant", "content": [{"type": "text", "value": "4"}], "loss_weight": 1.0}],
         "rejected_messages": [{"role": "user", "content": [{"type": "text", "value": "2+2?"}], "loss_weight": 0.0},
                               {"role": "assistant", "content": [{"type": "text", "value": "5"}], "loss_weight": 1.0}]}
        -> {"messages": [{"role": "user", "content": "2+2?"}],
            "chosen": {"role": "assistant", "content": "4"}, "rejected": {"role": "assistant", "content": "5"}}

    Weights are not kept: in a pair only the final answer is trained.
    """

    name = "llamafactory-v1-dpo"

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return any(key in record for key in KEYS)

    def convert(self, record: Mapping[str, Any]) -> PreferencePair:
        chosen, rejected = sides(record, KEYS)
        return implicit_pair(_turns(chosen, KEYS[0]), _turns(rejected, KEYS[1]))


def _turns(value: Any, key: str) -> list:
    if not isinstance(value, list):
        raise RecordRejected("malformed field", f"{key} is {type(value).__name__}, not a list of messages")
    return chat_messages(value, f"{key} message")
