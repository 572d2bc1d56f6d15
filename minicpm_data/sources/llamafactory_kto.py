"""LLaMA-Factory's KTO data: a conversation (ShareGPT or Alpaca form) and a boolean ``label`` or ``kto_tag``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import LabeledConversation
from minicpm_data.sources.alpaca import Alpaca
from minicpm_data.sources.preference import LabeledSource, has_side, kto_label
from minicpm_data.sources.sharegpt import TURN_KEYS, ShareGPT


class LlamaFactoryKTO(LabeledSource):
    """LLaMA-Factory's ``kto_en_demo.json`` (``messages`` + ``label``, registered with ``"kto_tag": "label"``) and
    its documented Alpaca form (``instruction``, ``input``, ``output``, ``kto_tag``); the final answer is what the
    label judges::

        {"messages": [{"role": "user", "content": "Which is the best summary?"},
                      {"role": "assistant", "content": " Ooh ooh ah ah! ... D! Science/Tech!"}], "label": false}
        -> {"messages": [{"role": "user", "content": "Which is the best summary?"},
                         {"role": "assistant", "content": "Ooh ooh ah ah! ... D! Science/Tech!"}], "label": false}

    Turns are read as :class:`~minicpm_data.sources.sharegpt.ShareGPT` or
    :class:`~minicpm_data.sources.alpaca.Alpaca` read them.
    """

    name = "llamafactory-kto"
    reads_preference_keys = frozenset({"label", "kto_tag"})

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return (("kto_tag" in record or "label" in record) and not has_side(record)
                and any(key in record for key in (*TURN_KEYS, "instruction", "query")))

    def convert(self, record: Mapping[str, Any]) -> LabeledConversation:
        label = kto_label(record, "kto_tag", "label")
        source = ShareGPT if any(key in record for key in TURN_KEYS) else Alpaca
        return LabeledConversation(source().convert(record).messages, label=label)
