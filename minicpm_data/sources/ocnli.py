"""CLUE OCNLI natural-language-inference records, converted exactly as MiniCPM's own sample."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import Conversation, Message
from minicpm_data.sources.base import RecordRejected, Source, field, text

LABELS = ("entailment", "neutral", "contradiction")
# MiniCPM's finetune/data/ocnli_public_chatml prompt, byte for byte: an ASCII colon and space after
# 句子1, a full-width colon after 句子2, and a trailing newline.
PROMPT = "请判断下边两个句子的关系属于 [entailment, neutral, contradiction]中的哪一种？\n句子1: {sentence1}\n句子2：{sentence2}\n"


class OCNLI(Source):
    """``sentence1``, ``sentence2``, ``label`` -> the prompt above and the label as the answer::

        {"sentence1": "身上裹一件工厂发的棉大衣,手插在袖筒里", "sentence2": "身上至少一件衣服", "label": "entailment", ...}
        -> {"messages": [{"role": "user", "content": "请判断下边两个句子的关系属于 [entailment, neutral, contradiction]中的哪一种？\\n句子1: 身上裹一件工厂发的棉大衣,手插在袖筒里\\n句子2：身上至少一件衣服\\n"},
                         {"role": "assistant", "content": "entailment"}]}

    Label ``-`` (no annotator consensus) and unlabelled records (the test split) are rejected.
    """

    name = "ocnli"
    verbatim = True

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return "sentence1" in record and "sentence2" in record

    def convert(self, record: Mapping[str, Any]) -> Conversation:
        sentence1 = text(field(record, "sentence1"), "sentence1")
        sentence2 = text(field(record, "sentence2"), "sentence2")
        label = record.get("label")
        if label is None or label == "":
            raise RecordRejected("no label", "OCNLI test records carry no label")
        if label == "-":
            raise RecordRejected("no consensus label", "label '-': the annotators did not agree")
        if label not in LABELS:
            raise RecordRejected("unknown label", repr(label))
        prompt = PROMPT.format(sentence1=sentence1, sentence2=sentence2)
        return Conversation([Message("user", prompt), Message("assistant", label)])
