"""``prompt``/``completion`` records: TRL's prompt-completion datasets and OpenAI's legacy fine-tuning files."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import Conversation, Message
from minicpm_data.sources.base import RecordRejected, Source, field, optional_text, text
from minicpm_data.sources.messages import chat_messages


class PromptCompletion(Source):
    """A prompt and its completion, as strings (optional top-level ``system``) or, in TRL's conversational
    form, as message lists: ``prompt`` the conversation so far, ``completion`` the assistant's answer::

        {"prompt": "The sky is", "completion": " blue."}
        -> {"messages": [{"role": "user", "content": "The sky is"}, {"role": "assistant", "content": "blue."}]}
        {"prompt": [{"role": "user", "content": "What color is the sky?"}],
         "completion": [{"role": "assistant", "content": "It is blue."}]}
        -> {"messages": [{"role": "user", "content": "What color is the sky?"},
                         {"role": "assistant", "content": "It is blue."}]}

    A boolean ``label`` (TRL's unpaired preference data) keeps the record when true; false marks a
    completion to avoid, rejected as ``undesirable completion``.
    """

    name = "prompt-completion"
    reads_preference_keys = frozenset({"label"})  # true: kept; false: rejected (auto reads a labelled file as trl-kto)

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return "prompt" in record and "completion" in record

    def convert(self, record: Mapping[str, Any]) -> Conversation:
        if record.get("label") is False:
            raise RecordRejected("undesirable completion", "label is false: a completion to avoid, not to learn")
        return self.conversation(record)

    def conversation(self, record: Mapping[str, Any]) -> Conversation:
        """The prompt's turns and the completion's, whatever the label."""
        prompt, completion = field(record, "prompt"), field(record, "completion")
        system = optional_text(record, "system")
        messages = [Message("system", system)] if system else []
        if isinstance(prompt, list) and isinstance(completion, list):
            answer = chat_messages(completion, "completion message")
            if not answer or any(m.role in ("user", "system") for m in answer):
                raise RecordRejected("malformed field", "completion must hold the assistant's turn(s)")
            return Conversation(messages + chat_messages(prompt, "prompt message") + answer)
        if isinstance(prompt, list) or isinstance(completion, list):
            raise RecordRejected("malformed field", "prompt and completion must both be strings or both message lists")
        return Conversation(messages + [Message("user", text(prompt, "prompt")),
                                        Message("assistant", text(completion, "completion"))])
