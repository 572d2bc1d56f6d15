"""THE rendering: a conversation and a tokenizer in, ``input_ids`` and ``labels`` out.

Stats, inspect, evaluation, chat and the trainer all call this module; nothing else tokenizes chat data.

Layouts (``template``):

- ``chatml`` (MiniCPM3, MiniCPM4/4.1, MiniCPM-SALA, MiniCPM5): the text is the tokenizer's own
  ``chat_template`` rendering, tokenized the way MiniCPM's inference code does it (the rendered text,
  then the tokenizer with its default special tokens), so the ids equal
  ``tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))``. ``<s>`` comes from the
  tokenizer (MiniCPM3/4) or from the template (MiniCPM5); it is never doubled. Trained: every
  assistant turn's content and its closing ``<|im_end|>``.
- ``minicpm2`` (MiniCPM-1/2): ``<s>`` + system text + ``<用户>{user}<AI>{assistant}`` per turn, markers
  as plain text, then ``</s>`` after the final assistant turn. Trained: every assistant content, and
  the final ``</s>``. Middle assistant turns end with nothing (the next ``<用户>`` follows directly),
  as in MiniCPM-2's own chat history, so inference sees the layout training saw.

How labels stay exact: each layout is a list of literal text parts with the message contents between
them. For ChatML the parts come from rendering the template once per sequence of roles with marker
contents (checked against a real rendering); the whole text is tokenized in one batch call and the
character spans of the trained text are mapped to tokens through the fast tokenizer's offsets. A token
that straddles a span's edge (e.g. ``\\n\\n`` joining the header's newline and a content's leading
newline) is trained: the model has to produce it.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from minicpm_data.conversation import Conversation
from minicpm_data.errors import InputError, TokenizerError

IGNORE_INDEX = -100
TEMPLATES = ("chatml", "minicpm2")
TRUNCATIONS = ("right", "drop")
IM_END = "<|im_end|>"
IM_START = "<|im_start|>"
USER_MARKER, AI_MARKER = "<用户>", "<AI>"
# MiniCPM3/4's template; used when ``chatml`` is forced on a tokenizer that carries no template.
MINICPM_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BATCH_SIZE = 1024
_MARKER = re.compile("\ue000(\\d+)\ue001")


@dataclass(slots=True)
class RenderedSample:
    """One conversation as training sees it.

    ``input_ids`` / ``labels`` are after truncation (labels are ``IGNORE_INDEX`` where not trained);
    ``num_tokens`` and ``trained_tokens`` count the full rendering before truncation;
    ``turn_ends[i]`` is the (exclusive) token index where message ``i`` (with its closing ``<|im_end|>``)
    ends in the full rendering; the last message's turn also holds what the layout writes after it.
    """

    input_ids: list[int]
    labels: list[int]
    num_tokens: int
    trained_tokens: int
    trained_tokens_lost: int = 0
    turn_ends: list[int] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return len(self.input_ids) < self.num_tokens

    @property
    def trainable(self) -> bool:
        """False when no trained token is left: such a sample is never trained on."""
        return self.trained_tokens > self.trained_tokens_lost


def detect_template(tokenizer: Any) -> str:
    """``"chatml"`` or ``"minicpm2"`` from the tokenizer's chat template and special tokens."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if isinstance(template, str):
        if IM_START in template and IM_END in template and _is_single_token(tokenizer, IM_END):
            return "chatml"
        if USER_MARKER in template and AI_MARKER in template:
            return "minicpm2"
        raise TokenizerError(f"unknown chat template in tokenizer {_name(tokenizer)} (neither MiniCPM ChatML "
                             "nor <用户>/<AI>): pass --template chatml or --template minicpm2")
    raise TokenizerError(f"tokenizer {_name(tokenizer)} has no chat template: "
                         "pass --template chatml or --template minicpm2")


def render(conversation: Conversation, tokenizer: Any, *, template: str | None = None,
           max_length: int | None = None, truncation: str = "right") -> RenderedSample:
    """Render one conversation; see :func:`render_many`."""
    return render_many([conversation], tokenizer, template=template, max_length=max_length,
                       truncation=truncation)[0]


def render_many(conversations: Iterable[Conversation], tokenizer: Any, *, template: str | None = None,
                max_length: int | None = None, truncation: str = "right",
                on_progress: Callable[[int], None] | None = None) -> list[RenderedSample]:
    """Render conversations in batches (one tokenizer call per batch, on every core).

    ``truncation="right"`` keeps the first ``max_length`` tokens; ``"drop"`` keeps no trained token of
    a sample longer than ``max_length``. Either way ``trained_tokens_lost`` counts what was cut and
    ``trainable`` is False when nothing trained is left. ``on_progress(n)`` is called after each batch.
    """
    if truncation not in TRUNCATIONS:
        raise InputError(f"unknown truncation {truncation!r}: use one of {', '.join(TRUNCATIONS)}")
    layout = _layout(tokenizer, template)
    samples: list[RenderedSample] = []
    batch: list[Conversation] = []
    for conversation in conversations:
        batch.append(conversation)
        if len(batch) == BATCH_SIZE:
            samples += _render_batch(batch, layout, max_length, truncation, on_progress)
            batch = []
    if batch:
        samples += _render_batch(batch, layout, max_length, truncation, on_progress)
    return samples


def render_prompt(conversation: Conversation, tokenizer: Any, template: str | None = None) -> list[int]:
    """Ids of a conversation without its answer, ending with the assistant generation prompt."""
    layout = _layout(tokenizer, template)
    parts = layout.parts(tuple(m.role for m in conversation.messages), True, conversation)
    ids = layout.encode([_join(parts, [m.content for m in conversation.messages])])[0].ids
    return ids[layout.bos_skip(ids):]


# --- layouts --------------------------------------------------------------------------------------


class _Layout:
    """Literal parts around message contents, what closes a trained assistant turn, and encoding."""

    name: str
    final_eos = False  # whether a trained eos id follows a final assistant turn

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self._parts: dict[tuple, list[str]] = {}

    def parts(self, roles: tuple[str, ...], generation_prompt: bool, example: Conversation) -> list[str]:
        key = (roles, generation_prompt)
        parts = self._parts.get(key)
        if parts is None:
            parts = self._parts[key] = self.build_parts(roles, generation_prompt, example)
        return parts

    def build_parts(self, roles: tuple[str, ...], generation_prompt: bool, example: Conversation) -> list[str]:
        raise NotImplementedError

    def closing(self, following_part: str) -> int:
        """How many characters of the part after an assistant content are trained with it."""
        raise NotImplementedError

    def encode(self, texts: list[str]) -> list[Any]:
        """The tokenizer with its default special tokens: ``tokenizers.Encoding`` objects.

        Calls the Rust backend directly (what ``tokenizer(texts)`` does after its own checks) unless
        the backend carries truncation, padding or special-token settings that the wrapper would reset.
        """
        backend = self.tokenizer.backend_tokenizer
        if (backend.truncation is None and backend.padding is None
                and backend.encode_special_tokens == bool(getattr(self.tokenizer, "split_special_tokens", False))):
            return backend.encode_batch(texts, add_special_tokens=True)
        return self.tokenizer(texts, return_attention_mask=False, return_token_type_ids=False).encodings

    def bos_skip(self, ids: list[int]) -> int:
        """1 when both the text and the tokenizer put ``<s>`` first (it must appear once), else 0."""
        return int(self.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == self.bos_id)


class _ChatML(_Layout):
    name = "chatml"

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        if not _is_single_token(tokenizer, IM_END):
            raise TokenizerError(f"tokenizer {_name(tokenizer)} has no {IM_END} token: it is not a ChatML tokenizer")
        self.chat_template = None if tokenizer.chat_template else MINICPM_CHATML_TEMPLATE

    def apply(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.chat_template,
                                                      add_generation_prompt=generation_prompt)
        except Exception as error:
            raise TokenizerError(f"chat template of {_name(self.tokenizer)} failed: {error}") from None

    def build_parts(self, roles: tuple[str, ...], generation_prompt: bool, example: Conversation) -> list[str]:
        markers = [{"role": role, "content": f"\ue000{i}\ue001"} for i, role in enumerate(roles)]
        pieces = _MARKER.split(self.apply(markers, generation_prompt))
        if [int(index) for index in pieces[1::2]] != list(range(len(roles))):
            raise TokenizerError(f"chat template of {_name(self.tokenizer)} does not write each message content "
                                 "once, in order: cannot map trained tokens exactly")
        parts = pieces[0::2]
        real = self.apply([m.to_dict() for m in example.messages], generation_prompt)
        if real != _join(parts, [m.content for m in example.messages]):
            raise TokenizerError(f"chat template of {_name(self.tokenizer)} changes message contents: "
                                 "cannot map trained tokens exactly")
        return parts

    def closing(self, following_part: str) -> int:
        end = following_part.find(IM_END)
        if end < 0:
            raise TokenizerError(f"chat template of {_name(self.tokenizer)} does not close assistant turns with {IM_END}")
        return end + len(IM_END)


class _MiniCPM2(_Layout):
    name = "minicpm2"
    final_eos = True
    _markers = {"system": "", "user": USER_MARKER, "assistant": AI_MARKER}

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        if tokenizer.eos_token_id is None:
            raise TokenizerError(f"tokenizer {_name(tokenizer)} has no eos token for the minicpm2 layout")

    def build_parts(self, roles: tuple[str, ...], generation_prompt: bool, example: Conversation) -> list[str]:
        unknown = sorted(set(roles) - set(self._markers))
        if unknown:
            raise InputError(f"the minicpm2 layout has no place for role(s) {', '.join(unknown)}")
        return [self._markers[role] for role in roles] + [AI_MARKER if generation_prompt else ""]

    def closing(self, following_part: str) -> int:
        return 0

    def encode(self, texts: list[str]) -> list[Any]:
        encodings = super().encode(texts)
        if self.bos_id is not None:  # the layout starts with <s> even when the tokenizer adds none
            for encoding in encodings:
                if not encoding.ids or encoding.ids[0] != self.bos_id:
                    raise TokenizerError(f"tokenizer {_name(self.tokenizer)} does not add <s>: "
                                         "it is not a MiniCPM-2 tokenizer")
        return encodings


_LAYOUTS: "weakref.WeakKeyDictionary[Any, dict[tuple[str, str], _Layout]]" = weakref.WeakKeyDictionary()


def _layout(tokenizer: Any, template: str | None) -> _Layout:
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(f"tokenizer {_name(tokenizer)} is not a fast tokenizer; load it with load_tokenizer")
    name = template or detect_template(tokenizer)
    if name not in TEMPLATES:
        raise TokenizerError(f"unknown template {name!r}: use one of {', '.join(TEMPLATES)}")
    layouts = _LAYOUTS.setdefault(tokenizer, {})
    key = (name, str(tokenizer.chat_template))  # parts are cached per template: it may be reassigned
    if key not in layouts:
        layouts[key] = (_ChatML if name == "chatml" else _MiniCPM2)(tokenizer)
    return layouts[key]


# --- rendering ------------------------------------------------------------------------------------


def _join(parts: Sequence[str], contents: Sequence[str]) -> str:
    pieces = [parts[0]]
    for content, part in zip(contents, parts[1:]):
        pieces += (content, part)
    return "".join(pieces)


def _render_batch(conversations: list[Conversation], layout: _Layout, max_length: int | None,
                  truncation: str, on_progress: Callable[[int], None] | None) -> list[RenderedSample]:
    texts, plans = [], []
    for conversation in conversations:
        messages = conversation.messages
        parts = layout.parts(tuple(m.role for m in messages), False, conversation)
        position, pieces, trained, ends = len(parts[0]), [parts[0]], [], []
        for message, part in zip(messages, parts[1:]):
            start = position
            position += len(message.content)
            end = position + layout.closing(part)
            if message.role == "assistant":
                trained.append((start, end))
            ends.append(end)
            pieces += (message.content, part)
            position += len(part)
        texts.append("".join(pieces))
        plans.append((trained, ends, bool(messages) and messages[-1].role == "assistant"))
    encodings = layout.encode(texts)
    samples = [_sample(encoding, *plan, layout, max_length, truncation) for encoding, plan in zip(encodings, plans)]
    if on_progress is not None:
        on_progress(len(samples))
    return samples


def _sample(encoding: Any, trained_chars: list[tuple[int, int]], end_chars: list[int], ends_with_answer: bool,
            layout: _Layout, max_length: int | None, truncation: str) -> RenderedSample:
    ids = encoding.ids
    skip = layout.bos_skip(ids)
    if skip:
        ids = ids[skip:]
    labels = [IGNORE_INDEX] * len(ids)
    for start_char, end_char in trained_chars:
        first = _token_at(encoding, start_char, end_char, forward=True)
        if first is not None:
            last = _token_at(encoding, start_char, end_char, forward=False)
            labels[first - skip:last + 1 - skip] = ids[first - skip:last + 1 - skip]
    if layout.final_eos and ends_with_answer:
        ids = ids + [layout.tokenizer.eos_token_id]
        labels.append(layout.tokenizer.eos_token_id)
    turn_ends = [_token_end(encoding, char) - skip for char in end_chars[:-1]] + [len(ids)] * bool(end_chars)
    trained = len(labels) - labels.count(IGNORE_INDEX)
    sample = RenderedSample(ids, labels, len(ids), trained, 0, turn_ends)
    if max_length is not None and len(ids) > max_length:
        sample.input_ids, sample.labels = ids[:max_length], labels[:max_length]
        if truncation == "drop":
            sample.labels = [IGNORE_INDEX] * max_length
        sample.trained_tokens_lost = trained - (max_length - sample.labels.count(IGNORE_INDEX))
    return sample


def _token_at(encoding: Any, start: int, end: int, *, forward: bool) -> int | None:
    """First (or last) token covering a character of ``[start, end)``; None if no character is covered."""
    for char in range(start, end) if forward else range(end - 1, start - 1, -1):
        token = encoding.char_to_token(char)
        if token is not None:
            return token
    return None


def _token_end(encoding: Any, end_char: int) -> int:
    """Exclusive token index where the text before ``end_char`` ends."""
    for char in range(end_char - 1, -1, -1):
        token = encoding.char_to_token(char)
        if token is not None:
            return token + 1
    return 0


def _is_single_token(tokenizer: Any, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return isinstance(token_id, int) and token_id != tokenizer.unk_token_id


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
