"""What every source shares: the rejection error, its reasons, and text helpers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from minicpm_data.conversation import Conversation, Message
from minicpm_data.media import MEDIA_PARTS

# Role every source gives tool-calling turns; the pipeline applies the tool policy to it.
TOOL_ROLE = "tool"

# Every reason a record can be rejected for, with what it means (shown in the README and help).
REJECT_REASONS = {
    "not an object": "the record is not a JSON object (e.g. a bare string in the list)",
    "missing field": "a field the format needs is absent, or a --template column is empty (the detail names it)",
    "malformed field": "a field has the wrong shape, e.g. turns that are not a list of objects",
    "not text": "a text field holds a number, list, or a content part that is not text (the detail names its type)",
    "not text: image": "the record holds an image (an images/image key, an <image> placeholder, an image_url part, "
                       "...) and --media is reject: MiniCPM's text models cannot train on it",
    "not text: audio": "the record holds audio (an audios key, an <audio> placeholder, an input_audio part, ...)",
    "not text: video": "the record holds a video (a videos key, a <video> placeholder, a video_url part, ...)",
    "reasoning": "an assistant turn carries reasoning (a reasoning part, or a reasoning_content, reasoning or "
                 "thinking field) and --reasoning is reject",
    "unsupported weight": "a loss_weight/weight other than 0 or 1, a train flag that is not true/false, "
                          "or a user/system turn marked as trained: only assistant turns are trained, wholly or not",
    "undesirable completion": "a prompt/completion record labelled false (TRL's unpaired preference data): "
                              "the completion is an example of what not to answer",
    "unknown role": "a turn's role is none of system/user/assistant or their known aliases",
    "tool turn": "the record has tool turns (function_call, observation, tool) and the policy is reject",
    "no label": "an OCNLI record without a label (the unlabelled test split)",
    "no consensus label": "an OCNLI record labelled '-': the annotators did not agree",
    "unknown label": "an OCNLI label other than entailment, neutral, contradiction",
    "needs repair": "with --no-repair: the record needs the repair named in the detail",
    "empty conversation": "no turn holds text: no messages, only a system turn, or every turn empty",
    "prompt without answer": "user turns but no assistant turn with text (a prompt-only record: nothing to train)",
    "answer without prompt": "assistant turns but no user turn with text before them",
    "invalid turn order": "a system turn after the first turn, or every answer before the first question: "
                          "no repair leaves an exchange",
    "duplicate": "with --dedupe: the same conversation was already written (the detail says where)",
    # Preference data (docs/preference-data.md):
    "preference record": "an SFT source (sharegpt, messages, ...) met a record with preference keys (chosen/rejected, "
                         "a KTO label): it would drop them; the detail names the preference source that reads it",
    "side missing": "a pair without its chosen or its rejected answer, or a KTO row whose last turn is no answer",
    "empty answer": "a chosen, rejected or labelled answer that is empty after stripping",
    "identical answers": "the chosen and the rejected answer are the same text: nothing to prefer",
    "prompts differ": "the two sides of a pair do not share the same context (implicit-prompt formats: "
                      "everything before the final answer must be identical)",
    "no prompt": "a pair's or KTO row's context does not end with the user turn the answer replies to",
    "scores tie": "an UltraFeedback-style row whose score_chosen is not above score_rejected",
}


class RecordRejected(Exception):
    """A record that cannot become a conversation; ``reason`` is a key of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Source:
    """One raw format: ``convert(record) -> Conversation``; ``matches(record)`` drives auto-detection.

    Conversations a source returns may still need repairs (empty, same-role or misplaced turns);
    tool turns carry the role :data:`TOOL_ROLE`. ``verbatim`` sources produce text whose whitespace
    is meant (a fixed template's, or the target format's own), so the strip repair leaves it alone.
    """

    name: ClassVar[str]
    verbatim: ClassVar[bool] = False
    # What convert writes: SFT conversations ("messages"), preference pairs ("pairs") or KTO rows ("kto").
    kind: ClassVar[str] = "messages"
    # Preference keys (PREFERENCE_KEYS) this source reads itself; others make an SFT source reject the record.
    reads_preference_keys: ClassVar[frozenset[str]] = frozenset()

    @staticmethod
    def matches(record: Mapping[str, Any]) -> bool:
        return False

    def check_columns(self, columns: list[str], path: str, what: str = "column") -> None:
        """Raise :class:`~minicpm_data.errors.FormatError` when a table lacks a column the source needs
        (``what="key"``: when no sampled JSON record has a key the source needs)."""

    def convert(self, record: Mapping[str, Any]) -> Conversation:
        raise NotImplementedError


# Keys that carry a preference (answers to prefer or avoid, a KTO label); an SFT source never drops them silently.
PREFERENCE_KEYS = ("chosen", "rejected", "chosen_messages", "rejected_messages", "preferred_output",
                   "non_preferred_output", "kto_tag", "label")


def preference_keys(record: Mapping[str, Any]) -> list[str]:
    """The preference keys a raw record carries (``label`` counts when it is a boolean, as KTO's is)."""
    return [key for key in PREFERENCE_KEYS if key in record and (key != "label" or type(record[key]) is bool)]


def field(record: Mapping[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` present in ``record``; rejects when none is."""
    for name in names:
        if name in record:
            return record[name]
    raise RecordRejected("missing field", " or ".join(repr(name) for name in names))


def text(value: Any, where: str) -> str:
    """A text field: a string, or ``None`` (empty); anything else is rejected as ``not text``."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    raise RecordRejected("not text", f"{where} is {type(value).__name__}")


# Content part types (OpenAI chat and Responses API, LLaMA-Factory v1, Anthropic) by what they hold.
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_REASONING_PARTS = frozenset({"reasoning", "thinking"})
_TOOL_PARTS = frozenset({"tool_call", "tool_calls", "tools", "function_call", "tool_use", "tool_result"})
# Where a part keeps its text: OpenAI "text", LLaMA-Factory v1 "value", OpenAI "refusal", Anthropic "thinking".
_PART_TEXT_KEYS = ("text", "value", "refusal", "reasoning", "thinking")
# Message-level reasoning fields: DeepSeek / OpenAI-compatible servers, vLLM, Hugging Face chat templates.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
# Per-turn training fields: the target format's own, LLaMA-Factory v1's, axolotl's and OpenAI fine-tuning's (0 or 1).
TRAIN_KEYS = ("train", "loss_weight", "weight")


def content_text(value: Any, where: str) -> str:
    """A turn's text: like :func:`text`, or the text of a content part list (see :func:`content_parts`)."""
    body, reasoning, tool = content_parts(value, where)
    if reasoning is not None or tool:
        raise RecordRejected("not text", f"{where} has a {'reasoning' if reasoning is not None else 'tool'} part")
    return body


def content_parts(value: Any, where: str) -> tuple[str, str | None, bool]:
    """``(text, reasoning or None, has tool parts)`` of a turn's content: a string, ``None``, or a list of
    parts (strings, or objects with a ``type``). Several text parts join with a newline, in order; image,
    audio and video parts are rejected (``not text: image`` ...), never dropped here (convert's ``--media drop``
    turns them into placeholders first: :mod:`minicpm_data.media`)."""
    if not isinstance(value, list):
        return text(value, where), None, False
    texts, reasoning, tool = [], [], False
    for part in value:
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type", "text") if isinstance(part, Mapping) else type(part).__name__
        if kind in _TEXT_PARTS or kind == "refusal":
            texts.append(_part_text(part, kind, where))
        elif kind in _REASONING_PARTS:
            reasoning.append(_part_text(part, kind, where))
        elif kind in _TOOL_PARTS:
            tool = True
        elif kind in MEDIA_PARTS:
            raise RecordRejected(f"not text: {MEDIA_PARTS[kind]}", f"{where} has a {kind} part; --media drop "
                                                                   "keeps the text")
        else:
            raise RecordRejected("not text", f"{where} has a {kind} part")
    joined = "\n".join(r for r in reasoning if r.strip())
    return "\n".join(texts), joined or None, tool


def _part_text(part: Mapping[str, Any], kind: str, where: str) -> str:
    for key in _PART_TEXT_KEYS:
        if part.get(key) is not None:  # Parquet structs carry every part's keys, null where unused
            return text(part[key], f"{where} {kind} part")
    raise RecordRejected("malformed field", f"{where} has a {kind} part without text")


def chat_message(turn: Mapping[str, Any], role_name: Any, content: Any, where: str) -> Message:
    """One chat turn as a :class:`Message`: its role, content text (or parts), reasoning and training flag.

    Tool calls (``tool_calls``/``function_call`` fields or tool parts) give the turn the tool role."""
    body, reasoning, tool = content_parts(content, where)
    for key in REASONING_KEYS:
        extra = turn.get(key)
        if isinstance(extra, str) and extra.strip():
            reasoning = f"{reasoning}\n{extra}" if reasoning else extra
        elif extra is not None and not isinstance(extra, str):
            raise RecordRejected("not text", f"{where} {key} is {type(extra).__name__}")
    target = TOOL_ROLE if tool or turn.get("tool_calls") or turn.get("function_call") else role(role_name)
    train = turn_train(turn, target, where) if not turn.keys().isdisjoint(TRAIN_KEYS) else None
    return Message(target, body, train, reasoning)


def turn_train(turn: Mapping[str, Any], target: str, where: str) -> bool | None:
    """The training flag of a turn from ``train`` (true/false), LLaMA-Factory's ``loss_weight`` or axolotl's
    ``weight`` (0: not trained, 1: the default); ``None`` when it has none, or is not an assistant turn."""
    key = next((key for key in TRAIN_KEYS if turn.get(key) is not None), None)  # Parquet: unused keys are null
    if key is None or target == TOOL_ROLE:  # tool turns are dropped or rejected by the tool policy
        return None
    value = turn[key]
    if key == "train":
        if type(value) is not bool:
            raise RecordRejected("unsupported weight", f"{where} train is {value!r}, not true or false")
        trained = value
    elif type(value) in (int, float) and value in (0, 1):
        trained = value == 1
    else:
        raise RecordRejected("unsupported weight", f"{where} {key} is {value!r}; only 0 (not trained) or 1 is supported")
    if target != "assistant":
        if trained:
            raise RecordRejected("unsupported weight", f"{where} is a {target} turn marked as trained; "
                                                       "only assistant turns are trained")
        return None
    # A weight of 1 is every assistant turn's default: it leaves the choice to --train-on.
    return value if key == "train" else (None if trained else False)


def optional_text(record: Mapping[str, Any], name: str) -> str:
    """An optional text field: absent, null and empty all mean none (no repair counted)."""
    value = text(record.get(name), repr(name))
    return value if value.strip() else ""


ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    **dict.fromkeys(("function_call", "observation", "tool", "function", "tool_call", "tool_response"), TOOL_ROLE),
}


def role(name: Any) -> str:
    """The target role for a source's role name (case-insensitive); rejects unknown names."""
    try:
        return ROLE_ALIASES[name]
    except (KeyError, TypeError):  # not exactly a known name, or not hashable
        mapped = ROLE_ALIASES.get(name.strip().lower()) if isinstance(name, str) else None
    if mapped is None:
        raise RecordRejected("unknown role", repr(name))
    return mapped
