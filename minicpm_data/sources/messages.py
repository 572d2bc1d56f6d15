"""OpenAI-style ``{"messages": [...]}`` records (MiniCPM's own format, ms-swift ChatML)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import Conversation, Message
from minicpm_data.sources.base import RecordRejected, Source, chat_message, field


class Messages(Source):
    """Passes ``{"messages": [{"role", "content"}, ...]}`` through, normalised.

    Content given as a list of parts (OpenAI ``{"type": "text", "text"}``, LLaMA-Factory v1
    ``{"type": "text", "value"}``) is joined by newlines; reasoning parts and ``reasoning_content`` go to
    the reasoning policy; ``train``, ``loss_weight`` (LLaMA-Factory) and ``weight`` (axolotl) become the
    turn's ``train`` flag; ``developer`` becomes ``system``; ``tool`` turns and assistant turns that call
    tools get the tool role. This is already the target format, so contents keep their whitespace (it is
    what the model sees)::

        {"messages": [{"role": "user", "content": [{"type": "text", "value": "Hi"}], "loss_weight": 0.0},
                      {"role": "assistant", "content": [{"type": "text", "value": "Hello!"}], "loss_weight": 0.0},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}], "id": 7}
        -> {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "train": false},
                         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]}
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
        return Conversation(chat_messages(turns, "message"))


def chat_messages(turns: list[Any], what: str) -> list[Message]:
    """``{"role", "content"}`` objects as messages (``what`` names them in reject details)."""
    messages = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise RecordRejected("malformed field", f"{what} {position} is {type(turn).__name__}, not an object")
        messages.append(chat_message(turn, turn.get("role"), turn.get("content"), f"{what} {position}"))
    return messages
