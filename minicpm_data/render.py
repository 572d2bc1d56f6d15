"""THE rendering: a conversation and a tokenizer in, ``input_ids`` and ``labels`` out.

Stats, inspect, evaluation, chat and the trainer all call this module; nothing else tokenizes chat data.

Layouts (``template``):

- ``chatml`` (MiniCPM3, MiniCPM4/4.1, MiniCPM-SALA, MiniCPM5): the text is the tokenizer's own
  ``chat_template`` rendering, tokenized the way MiniCPM's inference code does it (the rendered text,
  then the tokenizer with its default special tokens), so the ids equal
  ``tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))``. ``<s>`` comes from the
  tokenizer (MiniCPM3/4) or from the template (MiniCPM5); it is never doubled. Trained: every
  assistant turn's content and its closing ``<|im_end|>``.
- ``minicpm2`` (MiniCPM-1/2): MiniCPM-2B's own chat template, ``<用户>{user}<AI>`` for a user turn and
  the bare content for any other role, every content ``.strip()``-ed as the template does; ``<s>`` from
  the tokenizer, then ``</s>`` after the final assistant turn. Trained: every assistant content, and the
  final ``</s>``. Middle assistant turns end with nothing (the next ``<用户>`` follows directly), as in
  MiniCPM-2's own chat history, so inference sees the layout training saw.

Which assistant turns are trained: all of them (``train_on="all"``, the default) or only the final one
(``"last"``); a message's own ``train`` flag (``false``: never, ``true``: always) wins over ``train_on``.
Untrained assistant turns are context, like user turns; MiniCPM-2's final ``</s>`` is trained with the
final turn.

Preference pairs (:func:`render_pairs`) render each side, the context plus that answer, with the same layouts
and only the answer trained, compare the two full renderings, then truncate them by the same policy. The sides
are tokenized without offsets; only the shared prompt (the text before the answer) is tokenized with them. Both
trained spans start at the first token where a side's ids leave the prompt's own ids: a token the tokenizer
merges across the prompt's end (MiniCPM-2B's ``<AI>``'s ``>`` with a quote) starts that side's answer, and the
other side trains the prompt token in its place (``merged_boundary``), so both are scored after one prompt.

How labels stay exact: each layout is a list of literal text parts with the message contents between
them. For ChatML the parts come from rendering the template once per sequence of roles with marker
contents (checked against a real rendering); the whole text is tokenized in one batch call and the
character spans of the trained text are mapped to tokens through the fast tokenizer's offsets. A token
that straddles a span's edge (e.g. ``\\n\\n`` joining the header's newline and a content's leading
newline) is trained: the model has to produce it.
"""

from __future__ import annotations

import gc
import re
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate, chain, islice
from typing import Any

from minicpm_data.conversation import Conversation, PreferencePair
from minicpm_data.errors import InputError, TokenizerError

IGNORE_INDEX = -100
TEMPLATES = ("chatml", "minicpm2")
TRUNCATIONS = ("right", "drop")
TRAIN_ON = ("all", "last")
IM_END = "<|im_end|>"
IM_START = "<|im_start|>"
USER_MARKER, AI_MARKER = "<用户>", "<AI>"
# MiniCPM3/4's template; used when ``chatml`` is forced on a tokenizer that carries no template.
MINICPM_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BATCH_SIZE = 1024
IN_FLIGHT = 2  # batches submitted to the tokenizer thread before the oldest is finished
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


@dataclass(frozen=True, slots=True)
class _Shape:
    """How conversations with one sequence of roles render: the literal ``parts`` around the contents;
    where content i starts and where its turn (with its closing ``<|im_end|>``) ends, counting literal
    characters only; the indices of trained (assistant) messages; whether a trained eos id follows."""

    parts: list[str]
    starts: list[int]
    ends: list[int]
    trained: list[int]
    final_eos: bool


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
           max_length: int | None = None, truncation: str = "right", train_on: str = "all") -> RenderedSample:
    """Render one conversation; see :func:`render_many`."""
    return render_many([conversation], tokenizer, template=template, max_length=max_length,
                       truncation=truncation, train_on=train_on)[0]


def render_many(conversations: Iterable[Conversation], tokenizer: Any, *, template: str | None = None,
                max_length: int | None = None, truncation: str = "right", train_on: str = "all",
                on_progress: Callable[[int], None] | None = None) -> list[RenderedSample]:
    """Render conversations in batches (one tokenizer call per batch, on every core); see :func:`render_stream`."""
    with gc_paused():
        return list(render_stream(conversations, tokenizer, template=template, max_length=max_length,
                                  truncation=truncation, train_on=train_on, on_progress=on_progress))


def render_stream(conversations: Iterable[Conversation], tokenizer: Any, *, template: str | None = None,
                  max_length: int | None = None, truncation: str = "right", train_on: str = "all",
                  on_progress: Callable[[int], None] | None = None) -> Iterator[RenderedSample]:
    """Yield one :class:`RenderedSample` per conversation, in order, rendering lazily in batches.

    ``truncation="right"`` keeps the first ``max_length`` tokens; ``"drop"`` keeps no trained token of
    a sample longer than ``max_length``. Either way ``trained_tokens_lost`` counts what was cut and
    ``trainable`` is False when nothing trained is left. ``on_progress(n)`` is called after each batch.
    ``train_on="all"`` trains every assistant turn, ``"last"`` only the final one (LLaMA-Factory's
    ``mask_history``); a message's own ``train`` flag wins over either.
    While one batch is tokenized (the tokenizer releases the GIL and uses every core), the next is
    rendered to text and the previous one turned into samples, so rendering stays off the critical path.
    """
    _check_truncation(truncation)
    if train_on not in TRAIN_ON:
        raise InputError(f"unknown train-on {train_on!r}: use one of {', '.join(TRAIN_ON)}")
    layout = _layout(tokenizer, template)
    finish = partial(_finish_batch, layout=layout, max_length=max_length, drop=truncation == "drop",
                     on_progress=on_progress)
    yield from _pipelined(conversations, partial(_prepare_batch, layout=layout, train_on=train_on),
                          partial(_tokenize, layout), finish)


@dataclass(slots=True)
class RenderedPair:
    """A preference pair as training sees it: each side is the context plus that answer, rendered like a
    conversation with only the final answer (and what closes it) trained, then truncated.

    ``prompt_tokens``: the tokens both sides share before their trained spans, which start at the same index.
    ``merged_boundary``: the tokenizer merged the end of the prompt with one answer's first characters (e.g.
    MiniCPM-2B's ``<AI>`` ``>`` with a quote), so the other side's trained span starts early, at the merged
    token's place, as TRL cuts that token out of the prompt. ``problem``: why the pair cannot be trained (a key
    of :data:`PAIR_PROBLEMS`), else None.
    """

    chosen: RenderedSample
    rejected: RenderedSample
    prompt_tokens: int
    merged_boundary: bool = False
    problem: str | None = None


# Why a rendered pair cannot be trained, in the order they are checked.
PAIR_PROBLEMS = {
    "identical answers": "the chosen and the rejected answer render to the same tokens",
    "answer truncated away": "truncation at model_max_length leaves one side (or both) without a trained token",
    "no difference left": "after truncation both sides keep the same tokens: nothing tells the answers apart",
}


def render_pairs(pairs: Iterable[PreferencePair], tokenizer: Any, *, template: str | None = None,
                 max_length: int | None = None, truncation: str = "right",
                 on_progress: Callable[[int], None] | None = None) -> Iterator[RenderedPair]:
    """Yield one :class:`RenderedPair` per pair, in order, rendering lazily in batches.

    Each side's ids are the chat template's rendering of the context plus that answer, as :func:`render_stream`
    gives them; the trained span of both sides starts where the sides' ids first differ from the ids of the
    shared prompt (the text before the answer, tokenized alone) and ends with the token covering the answer's
    last character plus what closes the turn. The sides are compared at full length, then truncated by the
    same policy as any sample. ``on_progress(n)`` is called with the pairs done after each batch.
    """
    _check_truncation(truncation)
    layout = _layout(tokenizer, template)
    finish = partial(_finish_pairs, layout=layout, max_length=max_length, drop=truncation == "drop",
                     on_progress=on_progress)
    yield from _pipelined(pairs, partial(_prepare_pairs, layout=layout), partial(_tokenize_pairs, layout), finish)


def _pair(chosen: RenderedSample, rejected: RenderedSample, prompt_tokens: int, merged: bool,
          max_length: int | None, drop: bool) -> RenderedPair:
    """Compare the full renderings of both sides, then truncate them; the first problem found, if any."""
    problem = "identical answers" if chosen.input_ids == rejected.input_ids else None
    chosen, rejected = _truncated(chosen, max_length, drop), _truncated(rejected, max_length, drop)
    if problem is None and not (chosen.trainable and rejected.trainable):
        problem = "answer truncated away"
    elif problem is None and chosen.input_ids == rejected.input_ids:
        problem = "no difference left"
    return RenderedPair(chosen, rejected, prompt_tokens, merged, problem)


def render_prompt(conversation: Conversation, tokenizer: Any, template: str | None = None) -> list[int]:
    """Ids of a conversation without its answer, ending with the assistant generation prompt."""
    layout = _layout(tokenizer, template)
    shape = layout.shape(tuple(m.role for m in conversation.messages), True, conversation)
    ids = layout.encode([_join(shape.parts, layout.contents(conversation.messages))])[0].ids
    _drop_double_bos(ids, layout.bos_id)
    return ids


# --- layouts --------------------------------------------------------------------------------------


class _Layout:
    """Literal parts around message contents, what closes a trained assistant turn, and encoding."""

    name: str
    final_eos = False  # whether a trained eos id follows a final assistant turn

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.shapes: dict[tuple, _Shape] = {}  # by (roles, generation_prompt)

    def shape(self, roles: tuple[str, ...], generation_prompt: bool, example: Conversation) -> "_Shape":
        """The cached plan for one sequence of roles (``example`` checks it the first time)."""
        key = (roles, generation_prompt)
        shape = self.shapes.get(key)
        if shape is None:
            parts = self.build_parts(roles, generation_prompt, example)
            starts = list(accumulate(len(part) for part in parts[:-1]))
            ends = [start + self.closing(part) for start, part in zip(starts, parts[1:])]
            trained = [i for i, role in enumerate(roles) if role == "assistant"]
            final_eos = self.final_eos and bool(roles) and roles[-1] == "assistant" and not generation_prompt
            shape = self.shapes[key] = _Shape(parts, starts, ends, trained, final_eos)
        return shape

    def build_parts(self, roles: tuple[str, ...], generation_prompt: bool, example: Conversation) -> list[str]:
        raise NotImplementedError

    def contents(self, messages: Sequence[Any]) -> list[str]:
        """The message contents as the layout writes them."""
        return [m.content for m in messages]

    def closing(self, following_part: str) -> int:
        """How many characters of the part after an assistant content are trained with it."""
        raise NotImplementedError

    def trained_end(self, ids: list[int], tail: str) -> int:
        """Where the trained span of a final answer ends in its side's ``ids``: after the token covering the
        answer's last character and what closes the turn; ``tail`` is the text the layout writes after them."""
        raise NotImplementedError

    def encode(self, texts: list[str], offsets: bool = True) -> list[Any]:
        """The tokenizer with its default special tokens: a ``tokenizers.Encoding`` per text (``offsets=False``:
        without character offsets, which the backend then does not compute, where it can).

        Calls the Rust backend directly (what ``tokenizer(texts)`` does after its own checks) unless
        the backend carries truncation, padding or special-token settings that the wrapper would reset.
        """
        backend = self.tokenizer.backend_tokenizer
        if (backend.truncation is None and backend.padding is None
                and backend.encode_special_tokens == bool(getattr(self.tokenizer, "split_special_tokens", False))):
            encode = backend.encode_batch if offsets else getattr(backend, "encode_batch_fast", backend.encode_batch)
            return encode(texts, add_special_tokens=True)
        return self.tokenizer(texts, return_attention_mask=False, return_token_type_ids=False).encodings


class _ChatML(_Layout):
    name = "chatml"

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        if not _is_single_token(tokenizer, IM_END):
            raise TokenizerError(f"tokenizer {_name(tokenizer)} has no {IM_END} token: it is not a ChatML tokenizer")
        self.im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
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

    def trained_end(self, ids: list[int], tail: str) -> int:
        # <|im_end|> is one special token, so nothing merges across it: the span ends at the closing one.
        end = len(ids)
        for _ in range(tail.count(IM_END) + 1):
            try:
                end = _last_index(ids, self.im_end_id, end)
            except ValueError:
                raise TokenizerError(f"tokenizer {_name(self.tokenizer)} does not encode {IM_END} as one token in "
                                     "the rendered text: cannot map trained tokens exactly") from None
        return end + 1


class _MiniCPM2(_Layout):
    name = "minicpm2"
    final_eos = True
    # What MiniCPM-2B's template writes before and after each role's (stripped) content.
    _around = {"system": ("", ""), "user": (USER_MARKER, AI_MARKER), "assistant": ("", "")}

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        if tokenizer.eos_token_id is None:
            raise TokenizerError(f"tokenizer {_name(tokenizer)} has no eos token for the minicpm2 layout")

    def build_parts(self, roles: tuple[str, ...], generation_prompt: bool, example: Conversation) -> list[str]:
        unknown = sorted(set(roles) - set(self._around))
        if unknown:
            raise InputError(f"the minicpm2 layout has no place for role(s) {', '.join(unknown)}")
        parts, after = [], ""
        for role in roles:
            before, next_after = self._around[role]
            parts.append(after + before)
            after = next_after
        # The template has no generation prompt: a user turn already ends with <AI>.
        return parts + [after or (AI_MARKER if generation_prompt else "")]

    def contents(self, messages: Sequence[Any]) -> list[str]:
        return [m.content.strip() for m in messages]

    def closing(self, following_part: str) -> int:
        return 0

    def trained_end(self, ids: list[int], tail: str) -> int:
        return len(ids)  # the final answer ends the text; the trained </s> is appended after it

    def encode(self, texts: list[str], offsets: bool = True) -> list[Any]:
        encodings = super().encode(texts, offsets)
        if self.bos_id is not None:  # the layout starts with <s>: a tokenizer that adds none is not MiniCPM-2's
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


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic objects (ids, labels).

    Generational collections triggered by millions of fresh lists would rescan every live sample
    again and again; nothing built here forms a cycle, so reference counting frees it all.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _join(parts: Sequence[str], contents: Sequence[str]) -> str:
    return "".join(chain.from_iterable(zip(parts, contents))) + parts[-1]


def _batched(items: Iterable[Conversation], size: int) -> Iterator[list[Conversation]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _trained_messages(messages: Sequence[Any], assistants: list[int], train_on: str) -> list[int]:
    """Which assistant messages are trained: a message's ``train`` flag, else ``train_on``."""
    if train_on == "all" and all(messages[i].train is None for i in assistants):
        return assistants
    last = assistants[-1] if assistants else None
    return [i for i in assistants
            if messages[i].train or (messages[i].train is None and (train_on == "all" or i == last))]


def _prepare_batch(conversations: list[Conversation], layout: _Layout,
                   train_on: str) -> tuple[list[str], list[tuple]]:
    """The text of each conversation, where its trained spans and its messages end (characters), and
    whether a final eos follows (``None``: no; else whether it is trained)."""
    texts, plans = [], []
    shapes, shape_of, contents_of = layout.shapes, layout.shape, layout.contents
    for conversation in conversations:
        messages = conversation.messages
        contents = contents_of(messages)
        roles = tuple([m.role for m in messages])
        shape = shapes.get((roles, False)) or shape_of(roles, False, conversation)
        texts.append(_join(shape.parts, contents))
        # Message i's content starts at starts[i] plus the lengths of the contents before it.
        before = [0, *accumulate(map(len, contents))]
        ends = [base + length for base, length in zip(shape.ends, before[1:])]
        trained = _trained_messages(messages, shape.trained, train_on)
        final_eos = (bool(trained) and trained[-1] == len(messages) - 1) if shape.final_eos else None
        plans.append(([(shape.starts[i] + before[i], ends[i]) for i in trained], ends, final_eos))
    return texts, plans


def _check_truncation(truncation: str) -> None:
    if truncation not in TRUNCATIONS:
        raise InputError(f"unknown truncation {truncation!r}: use one of {', '.join(TRUNCATIONS)}")


def _pipelined(items: Iterable[Any], prepare: Callable[[list], tuple], tokenize: Callable[..., Any],
               finish: Callable[[Any], list]) -> Iterator[Any]:
    """``finish(tokenize(*prepare(batch)))`` per batch of ``BATCH_SIZE`` items, in order, with ``tokenize`` in a
    background thread: the tokenizer releases the GIL and uses every core while the next batches are prepared
    and the previous one finished, so only :data:`IN_FLIGHT` batches are held at once."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="minicpm-tokenize") as tokenizer_thread:
        pending: deque[Future] = deque()
        for batch in _batched(items, BATCH_SIZE):
            with gc_paused():
                prepared = prepare(batch)
            pending.append(tokenizer_thread.submit(tokenize, *prepared))
            if len(pending) == IN_FLIGHT:
                yield from finish(pending.popleft().result())
        while pending:
            yield from finish(pending.popleft().result())


def _finish_batch(tokenized: list[tuple], *, layout: _Layout, max_length: int | None, drop: bool,
                  on_progress: Callable[[int], None] | None) -> list[RenderedSample]:
    eos = layout.tokenizer.eos_token_id if layout.final_eos else None
    with gc_paused():
        samples = [_sample(ids, ranges, turn_ends, None if final_eos is None else eos, bool(final_eos), layout.bos_id,
                           max_length, drop)
                   for ids, ranges, turn_ends, final_eos in tokenized]
    if on_progress is not None:
        on_progress(len(samples))
    return samples


def _tokenize(layout: _Layout, texts: list[str], plans: list[tuple]) -> list[tuple[list[int], list, list, Any]]:
    """Everything asked of the tokenizer for a batch: per text its ids, the token ranges of its trained
    character spans, the token index where each message ends (the offsets are read here, then the
    encodings are let go), and the plan's final eos."""
    tokenized = []
    for encoding, (spans, ends, final_eos) in zip(layout.encode(texts), plans):
        ranges = []
        for start_char, end_char in spans:
            first = _token_at(encoding, start_char, end_char, forward=True)
            if first is not None:
                ranges.append((first, _token_at(encoding, start_char, end_char, forward=False) + 1))
        turn_ends = [_token_end(encoding, char) for char in ends[:-1]] + [0] * bool(ends)  # last: set by _sample
        tokenized.append((encoding.ids, ranges, turn_ends, final_eos))
    return tokenized


def _prepare_pairs(pairs: list[PreferencePair], layout: _Layout) -> tuple[list[str], list[str], list[tuple]]:
    """The shared prompt of each pair (its side's text before the answer), both sides' texts (chosen, rejected,
    next pair's...), and per pair where its context's turns end (characters) and the text after the answers."""
    prompts, sides, plans = [], [], []
    shapes, shape_of, contents_of = layout.shapes, layout.shape, layout.contents
    for pair in pairs:
        messages = [*pair.messages, pair.chosen]
        contents = contents_of(messages)
        roles = tuple([m.role for m in messages])
        shape = shapes.get((roles, False)) or shape_of(roles, False, Conversation(messages))
        chosen, tail = _join(shape.parts, contents), shape.parts[-1]
        prompt = chosen[:len(chosen) - len(contents[-1]) - len(tail)]
        prompts.append(prompt)
        sides += (chosen, prompt + contents_of([pair.rejected])[0] + tail)
        ends = [base + length for base, length in zip(shape.ends, accumulate(map(len, contents[:-1])))]
        plans.append((ends, tail[layout.closing(tail):]))
    return prompts, sides, plans


def _tokenize_pairs(layout: _Layout, prompts: list[str], sides: list[str],
                    plans: list[tuple]) -> list[tuple[list[int], list[int], list[int], list[int], str]]:
    """Everything asked of the tokenizer for a batch of pairs: the prompts with offsets (read here: where the
    context's turns end), the sides without (their ids only, the tokenizer's cheapest call)."""
    ids = [encoding.ids for encoding in layout.encode(sides, offsets=False)]
    return [(encoding.ids, [_token_end(encoding, char) for char in ends], ids[2 * i], ids[2 * i + 1], tail)
            for i, (encoding, (ends, tail)) in enumerate(zip(layout.encode(prompts), plans))]


def _finish_pairs(tokenized: list[tuple], *, layout: _Layout, max_length: int | None, drop: bool,
                  on_progress: Callable[[int], None] | None) -> list[RenderedPair]:
    """Each pair's trained span, on both sides from the first token that is not the prompt's own: a token the
    tokenizer merged across the prompt's end belongs to that side's answer, and the other side trains the
    prompt token in its place, so both score their answers after the same shared prompt."""
    eos, bos = (layout.tokenizer.eos_token_id if layout.final_eos else None), layout.bos_id
    pairs = []
    with gc_paused():
        for prompt, turn_ends, chosen, rejected, tail in tokenized:
            if _drop_double_bos(prompt, bos):
                turn_ends = [end - 1 for end in turn_ends]
            for ids in (chosen, rejected):
                _drop_double_bos(ids, bos)
            own = [_shared_length(chosen, prompt), _shared_length(rejected, prompt)]
            start = min(own)
            turn_ends = [min(end, start) for end in turn_ends] + [0]
            sides = [_sample(ids, [(start, layout.trained_end(ids, tail))], turn_ends.copy(), eos, True, None, None,
                             False) for ids in (chosen, rejected)]
            pairs.append(_pair(*sides, start, own[0] != own[1], max_length, drop))
    if on_progress is not None:
        on_progress(len(pairs))
    return pairs


def _sample(ids: list[int], trained_ranges: list[tuple[int, int]], turn_ends: list[int], eos: int | None,
            eos_trained: bool, bos: int | None, max_length: int | None, drop: bool) -> RenderedSample:
    """Labels, the final eos (``eos`` given; trained with the final turn), one ``<s>`` at most, and the
    truncation policy."""
    if _drop_double_bos(ids, bos):
        trained_ranges = [(first - 1, last - 1) for first, last in trained_ranges]
        turn_ends = [end - 1 for end in turn_ends]
    labels = [IGNORE_INDEX] * len(ids)
    trained = 0
    for first, last in trained_ranges:
        labels[first:last] = ids[first:last]
        trained += last - first
    if eos is not None:
        ids.append(eos)
        labels.append(eos if eos_trained else IGNORE_INDEX)
        trained += eos_trained
    if turn_ends:  # the last message's turn runs to the end of the sample
        turn_ends[-1] = len(ids)
    return _truncated(RenderedSample(ids, labels, len(ids), trained, 0, turn_ends), max_length, drop)


def _truncated(sample: RenderedSample, max_length: int | None, drop: bool) -> RenderedSample:
    """The truncation policy, applied in place to a full rendering: keep the first ``max_length`` tokens
    (``drop``: and train none of them); ``trained_tokens_lost`` counts the trained tokens cut."""
    if max_length is not None and len(sample.input_ids) > max_length:
        sample.input_ids, sample.labels = sample.input_ids[:max_length], sample.labels[:max_length]
        if drop:
            sample.labels = [IGNORE_INDEX] * max_length
        sample.trained_tokens_lost = sample.trained_tokens - (max_length - sample.labels.count(IGNORE_INDEX))
    return sample


def _drop_double_bos(ids: list[int], bos: int | None) -> bool:
    """Keep one ``<s>`` when both the template and the tokenizer put it first; True if one was dropped."""
    if len(ids) > 1 and ids[0] == ids[1] == bos:
        del ids[0]
        return True
    return False


def _shared_length(ids: list[int], prefix: list[int]) -> int:
    """How many of ``prefix``'s ids ``ids`` starts with."""
    if ids[:len(prefix)] == prefix:
        return len(prefix)
    return next((i for i, (a, b) in enumerate(zip(ids, prefix)) if a != b), min(len(ids), len(prefix)))


def _last_index(ids: list[int], token: int, end: int) -> int:
    """The index of the last ``token`` in ``ids[:end]`` (ValueError if none)."""
    for index in range(end - 1, -1, -1):
        if ids[index] == token:
            return index
    raise ValueError(token)


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
