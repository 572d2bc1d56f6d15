"""ShareGPT-style conversations (FastChat, LLaMA-Factory, axolotl, ms-swift)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import Conversation, Message
from minicpm_data.sources.base import RecordRejected, Source, chat_message, field, optional_text, role, text

TURN_KEYS = ("conversations", "conversation", "messages")
_PAIR_KEYS = (("human", "user"), ("assistant", "gpt"))


class ShareGPT(Source):
    """Turn lists under ``conversations``, ``conversation`` or ``messages``.

    Turns are ``{"from", "value"}``, ``{"role", "content"}`` or ``{"human", "assistant"}`` pairs;
    roles human/user, gpt/assistant/bot/chatgpt, system; a top-level ``system`` goes first::

        {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"},
                                                  {"from": "gpt", "value": "Hello!"}]}
        -> {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

    Tool turns (function_call, observation, tool) keep the role ``tool`` for the tool policy. Contents
    may be part lists, and turns may carry reasoning and a training weight, as in :class:`Messages`.
    """

    name = "sharegpt"

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        if "conversations" in record or "conversation" in record:
            return True
        turns = record.get("messages")
        return isinstance(turns, list) and any(isinstance(t, Mapping) and "from" in t for t in turns)

    def convert(self, record: Mapping[str, Any]) -> Conversation:
        turns = field(record, *TURN_KEYS)
        if not isinstance(turns, list):
            raise RecordRejected("malformed field", f"turns are {type(turns).__name__}, not a list")
        system = optional_text(record, "system")
        messages = [Message("system", system)] if system else []
        for position, turn in enumerate(turns):
            # The common {"from", "value": str} turn inline: this loop is the hot path of large conversions.
            if type(turn) is dict and type(value := turn.get("value")) is str and "from" in turn and len(turn) == 2:
                messages.append(Message(role(turn["from"]), value))
            else:
                messages.extend(_turn_messages(turn, position))
        return Conversation(messages)


def _turn_messages(turn: Any, position: int) -> list[Message]:
    where = f"turn {position}"
    if not isinstance(turn, Mapping):
        raise RecordRejected("malformed field", f"{where} is {type(turn).__name__}, not an object")
    if "from" in turn or "value" in turn:
        return [chat_message(turn, turn.get("from"), turn.get("value"), where)]
    if "role" in turn or "content" in turn:
        return [chat_message(turn, turn.get("role"), turn.get("content"), where)]
    pair = [(target, key) for target, keys in zip(("user", "assistant"), _PAIR_KEYS) for key in keys if key in turn]
    if pair:
        return [Message(target, text(turn[key], f"{where} {key}")) for target, key in pair]
    raise RecordRejected("malformed field", f"{where} has none of from/value, role/content, human/assistant")
