"""render_pairs(): both sides equal the real tokenizers' chat templates; only the final answer is trained;
a tokenizer merge across the prompt's end is scored from the shared prefix; pairs that cannot be trained say
why (identical answers, truncation)."""

from __future__ import annotations

import pytest

from minicpm_data.conversation import Conversation, Message, PreferencePair
from minicpm_data.render import IGNORE_INDEX, render, render_pairs, render_prompt
from minicpm_data.tokenizer import load_tokenizer


def pair(context, chosen, rejected) -> PreferencePair:
    return PreferencePair([Message(role, content) for role, content in context], Message("assistant", chosen),
                          Message("assistant", rejected))


PAIRS = [
    pair([("user", "What is 2+2?")], "4", "5"),
    pair([("system", "你是一个有帮助的助手。"), ("user", "你好，世界！")], "你好！有什么可以帮你的吗？", "走开。"),
    pair([("system", "s"), ("user", "q1"), ("assistant", "a1"), ("user", "emoji 😀 ok?")], "👍 sure 🚀", "no"),
    pair([("user", "Name a colour.")], "Blue, like the sky on a clear day.", "Blue."),
]


@pytest.fixture(scope="module")
def real(shared_dir):
    return {name: load_tokenizer(str(shared_dir / "tokenizers" / name)) for name in ("minicpm4", "minicpm3", "minicpm2b")}


@pytest.fixture(scope="module")
def fixture_tokenizers(fixtures_dir):
    return {name: load_tokenizer(str(fixtures_dir / "tokenizers" / name)) for name in ("chatml", "minicpm2")}


def _template_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template([m.to_dict() for m in messages], tokenize=False)
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("name", ["minicpm4", "minicpm3", "minicpm2b"])
def test_each_side_is_the_real_chat_template_and_only_its_answer_is_trained(real, name):
    tokenizer = real[name]
    eos = [tokenizer.eos_token_id] if name == "minicpm2b" else []  # MiniCPM-2's trained </s> after the answer
    closing = tokenizer.eos_token_id if name == "minicpm2b" else tokenizer.convert_tokens_to_ids("<|im_end|>")
    rendered = list(render_pairs(PAIRS, tokenizer))
    assert len(rendered) == len(PAIRS)
    for item, result in zip(PAIRS, rendered):
        assert result.problem is None
        prompt = render_prompt(Conversation(item.messages), tokenizer)  # the context + the generation prompt
        assert result.prompt_tokens == len(prompt)
        for answer, sample in ((item.chosen, result.chosen), (item.rejected, result.rejected)):
            assert sample.input_ids == _template_ids(tokenizer, [*item.messages, answer]) + eos
            assert sample.input_ids[:result.prompt_tokens] == prompt
            assert sample.labels[:result.prompt_tokens] == [IGNORE_INDEX] * result.prompt_tokens
            trained = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
            # One block: the final answer and what closes it (ChatML's newline after <|im_end|> is not trained).
            assert trained == sample.input_ids[result.prompt_tokens:result.prompt_tokens + len(trained)]
            assert trained[-1] == closing and trained.count(closing) == 1
            # The same sample as rendering the side as a conversation with only its last turn trained.
            side = render(Conversation([*item.messages, answer]), tokenizer, train_on="last")
            assert (side.input_ids, side.labels, side.turn_ends) == (sample.input_ids, sample.labels, sample.turn_ends)


def _assert_scored_from_the_shared_prefix(tokenizer, item, merged_side):
    """A pair whose ``merged_side`` answer merges with the prompt's last token: both sides are still the chat
    template's ids; the merged token is trained on its side and the prompt token it replaced on the other, so
    both trained spans start after the same shared prefix, and each runs to the answer's end and the trained </s>."""
    result = next(render_pairs([item], tokenizer))
    assert result.problem is None and result.merged_boundary
    prompt = render_prompt(Conversation(item.messages), tokenizer)
    assert result.prompt_tokens == len(prompt) - 1  # the prompt's last token is the one merged away
    sides = {"chosen": (item.chosen, result.chosen), "rejected": (item.rejected, result.rejected)}
    for name, (answer, sample) in sides.items():
        assert sample.input_ids == _template_ids(tokenizer, [*item.messages, answer]) + [tokenizer.eos_token_id]
        assert sample.input_ids[:result.prompt_tokens] == prompt[:-1]
        assert sample.labels[:result.prompt_tokens] == [IGNORE_INDEX] * result.prompt_tokens
        assert sample.labels[result.prompt_tokens:] == sample.input_ids[result.prompt_tokens:]  # to the end, </s> too
        # The side rendered alone (offsets: from the token covering the answer's first character to the one
        # covering its last) trains the same tokens, but for the other side's merged place.
        alone = render(Conversation([*item.messages, answer]), tokenizer, train_on="last").labels
        if name == merged_side:
            assert sample.labels == alone
            assert sample.input_ids[result.prompt_tokens] != prompt[-1]
        else:
            assert sample.input_ids[result.prompt_tokens] == prompt[-1]
            assert alone[result.prompt_tokens] == IGNORE_INDEX and sample.labels[result.prompt_tokens + 1:] == alone[
                result.prompt_tokens + 1:]
    return result


def test_minicpm2b_scores_a_pair_whose_answer_merges_with_the_prompt(real):
    """MiniCPM-2B's tokenizer merges <AI>'s ">" with an answer's opening quote ('>"' is one token)."""
    tokenizer = real["minicpm2b"]
    context = [("user", "Quote it.")]
    result = _assert_scored_from_the_shared_prefix(tokenizer, pair(context, '"Carpe diem."', "Carpe diem."), "chosen")
    assert tokenizer.convert_ids_to_tokens(result.chosen.input_ids[result.prompt_tokens]) == '>"'
    swapped = _assert_scored_from_the_shared_prefix(tokenizer, pair(context, "Carpe diem.", '"Carpe diem."'), "rejected")
    assert swapped.prompt_tokens == result.prompt_tokens
    # ChatML's "assistant\n" never merges with the answer.
    chatml = next(render_pairs([pair(context, '"Carpe diem."', "Carpe diem.")], real["minicpm4"]))
    assert chatml.problem is None and not chatml.merged_boundary


def test_a_merged_boundary_pair_on_the_fixture_tokenizer(fixture_tokenizers):
    """The tiny MiniCPM-2-style tokenizer merges "<AI>"'s ">" with "H" ('>H'): the same handling, everywhere."""
    tokenizer = fixture_tokenizers["minicpm2"]
    context = [("user", "Say hi.")]
    result = _assert_scored_from_the_shared_prefix(tokenizer, pair(context, "Hello there.", "Bye."), "chosen")
    assert tokenizer.convert_ids_to_tokens(result.chosen.input_ids[result.prompt_tokens]) == ">H"
    plain = next(render_pairs([pair(context, "Sure.", "Bye.")], tokenizer))
    assert not plain.merged_boundary
    assert plain.prompt_tokens == len(render_prompt(Conversation([Message("user", "Say hi.")]), tokenizer))


@pytest.mark.parametrize("layout", ["chatml", "minicpm2"])
def test_problems_identical_answers_truncation_and_no_difference_left(fixture_tokenizers, layout):
    tokenizer = fixture_tokenizers[layout]
    context = [("user", "Tell me about the sea and the sky.")]
    same = pair(context, "The same answer.", "The same answer.")
    tail = pair(context, "alpha beta gamma delta epsilon zeta", "alpha beta gamma delta epsilon theta")
    full = next(render_pairs([tail], tokenizer))
    assert full.problem is None
    shared = next(i for i, (a, b) in enumerate(zip(full.chosen.input_ids, full.rejected.input_ids)) if a != b)
    assert shared > full.prompt_tokens + 1
    results = list(render_pairs([same, tail, tail, tail], tokenizer, max_length=shared))
    assert results[0].problem == "identical answers"
    assert results[1].problem == "no difference left"  # both keep only their common beginning
    assert results[1].chosen.trainable and results[1].chosen.input_ids == results[1].rejected.input_ids
    cut = next(render_pairs([tail], tokenizer, max_length=full.prompt_tokens))
    assert cut.problem == "answer truncated away" and not cut.chosen.trainable
    dropped = next(render_pairs([tail], tokenizer, max_length=shared + 1, truncation="drop"))
    assert dropped.problem == "answer truncated away"
    kept = next(render_pairs([tail], tokenizer, max_length=shared + 1))
    assert kept.problem is None and kept.chosen.trained_tokens_lost > 0  # one differing token left: trainable


def test_pairs_stream_in_order_across_batches_and_report_progress(fixture_tokenizers, monkeypatch):
    import minicpm_data.render as render_module

    monkeypatch.setattr(render_module, "BATCH_SIZE", 4)  # 2 pairs per batch
    tokenizer = fixture_tokenizers["chatml"]
    pairs = [pair([("user", f"q{i}")], f"yes {i}", f"no {i}") for i in range(7)]
    done = []
    results = list(render_pairs(pairs, tokenizer, on_progress=done.append))
    assert [tokenizer.decode(r.chosen.input_ids).count(f"yes {i}") for i, r in enumerate(results)] == [1] * 7
    assert sum(done) == 7 and all(r.problem is None for r in results)


@pytest.mark.parametrize("name", ["minicpm4", "minicpm3", "minicpm2b"])
def test_real_preference_data_renders_as_the_real_chat_templates(real, fixtures_dir, tmp_path, name):
    """LLaMA-Factory's demo pairs (fixtures/realdata), converted, on each real tokenizer: every side's ids are the
    chat template's, and both sides share their prompt ids."""
    from minicpm_data.convert import convert_files
    from minicpm_data.io import read_examples

    tokenizer = real[name]
    eos = [tokenizer.eos_token_id] if name == "minicpm2b" else []
    files = [fixtures_dir / "realdata" / file for file in ("dpo_en_demo.head.jsonl", "dpo_zh_demo.sample.jsonl")]
    pairs = [item for _, item in read_examples(convert_files(files, tmp_path / "pairs.jsonl").output, "pairs")]
    assert len(pairs) == 12
    for pair, rendered in zip(pairs, render_pairs(pairs, tokenizer)):
        assert rendered.problem is None
        for answer, sample in ((pair.chosen, rendered.chosen), (pair.rejected, rendered.rejected)):
            assert sample.input_ids == _template_ids(tokenizer, [*pair.messages, answer]) + eos
            assert set(sample.labels[:rendered.prompt_tokens]) == {IGNORE_INDEX}
            assert sample.input_ids[:rendered.prompt_tokens] == rendered.chosen.input_ids[:rendered.prompt_tokens]
