"""The record types every source converts into, and every consumer reads.

A conversation is MiniCPM's training record, ``{"messages": [{"role": ..., "content": ...}, ...]}``,
with roles ``system`` (first only), then ``user`` and ``assistant`` alternating. An assistant message may
carry ``"train": false`` (never trained) or ``"train": true`` (trained even under ``--train-on last``);
without it, the renderer's ``train_on`` decides.

Preference data comes in two more kinds of record (``docs/preference-data.md``):

- a :class:`PreferencePair` (DPO), ``{"messages": [context ending with a user turn], "chosen": {"role":
  "assistant", "content": ...}, "rejected": {...}}``;
- a :class:`LabeledConversation` (KTO), ``{"messages": [... ending with the answer], "label": true|false}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(slots=True)  # not frozen: a frozen dataclass costs three times as much to build, and convert builds millions
class Message:
    """One turn. ``train``: the per-turn training choice (assistant turns; ``None``: as ``train_on`` says).
    ``reasoning``: a source's reasoning text, only until convert's reasoning policy has applied it."""

    role: str
    content: str
    train: bool | None = None
    reasoning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.train is None:
            return {"role": self.role, "content": self.content}
        return {"role": self.role, "content": self.content, "train": self.train}


@dataclass(slots=True)
class Conversation:
    messages: list[Message] = field(default_factory=list)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Conversation":
        """Build from a target-format record (already validated): ``{"messages": [...]}``."""
        return cls([Message(m["role"], m["content"], m.get("train")) for m in record["messages"]])

    def to_record(self) -> dict[str, Any]:
        return {"messages": [m.to_dict() for m in self.messages]}

    @property
    def system(self) -> str | None:
        if self.messages and self.messages[0].role == "system":
            return self.messages[0].content
        return None


@dataclass(slots=True)
class PreferencePair:
    """A context and two answers to it, the ``chosen`` one preferred over the ``rejected`` one.

    ``messages`` is the context: an optional system turn, then user and assistant turns alternating, ending
    with a user turn (its assistant turns are never trained). Each side is the context plus that answer."""

    messages: list[Message]
    chosen: Message
    rejected: Message

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "PreferencePair":
        """Build from a target-format pairs record (already validated)."""
        return cls([Message(m["role"], m["content"]) for m in record["messages"]],
                   Message("assistant", record["chosen"]["content"]), Message("assistant", record["rejected"]["content"]))

    def to_record(self) -> dict[str, Any]:
        return {"messages": [m.to_dict() for m in self.messages], "chosen": self.chosen.to_dict(),
                "rejected": self.rejected.to_dict()}

    def sides(self) -> tuple[Conversation, Conversation]:
        """The chosen and the rejected conversation: the context plus that answer."""
        return Conversation([*self.messages, self.chosen]), Conversation([*self.messages, self.rejected])


@dataclass(slots=True)
class LabeledConversation(Conversation):
    """A conversation whose final answer is judged (KTO): ``label`` true for a desirable answer, false for
    an undesirable one. Render it like any conversation with ``train_on="last"``: the final answer is
    what the label is about."""

    label: bool = field(kw_only=True)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "LabeledConversation":
        """Build from a target-format KTO record (already validated)."""
        return cls([Message(m["role"], m["content"]) for m in record["messages"]], label=record["label"])

    def to_record(self) -> dict[str, Any]:
        return {"messages": [m.to_dict() for m in self.messages], "label": self.label}


# The record type of each kind of target file (see minicpm_data.validate.KINDS).
RECORD_TYPES: dict[str, Any] = {"messages": Conversation, "pairs": PreferencePair, "kto": LabeledConversation}
