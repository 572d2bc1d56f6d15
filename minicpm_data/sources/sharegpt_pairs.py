"""LLaMA-Factory's ranking data in ShareGPT form (``dpo_en_demo.json``, ``dpo_zh_demo.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import PreferencePair
from minicpm_data.sources.preference import PairSource, answer, has_side, sides
from minicpm_data.sources.sharegpt import TURN_KEYS, ShareGPT


class ShareGPTPairs(PairSource):
    """The context as ShareGPT turns (``conversations``, or ``messages`` with role/content tags), ending with the
    user turn, and ``chosen``/``rejected`` answer turns (LLaMA-Factory ``"ranking": true, "formatting": "sharegpt"``)::

        {"conversations": [{"from": "human", "value": "How can I best prepare for a job interview?"}],
         "chosen": {"from": "gpt", "value": "Research the company, ..."},
         "rejected": {"from": "gpt", "value": "Dress professionally."}}
        -> {"messages": [{"role": "user", "content": "How can I best prepare for a job interview?"}],
            "chosen": {"role": "assistant", "content": "Research the company, ..."},
            "rejected": {"role": "assistant", "content": "Dress professionally."}}

    A top-level ``system`` goes first, as in :class:`~minicpm_data.sources.sharegpt.ShareGPT`.
    """

    name = "sharegpt-pairs"

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return (has_side(record) and any(key in record for key in TURN_KEYS)
                and "prompt" not in record and "score_chosen" not in record and "score_rejected" not in record)

    def convert(self, record: Mapping[str, Any]) -> PreferencePair:
        chosen, rejected = sides(record)
        context = ShareGPT().convert(record).messages
        return PreferencePair(context, answer(chosen, "chosen"), answer(rejected, "rejected"))
