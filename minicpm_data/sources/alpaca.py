"""Alpaca-style instruction records (Stanford Alpaca, LLaMA-Factory, ms-swift query/response)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_data.conversation import Conversation, Message
from minicpm_data.sources.base import RecordRejected, Source, field, optional_text, text

# Inputs that mean "no input" in Alpaca-style data (compared stripped, case-insensitively).
NO_INPUT = frozenset({"", "<noinput>", "noinput", "no input", "<no input>", "none", "n/a", "null"})


class Alpaca(Source):
    """``instruction`` (+ ``input``), ``output``, optional ``system`` and ``history``.

    ``query``/``response`` are aliases of ``instruction``/``output``; the input follows the
    instruction after one newline unless it is empty or "noinput"-like; ``history`` holds earlier
    ``[question, answer]`` turns::

        {"instruction": "Translate", "input": "你好", "output": "Hello",
         "history": [["Hi", "Hello! How can I help?"]]}
        -> {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello! How can I help?"},
                         {"role": "user", "content": "Translate\\n你好"},
                         {"role": "assistant", "content": "Hello"}]}
    """

    name = "alpaca"

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return (("instruction" in record or "query" in record) and ("output" in record or "response" in record)
                and not is_answer_pair(record.get("output")))

    def convert(self, record: Mapping[str, Any]) -> Conversation:
        answer = Message("assistant", text(field(record, "output", "response"), "output"))
        return Conversation([*alpaca_context(record), answer])


def is_answer_pair(output: Any) -> bool:
    """Whether an Alpaca ``output`` is LLaMA-Factory's older ranking form, ``[chosen, rejected]``."""
    return isinstance(output, list) and len(output) == 2


def alpaca_context(record: Mapping[str, Any]) -> list[Message]:
    """An Alpaca record's turns before its answer: ``system``, ``history``, then the instruction (+ input)."""
    prompt = text(field(record, "instruction", "query"), "instruction")
    extra = optional_text(record, "input")
    if extra and extra.strip().lower() not in NO_INPUT:
        # Whitespace at the join is trimmed so the newline is the only separator.
        prompt = f"{prompt.rstrip()}\n{extra.lstrip()}" if prompt.strip() else extra
    system = optional_text(record, "system")
    messages = [Message("system", system)] if system else []
    return [*messages, *history_messages(record.get("history")), Message("user", prompt)]


def history_messages(history: Any) -> list[Message]:
    """``[question, answer]`` pairs as user and assistant turns (``None``: none)."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise RecordRejected("malformed field", f"history is {type(history).__name__}, not a list of pairs")
    messages = []
    for position, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RecordRejected("malformed field", f"history item {position} is not a [question, answer] pair")
        messages += [Message("user", text(pair[0], f"history {position} question")),
                     Message("assistant", text(pair[1], f"history {position} answer"))]
    return messages
