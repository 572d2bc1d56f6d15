"""TRL's unpaired preference datasets (KTO): ``prompt``, ``completion`` and a boolean ``label``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import LabeledConversation
from minicpm_data.sources.preference import LabeledSource, kto_label
from minicpm_data.sources.prompt_completion import PromptCompletion


class TRLKTO(LabeledSource):
    """A prompt, its completion and whether the completion is desirable, as strings or message lists (TRL's
    standard and conversational forms; the turns are read as
    :class:`~minicpm_data.sources.prompt_completion.PromptCompletion` reads them)::

        {"prompt": "The sky is", "completion": " green.", "label": false}
        -> {"messages": [{"role": "user", "content": "The sky is"}, {"role": "assistant", "content": "green."}],
            "label": false}
    """

    name = "trl-kto"
    reads_preference_keys = frozenset({"label"})

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return "prompt" in record and "completion" in record and "label" in record

    def convert(self, record: Mapping[str, Any]) -> LabeledConversation:
        label = kto_label(record, "label")
        turns = PromptCompletion().conversation(record)
        return LabeledConversation(turns.messages, label=label)
