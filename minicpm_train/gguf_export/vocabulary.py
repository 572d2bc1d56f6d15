"""The tokenizer a run trained with, as llama.cpp's GGUF vocabulary (``tokenizer.ggml.*``).

The source of truth is the tokenizer :func:`minicpm_data.tokenizer.load_tokenizer` gives for the folder: the one
training, ``stats``, ``chat`` and ``eval`` used. (llama.cpp's converter instead re-reads whichever files it finds;
for MiniCPM-2B that is ``tokenizer.model``, for a fast-only folder ``tokenizer.json``.) Two kinds exist:

- SentencePiece-style (MiniCPM-1/2/3/4: BPE with byte fallback over ``▁``-escaped text) becomes llama.cpp's
  ``llama`` tokenizer. It merges the adjacent pair whose result has the highest score, so each token's score is
  minus the rank of the merge that makes it; added tokens are CONTROL (special) or USER_DEFINED (the rest, which
  both libraries split out of the text before merging); ``<0xXX>`` pieces are BYTE. Whether a ``▁`` is put before
  the text (and after every added token) is read off the tokenizer itself.
- byte-level BPE (MiniCPM5, the ChatML fixture) becomes llama.cpp's ``gpt2`` tokenizer with the merges, and the
  pre-tokenizer named as llama.cpp knows it: ``gpt-2`` for the plain ByteLevel regex, otherwise by the hash of
  the ids of llama.cpp's own probe text (its ``get_vocab_base_pre``), e.g. ``minicpm5``.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from hashlib import sha256

from minicpm_train.gguf_export.weights import ExportError

SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# llama.cpp's probe text for BPE pre-tokenizers (convert_hf_to_gguf.py, get_vocab_base_pre), and the hashes of the
# ids it gives for the MiniCPM tokenizers llama.cpp knows.
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",  # openbmb/MiniCPM5-1B
}


@dataclass
class Vocabulary:
    model: str  # "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]  # bos, eos, unk, pad, eot
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None

    def write(self, writer, chat_template: str) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_chat_template(chat_template)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts ``<s>`` before a text by itself (MiniCPM-1/2/3/4 do; MiniCPM5's template writes it)."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def build_vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """``tokenizer`` (a fast tokenizer from ``load_tokenizer``) as a GGUF vocabulary of ``vocab_size`` ids (the
    model's embedding rows; ids the tokenizer does not use are written as unused ``[PADn]`` tokens)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)}, but the model's vocabulary is {vocab_size}: "
                          "they do not belong together")
    added = {item["id"]: item for item in backend.get("added_tokens", [])}
    if model.get("type") != "BPE":
        raise ExportError(f"a {model.get('type')} tokenizer cannot be exported: GGUF export handles BPE tokenizers "
                          "(SentencePiece-style with byte fallback, or byte-level)")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    specials = _special_ids(tokenizer)
    ids = tokenizer("a")["input_ids"]
    add_eos = tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id
    if model.get("byte_fallback"):
        return _sentencepiece_style(tokenizer, by_id, added, merges, vocab_size, specials, adds_bos(tokenizer), add_eos)
    if _is_byte_level(backend):
        return _byte_level(tokenizer, backend, by_id, added, merges, vocab_size, specials, adds_bos(tokenizer),
                           add_eos)
    raise ExportError("the tokenizer is neither SentencePiece-style (BPE with byte fallback) nor byte-level BPE: "
                      "llama.cpp has no tokenizer that would split text the same way")


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {kind: getattr(tokenizer, f"{kind}_token_id") for kind in ("bos", "eos", "unk", "pad")}
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(turn_end, int) and turn_end not in (tokenizer.unk_token_id, tokenizer.eos_token_id):
        ids["eot"] = turn_end  # generation stops at the end of a ChatML turn
    return {kind: token_id for kind, token_id in ids.items() if token_id is not None}


def _token_type(token_id: int, token: str, added: dict, unk_id: int | None, *, space_prefix: bool = False) -> int:
    """GGUF token type. With a space prefix (SentencePiece-style), an added single ASCII punctuation mark (MiniCPM-2B
    has ``.`` ``!`` ``?`` ``-`` ``=`` ``+``) is a NORMAL piece, not a split-off USER_DEFINED token: the text after
    a split-off token gets a ``▁`` from llama.cpp even when it starts with a space, where the HF tokenizer adds
    none; after these marks a space is the rule (``. Next``), after CJK punctuation and newlines it is not."""
    from gguf import TokenType

    if token_id == unk_id:
        return TokenType.UNKNOWN
    if token.startswith("<0x") and _BYTE_PIECE.fullmatch(token):
        return TokenType.BYTE
    if token_id in added:
        if added[token_id].get("special"):
            return TokenType.CONTROL
        if space_prefix and len(token) == 1 and token in string.punctuation:
            return TokenType.NORMAL
        return TokenType.USER_DEFINED
    return TokenType.NORMAL


def _sentencepiece_style(tokenizer, by_id, added, merges, vocab_size, specials, add_bos, add_eos) -> Vocabulary:
    from gguf import TokenType

    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])[0]
    space_prefix = first.startswith(SPACE)
    rank_of = {}
    for rank, (left, right) in enumerate(merges):
        rank_of.setdefault(left + right, rank)
    tokens, types, scores = [], [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
            scores.append(-1e9)
            continue
        kind = _token_type(token_id, token, added, tokenizer.unk_token_id, space_prefix=space_prefix)
        if kind == TokenType.USER_DEFINED:
            token = token.replace(SPACE, " ")  # llama.cpp matches user-defined tokens in the raw text
        tokens.append(token)
        types.append(kind)
        scores.append(-float(rank_of[token]) if token in rank_of else (0.0 if len(token) == 1 else -1e9))
    return Vocabulary("llama", "default", tokens, types, scores, [], specials, add_bos, add_eos,
                      add_space_prefix=space_prefix)


def _is_byte_level(backend: dict) -> bool:
    def types(node):
        if not node:
            return []
        return [node["type"], *(t for child in node.get("pretokenizers", []) for t in types(child))]

    return "ByteLevel" in types(backend.get("pre_tokenizer")) and (backend.get("decoder") or {}).get("type") == "ByteLevel"


def _byte_level(tokenizer, backend, by_id, added, merges, vocab_size, specials, add_bos, add_eos) -> Vocabulary:
    from gguf import TokenType

    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        tokens.append(token if token is not None else f"[PAD{token_id}]")
        types.append(TokenType.UNUSED if token is None else _token_type(token_id, token, added, None))
    # spaces inside a merge's parts are written as U+0120 + 256, as gguf.SpecialVocab does
    encode = lambda part: "".join(chr(ord(c) + 256) if c == " " else c for c in part)  # noqa: E731
    merge_lines = [f"{encode(left)} {encode(right)}" for left, right in merges]
    return Vocabulary("gpt2", _pre_tokenizer(tokenizer, backend), tokens, types, None, merge_lines, specials,
                      add_bos, add_eos, add_space_prefix=None)


def _pre_tokenizer(tokenizer, backend: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer regex."""
    pre = backend.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # the GPT-2 regex, which llama.cpp's "gpt-2" pre-tokenizer uses
    digest = sha256(str(tokenizer(PRE_TOKENIZER_PROBE)["input_ids"]).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    raise ExportError(f"the tokenizer's pre-tokenizer is not one llama.cpp is known to reproduce (probe hash "
                      f"{digest[:16]}...); known: gpt-2, {', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))}")
