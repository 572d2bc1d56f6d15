"""Repairs: small, explicit fixes applied to a converted conversation, each counted by kind.

Applied in this order; with ``repair=False`` a record that needs any of them is rejected instead
(reason ``needs repair``, the detail names the repair):

- ``strip whitespace``: trim each turn's text (skipped for verbatim sources: ocnli's template, messages);
- ``drop empty turns``: remove turns whose text is empty after stripping;
- ``merge same-role turns``: join consecutive turns of one role with a newline;
- ``drop leading assistant turn``: the first non-system turn must be the user's;
- ``drop trailing user turn``: a conversation must end with the answer.

Tool turns are handled first by the tool policy: ``reject`` (default; reason ``tool turn``) or
``drop`` (counted as the repair ``drop tool turns``). Then media (media keys, ``<image>``-style placeholders:
:mod:`minicpm_data.media`) by the media policy: ``reject`` (default; reason ``not text: image``, ``audio`` or
``video``) or ``drop`` (repair ``drop media``). Then reasoning (reasoning parts, ``reasoning_content``)
by the reasoning policy: ``reject`` (default; reason ``reasoning``), ``drop`` (repair ``drop reasoning``) or
``think`` (repair ``reasoning into <think>``): the assistant content becomes
``<think>\n{reasoning}\n</think>\n\n{answer}``, the layout hybrid-thinking chat templates write. A turn's
``train`` flag survives every repair (merged turns: false if either was false).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from minicpm_data.conversation import Conversation, LabeledConversation, Message, PreferencePair
from minicpm_data.media import PLACEHOLDER, media_found, without_placeholders
from minicpm_data.sources.base import TOOL_ROLE, RecordRejected
from minicpm_data.validate import turn_problems

TOOL_POLICIES = ("reject", "drop")
REASONING_POLICIES = ("reject", "drop", "think")
REPAIRS = ("drop tool turns", "drop media", "drop reasoning", "reasoning into <think>", "strip whitespace", "drop empty turns",
           "merge same-role turns", "drop leading assistant turn", "drop trailing user turn")

Messages = list[Message]


# Each step returns the repaired turns, or None when it has nothing to repair.


def _strip(messages: Messages) -> Messages | None:
    stripped = [m if (text := m.content.strip()) == m.content else Message(m.role, text, m.train) for m in messages]
    return stripped if any(new is not old for new, old in zip(stripped, messages)) else None


def _drop_empty(messages: Messages) -> Messages | None:
    kept = [m for m in messages if m.content.strip()]
    return kept if len(kept) < len(messages) else None


def _merge_same_role(messages: Messages) -> Messages | None:
    if all(a.role != b.role for a, b in zip(messages, messages[1:])):
        return None
    merged: Messages = []
    for message in messages:
        if merged and merged[-1].role == message.role:
            merged[-1] = Message(message.role, f"{merged[-1].content}\n{message.content}",
                                 _merged_train(merged[-1].train, message.train))
        else:
            merged.append(message)
    return merged


def _merged_train(first: bool | None, second: bool | None) -> bool | None:
    """What is marked never-trained stays so; else trained when either was marked trained."""
    if first is False or second is False:
        return False
    return True if first or second else None


def _drop_leading_assistant(messages: Messages) -> Messages | None:
    start = 1 if messages and messages[0].role == "system" else 0
    if len(messages) > start and messages[start].role == "assistant":
        return messages[:start] + messages[start + 1:]
    return None


def _drop_trailing_user(messages: Messages) -> Messages | None:
    return messages[:-1] if messages and messages[-1].role == "user" else None


def _drop_tools(messages: Messages) -> Messages:
    return [m for m in messages if m.role != TOOL_ROLE]


def _apply_media(messages: Messages, policy: str, keys: Sequence[str]) -> Messages | None:
    """The media policy over a record's media keys and its turns' placeholders; the turns without the
    placeholders (``drop``), or None when the record holds no media."""
    found = media_found(keys, [m.content for m in messages])
    if found is None:
        return None
    if policy == "reject":
        kind, where = found
        raise RecordRejected(f"not text: {kind}", f"{where}; --media drop keeps the text without them")
    return [Message(m.role, without_placeholders(m.content), m.train, m.reasoning) for m in messages]


def _think_content(reasoning: str, answer: str) -> str:
    """The hybrid-thinking layout of an answer with its reasoning (as Qwen3-style templates write it)."""
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{answer.lstrip()}"


def _apply_reasoning(messages: Messages, policy: str) -> tuple[Messages, str]:
    """The reasoning policy over turns some of which carry reasoning; the turns and the repair applied."""
    for position, message in enumerate(messages):
        if message.reasoning is not None and message.role != "assistant":
            raise RecordRejected("malformed field", f"turn {position} is a {message.role} turn with reasoning")
    if policy == "reject":
        position = next(i for i, m in enumerate(messages) if m.reasoning is not None)
        raise RecordRejected("reasoning", f"turn {position} carries reasoning; choose --reasoning drop or think")
    if policy == "drop":
        return [Message(m.role, m.content, m.train) for m in messages], "drop reasoning"
    return [m if m.reasoning is None else Message(m.role, _think_content(m.reasoning, m.content), m.train)
            for m in messages], "reasoning into <think>"


_STEPS: tuple[tuple[str, Callable[[Messages], Messages | None]], ...] = (
    ("strip whitespace", _strip),
    ("drop empty turns", _drop_empty),
    ("merge same-role turns", _merge_same_role),
    ("drop leading assistant turn", _drop_leading_assistant),
    ("drop trailing user turn", _drop_trailing_user),
)


def _fast_record(messages: Messages, *, repair: bool, verbatim: bool,
                 default_system: str | None) -> tuple[dict[str, Any], list[str]] | None:
    """One pass for the common case: when stripping is the only repair the turns need (allowed, or not
    needed) and their order is valid, the target record and the repairs; else ``None``."""
    if not messages:
        return None
    start = 1 if messages[0].role == "system" else 0
    turns = [{"role": "system", "content": default_system}] if default_system and not start else []
    expected, stripped = "user", False
    for position, message in enumerate(messages):
        if message.reasoning is not None:
            return None
        content = message.content
        if "<" in content and PLACEHOLDER.search(content):  # media: the media policy decides
            return None
        text = content.strip()
        if not text:
            return None
        if position >= start:
            if message.role != expected:
                return None
            expected = "assistant" if expected == "user" else "user"
        if text != content and not verbatim:
            content, stripped = text, True
        if message.train is None:
            turns.append({"role": message.role, "content": content})
        else:
            turns.append({"role": message.role, "content": content, "train": message.train})
    if expected != "user" or len(messages) == start or (stripped and not repair):
        return None
    return {"messages": turns}, ["strip whitespace"] if stripped else []


def _with_policies(messages: Messages, *, tool_turns: str, reasoning: str, media: str,
                   media_keys: Sequence[str]) -> tuple[Messages, list[str]]:
    """The tool, media and reasoning policies, in order; the turns and the repairs they applied."""
    applied: list[str] = []
    if any(m.role == TOOL_ROLE for m in messages):
        if tool_turns == "reject":
            raise RecordRejected("tool turn", "has tool turns (function_call / observation / tool)")
        messages = _drop_tools(messages)
        applied.append("drop tool turns")
    if (without_media := _apply_media(messages, media, media_keys)) is not None:
        messages = without_media
        applied.append("drop media")
    if any(m.reasoning is not None for m in messages):
        messages, kind = _apply_reasoning(messages, reasoning)
        applied.append(kind)
    return messages, applied


def _repaired(messages: Messages, *, repair: bool, verbatim: bool) -> tuple[Messages, list[str]]:
    """Every repair step, in order; the repaired turns and the repairs applied."""
    applied: list[str] = []
    for kind, step in _STEPS:
        if verbatim and kind == "strip whitespace":
            continue
        repaired = step(messages)
        if repaired is not None:
            if not repair:
                raise RecordRejected("needs repair", kind)
            applied.append(kind)
            messages = repaired
    return messages, applied


def finished_record(conversation: Conversation, *, repair: bool = True, tool_turns: str = "reject",
                    reasoning: str = "reject", media: str = "reject", media_keys: Sequence[str] = (),
                    verbatim: bool = False, default_system: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """:func:`finish`, returning the conversation as its target-format record (what convert writes).
    ``media_keys``: the record's media keys that name files (:func:`minicpm_data.media.media_keys`)."""
    # Fast path: most records need at most stripping; one pass checks that and builds the record.
    fast = None if media_keys else _fast_record(conversation.messages, repair=repair, verbatim=verbatim,
                                                default_system=default_system)
    if fast is not None:
        return fast
    given, applied = _with_policies(conversation.messages, tool_turns=tool_turns, reasoning=reasoning, media=media,
                                    media_keys=media_keys)
    messages, repairs = _repaired(given, repair=repair, verbatim=verbatim)
    applied += repairs
    if default_system and not (messages and messages[0].role == "system"):
        messages = [Message("system", default_system), *messages]
    problems = turn_problems([m.role for m in messages])
    if problems:
        if any(m.role == "system" for m in messages[1:]):
            raise RecordRejected("invalid turn order", problems[0][1])
        raise _no_exchange(given)
    return Conversation(messages).to_record(), applied


def _no_exchange(messages: Messages) -> RecordRejected:
    """Why the repairs left no user/assistant exchange, judged from the turns that hold text before them
    (after the policies)."""
    said = [m.role for m in messages if m.role in ("user", "assistant") and m.content.strip()]
    empty = {m.role for m in messages if m.role in ("user", "assistant") and not m.content.strip()}
    if not said:
        what = "no messages" if not messages else "every turn is empty" if empty else "only a system turn"
        return RecordRejected("empty conversation", what)
    if "assistant" not in said:
        return RecordRejected("prompt without answer", "the assistant turn is empty" if "assistant" in empty
                              else "no assistant turn answers the user turn")
    if "user" not in said:
        return RecordRejected("answer without prompt", "the user turn is empty" if "user" in empty
                              else "no user turn comes before the assistant turn")
    return RecordRejected("invalid turn order", "every assistant turn comes before the first user turn")
def finished_pair(pair: PreferencePair, **policies: Any) -> tuple[dict[str, Any], list[str]]:
    """A preference pair as its target-format record, and the repairs applied: each side (the context plus that
    answer) is finished as :func:`finished_record` finishes a conversation (``policies`` are its keywords), so
    both sides get the same repairs of their shared context. Per-turn ``train`` flags are dropped: in a pair
    only the final answer is trained."""
    _check_answers(pair.messages, {"chosen": pair.chosen, "rejected": pair.rejected})
    chosen, applied = finished_record(Conversation(_untrained([*pair.messages, pair.chosen])), **policies)
    rejected, more = finished_record(Conversation(_untrained([*pair.messages, pair.rejected])), **policies)
    context, answers = chosen["messages"][:-1], (chosen["messages"][-1], rejected["messages"][-1])
    if context != rejected["messages"][:-1]:  # one side's answer changed how the context was repaired
        raise RecordRejected("prompts differ", "the two sides' contexts differ after repairs")
    if answers[0]["content"] == answers[1]["content"]:
        raise RecordRejected("identical answers", "chosen and rejected are the same text")
    return {"messages": context, "chosen": answers[0], "rejected": answers[1]}, list(dict.fromkeys(applied + more))


def finished_labeled(row: LabeledConversation, **policies: Any) -> tuple[dict[str, Any], list[str]]:
    """A KTO row as its target-format record, and the repairs applied (see :func:`finished_pair`)."""
    _check_answers(row.messages[:-1], {"the labelled answer": row.messages[-1] if row.messages else None})
    record, applied = finished_record(Conversation(_untrained(row.messages)), **policies)
    return {**record, "label": row.label}, applied


# How a source's output is finished, by the kind of record it writes (Source.kind).
FINISHERS: dict[str, Callable[..., tuple[dict[str, Any], list[str]]]] = {
    "messages": finished_record, "pairs": finished_pair, "kto": finished_labeled}


def _check_answers(context: Messages, answers: dict[str, Message | None]) -> None:
    """The answers exist and are not empty, and the context ends with the user turn they reply to (repairs
    would otherwise drop an empty answer with its prompt, or merge an answer into a context's last answer)."""
    for side, message in answers.items():
        if message is None or message.role != "assistant":
            raise RecordRejected("side missing", f"no assistant answer as {side}")
        if not message.content.strip():
            raise RecordRejected("empty answer", f"{side} is empty")
    last = next((m for m in reversed(context) if m.role != TOOL_ROLE and m.content.strip()), None)
    if last is None or last.role != "user":
        raise RecordRejected("no prompt", "the context does not end with a user turn" if last
                             else "the context has no user turn")


def _untrained(messages: Messages) -> Messages:
    return [m if m.train is None else Message(m.role, m.content, None, m.reasoning) for m in messages]


def finish(conversation: Conversation, *, repair: bool = True, tool_turns: str = "reject",
           reasoning: str = "reject", media: str = "reject", verbatim: bool = False,
           default_system: str | None = None) -> tuple[Conversation, list[str]]:
    """Apply the tool, media and reasoning policies and repairs, add ``default_system`` where there is none, check
    turn order. Returns the finished conversation and the repairs applied; raises :class:`RecordRejected`.
    """
    record, applied = finished_record(conversation, repair=repair, tool_turns=tool_turns, reasoning=reasoning,
                                      media=media, verbatim=verbatim, default_system=default_system)
    return Conversation.from_record(record), applied
