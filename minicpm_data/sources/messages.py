"""OpenAI-style ``{"messages": [...]}`` records (MiniCPM's own format, ms-swift ChatML)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import Conversation, Message
from minicpm_data.sources.base import TOOL_ROLE, RecordRejected, Source, content_text, field, role


class Messages(Source):
    """Passes ``{"messages": [{"role", "content"}, ...]}`` through, normalised.

    Content given as a list of parts is joined by newlines; ``developer`` becomes ``system``;
    ``tool`` turns and assistant turns that only call tools get the tool role. This is already the
    target format, so contents keep their whitespace (it is what the model sees)::

        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                      {"role": "assistant", "content": "Hello!"}], "id": 7}
        -> {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    """

    name = "messages"
    verbatim = True

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        turns = record.get("messages")
        return isinstance(turns, list) and all(isinstance(t, Mapping) and "role" in t for t in turns)

    def convert(self, record: Mapping[str, Any]) -> Conversation:
        turns = field(record, "messages")
        if not isinstance(turns, list):
            raise RecordRejected("malformed field", f"messages is {type(turns).__name__}, not a list")
        messages = []
        for position, turn in enumerate(turns):
            if not isinstance(turn, Mapping):
                raise RecordRejected("malformed field", f"message {position} is {type(turn).__name__}, not an object")
            target = TOOL_ROLE if turn.get("tool_calls") or turn.get("function_call") else role(turn.get("role"))
            messages.append(Message(target, content_text(turn.get("content"), f"message {position}")))
        return Conversation(messages)
