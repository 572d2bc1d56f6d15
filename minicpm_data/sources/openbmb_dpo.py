"""The data of OpenBMB's own DPO trainer (MiniCPM ``finetune/sft_dpo_trainer``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import Message
from minicpm_data.sources.alpaca import history_messages
from minicpm_data.sources.alpaca_pairs import AlpacaPairs
from minicpm_data.sources.base import field, optional_text, text


class OpenBMBDPO(AlpacaPairs):
    """A JSON list of ``instruction``, optional ``input``, ``chosen``, ``rejected`` and ``history`` (``[question,
    answer]`` pairs), as ``finetune_dpo_trainer.py``'s ``DPODataset`` reads it: the user turn is
    ``instruction + "\\n" + input`` whenever ``input`` is not empty (no "noinput" filtering, no system turn)::

        {"instruction": "写一句广告语", "input": "类型#上衣*材质#牛仔布", "chosen": "经典牛仔，百搭有型。", "rejected": "衣服。",
         "history": [["你好", "你好！"]]}
        -> {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                         {"role": "user", "content": "写一句广告语\\n类型#上衣*材质#牛仔布"}],
            "chosen": {"role": "assistant", "content": "经典牛仔，百搭有型。"},
            "rejected": {"role": "assistant", "content": "衣服。"}}

    The same keys as LLaMA-Factory's Alpaca ranking form, so ``auto`` reads such a file as ``alpaca-pairs``;
    ``--from openbmb-dpo`` joins the input exactly as OpenBMB's trainer does.
    """

    name = "openbmb-dpo"

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return False  # chosen explicitly: its keys are alpaca-pairs'

    def context(self, record: Mapping[str, Any]) -> list:
        prompt = text(field(record, "instruction"), "instruction")
        extra = optional_text(record, "input")
        return [*history_messages(record.get("history")), Message("user", f"{prompt}\n{extra}" if extra else prompt)]
