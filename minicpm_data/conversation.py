"""The one conversation type every source converts into, and every consumer reads.

A conversation is MiniCPM's training record, ``{"messages": [{"role": ..., "content": ...}, ...]}``,
with roles ``system`` (first only), then ``user`` and ``assistant`` alternating. An assistant message may
carry ``"train": false`` (never trained) or ``"train": true`` (trained even under ``--train-on last``);
without it, the renderer's ``train_on`` decides.
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
