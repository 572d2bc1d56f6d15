"""render(): ids equal the tokenizer's own chat-template rendering; labels cover every answer and its end."""

from __future__ import annotations

import pytest

from minicpm_data.conversation import Conversation, Message
from minicpm_data.errors import InputError, TokenizerError
from minicpm_data.render import (IGNORE_INDEX, MINICPM_CHATML_TEMPLATE, detect_template, render, render_many,
                                  render_prompt)
from minicpm_data.tokenizer import load_tokenizer


def conv(*pairs: tuple[str, str]) -> Conversation:
    return Conversation([Message(role, content) for role, content in pairs])


CASES = [
    conv(("user", "Hello"), ("assistant", "Hi there.")),
    conv(("system", "You are a helpful assistant."), ("user", "What is 2+2?"), ("assistant", "4")),
    conv(("user", "你好，世界！"), ("assistant", "你好！有什么可以帮你的吗？"), ("user", "今天天气很好。"),
         ("assistant", "是的，很适合出门。")),
    conv(("system", "系统提示"), ("user", "emoji 😀🎉 ok?"), ("assistant", "👍 sure 🚀")),
    conv(("user", "  leading and trailing spaces  "), ("assistant", "  padded answer  ")),
    conv(("user", "\nnewlines\n\ninside\n"), ("assistant", "\n\nline one\nline two\n\n"), ("user", "more"),
         ("assistant", " x ")),
    conv(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e"),
         ("assistant", "<用户> and <AI> as text, 中英 mixed English")),
    conv(("user", "empty answer next"), ("assistant", "")),
]
CHATML_DIRS = ["minicpm4", "minicpm3"]


@pytest.fixture(scope="module")
def real_tokenizers(shared_dir):
    return {name: load_tokenizer(str(shared_dir / "tokenizers" / name)) for name in CHATML_DIRS}


@pytest.fixture(scope="module")
def fixture_tokenizers(fixtures_dir):
    return {name: load_tokenizer(str(fixtures_dir / "tokenizers" / name)) for name in ("chatml", "minicpm2")}


def _template_ids(tokenizer, conversation, generation_prompt=False, template=None):
    """The oracle: render with the tokenizer's own template, tokenize with its defaults."""
    text = tokenizer.apply_chat_template([m.to_dict() for m in conversation.messages], tokenize=False,
                                         add_generation_prompt=generation_prompt, chat_template=template)
    return text, tokenizer(text)["input_ids"]


CHATML_HEADER = "<|im_start|>{role}\n"


def _expected_labels(tokenizer, conversation, closing, template=None, trained=None):
    """Independent oracle for labels: tokens whose offsets overlap an answer (+ closing) span.

    Each content is found in the template's text right after its role header, after the previous one.
    ``trained``: the indices of the trained messages (default: every assistant message).
    """
    text, _ = _template_ids(tokenizer, conversation, template=template)
    spans, cursor, previous = [], 0, None
    for index, message in enumerate(conversation.messages):
        header = (CHATML_HEADER.format(role=message.role) if closing
                  else "<用户>" if message.role == "user" else "<AI>" if previous == "user" else "")
        previous = message.role
        content = message.content if closing else message.content.strip()  # MiniCPM-2's template strips
        start = text.index(header + content, cursor) + len(header)
        end = start + len(content)
        if message.role == "assistant" and (trained is None or index in trained):
            spans.append((start, end + len(closing)))
        cursor = end
    encoding = tokenizer(text, return_offsets_mapping=True)
    return [token if any(s < b and a < e for s, e in spans) else IGNORE_INDEX
            for token, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"])]


@pytest.mark.parametrize("name", CHATML_DIRS)
def test_real_chatml_ids_match_template_rendering(real_tokenizers, name):
    tokenizer = real_tokenizers[name]
    assert detect_template(tokenizer) == "chatml"
    for conversation in CASES:
        sample = render(conversation, tokenizer)
        _, expected = _template_ids(tokenizer, conversation)
        assert sample.input_ids == expected
        # apply_chat_template(tokenize=True) adds no special tokens: the same ids after the tokenizer's <s>.
        assert sample.input_ids == [tokenizer.bos_token_id] + tokenizer.apply_chat_template(
            [m.to_dict() for m in conversation.messages], tokenize=True, return_dict=False)
        assert sample.input_ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("name", CHATML_DIRS)
def test_real_chatml_labels_cover_every_answer_and_its_im_end(real_tokenizers, name):
    tokenizer = real_tokenizers[name]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for conversation in CASES:
        sample = render(conversation, tokenizer)
        assert sample.labels == _expected_labels(tokenizer, conversation, "<|im_end|>")
        answers = sum(m.role == "assistant" for m in conversation.messages)
        assert sample.labels.count(im_end) == answers  # middle answers end with a trained <|im_end|> too
        assert sample.trained_tokens == len(sample.labels) - sample.labels.count(IGNORE_INDEX)


def test_trained_text_is_the_answer_plus_im_end(real_tokenizers):
    tokenizer = real_tokenizers["minicpm4"]
    conversation = CASES[2]
    sample = render(conversation, tokenizer)
    spans, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    answers = [m.content for m in conversation.messages if m.role == "assistant"]
    assert [tokenizer.decode(span) for span in spans] == [answer + "<|im_end|>" for answer in answers]


def test_fixture_chatml_is_minicpm5_style(fixture_tokenizers):
    """The template writes <s>; the tokenizer adds none; <s> appears once."""
    tokenizer = fixture_tokenizers["chatml"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 1)
    assert tokenizer("x")["input_ids"][0] != tokenizer.bos_token_id
    for conversation in CASES:
        sample = render(conversation, tokenizer)
        _, expected = _template_ids(tokenizer, conversation)
        assert sample.input_ids == expected
        assert sample.input_ids[0] == 0 and sample.input_ids.count(0) == 1
        assert sample.labels == _expected_labels(tokenizer, conversation, "<|im_end|>")
        assert tokenizer.decode(sample.input_ids) == _template_ids(tokenizer, conversation)[0]


def test_bos_is_never_doubled(fixture_tokenizers, real_tokenizers):
    """A ChatML template that writes <s> with a tokenizer that also adds it still gives one <s>."""
    tokenizer = real_tokenizers["minicpm4"]
    original = tokenizer.chat_template
    tokenizer.chat_template = "{{ bos_token }}" + original
    try:
        sample = render(CASES[0], tokenizer)
    finally:
        tokenizer.chat_template = original
    assert sample.input_ids == render(CASES[0], tokenizer).input_ids
    assert sample.input_ids.count(tokenizer.bos_token_id) == 1
    assert sample.labels == render(CASES[0], tokenizer).labels


def test_minicpm2_layout(fixture_tokenizers):
    """<s> system <用户>user<AI>answer ... </s>: markers are text, answers and the final </s> trained."""
    tokenizer = fixture_tokenizers["minicpm2"]
    assert detect_template(tokenizer) == "minicpm2"
    for conversation in CASES:
        sample = render(conversation, tokenizer)
        text, expected = _template_ids(tokenizer, conversation)
        assert sample.input_ids == expected + [tokenizer.eos_token_id]
        assert sample.labels == _expected_labels(tokenizer, conversation, "") + [tokenizer.eos_token_id]
        assert sample.input_ids.count(tokenizer.bos_token_id) == 1
        assert sample.input_ids.count(tokenizer.eos_token_id) == 1
    text, _ = _template_ids(tokenizer, CASES[1])
    assert text == "You are a helpful assistant.<用户>What is 2+2?<AI>4"


@pytest.fixture(scope="module")
def minicpm2b(shared_dir):
    return load_tokenizer(str(shared_dir / "tokenizers" / "minicpm2b"))


STRIPPED_CASES = CASES + [
    conv(("system", " 系统 \n"), ("user", " 前提：他们在下棋。\n假设：他们在玩。 "), ("assistant", " 蕴含 \n"),
         ("user", "\t再来 "), ("assistant", "\n 中立")),
    conv(("user", "u1"), ("user", " u2 "), ("assistant", "a"), ("system", " s "), ("assistant", " b ")),
]


def test_minicpm2_equals_minicpm2b_chat_template_token_for_token(minicpm2b):
    """The real MiniCPM-2B tokenizer: ids are its template's (contents stripped) + a trained </s>; one <s>."""
    tokenizer = minicpm2b
    assert detect_template(tokenizer) == "minicpm2"
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    for conversation in STRIPPED_CASES:
        sample = render(conversation, tokenizer)
        text, expected = _template_ids(tokenizer, conversation)
        assert sample.input_ids == expected + [eos]
        assert sample.labels == _expected_labels(tokenizer, conversation, "") + [eos]
        assert sample.input_ids[0] == bos and sample.input_ids.count(bos) == 1
        assert sample.labels[-1] == eos and sample.input_ids.count(eos) == 1
        assert sample.num_tokens == len(expected) + 1
    # The trained text is exactly each stripped answer (where an answer's first character merges with
    # the <AI> marker's last piece, that token is trained too: the model has to produce it).
    sample = render(STRIPPED_CASES[-2], tokenizer)
    trained = tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])
    assert trained == "蕴含中立</s>"


def test_minicpm2_prompt_equals_minicpm2b_template(minicpm2b):
    """Chat and eval prompts are the template's rendering up to the user's <AI>, with the guide's marker ids."""
    prompt = conv(("system", " s "), ("user", " 你好 😀 "))
    text, expected = _template_ids(minicpm2b, prompt)
    assert text == "s<用户>你好 😀<AI>"
    ids = render_prompt(prompt, minicpm2b)
    assert ids == expected and ids[-2:] == [10850, 95388]  # "AI>", as OpenBMB's finetune.py hard-codes it


PROMPT = conv(("system", "s"), ("user", "你好 😀"))

FLAGGED = Conversation([Message("system", "s"), Message("user", "q1"), Message("assistant", "a1"),
                        Message("user", "q2"), Message("assistant", "a2 skipped", False), Message("user", "q3"),
                        Message("assistant", "a3 kept", True), Message("user", "q4"), Message("assistant", "final")])
# (train_on, trained message indices): a message's own flag wins over train_on.
TRAIN_ON_CASES = [("all", {2, 6, 8}), ("last", {6, 8})]


@pytest.mark.parametrize("train_on, trained", TRAIN_ON_CASES)
def test_train_flags_and_train_on_choose_the_trained_turns(real_tokenizers, fixture_tokenizers, train_on, trained):
    for tokenizer in (real_tokenizers["minicpm4"], fixture_tokenizers["chatml"]):
        sample = render(FLAGGED, tokenizer, train_on=train_on)
        assert sample.input_ids == _template_ids(tokenizer, FLAGGED)[1]  # the text never changes, only labels
        assert sample.labels == _expected_labels(tokenizer, FLAGGED, "<|im_end|>", trained=trained)
        assert sample.trained_tokens == len(sample.labels) - sample.labels.count(IGNORE_INDEX)
    plain = conv(("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    tokenizer = fixture_tokenizers["chatml"]
    assert render(plain, tokenizer, train_on="last").labels == _expected_labels(tokenizer, plain, "<|im_end|>",
                                                                               trained={3})


def test_minicpm2_final_eos_is_trained_with_the_final_turn(fixture_tokenizers):
    tokenizer = fixture_tokenizers["minicpm2"]
    eos = tokenizer.eos_token_id
    for train_on, trained in TRAIN_ON_CASES:
        sample = render(FLAGGED, tokenizer, train_on=train_on)
        assert sample.labels == _expected_labels(tokenizer, FLAGGED, "", trained=trained) + [eos]
    untrained_end = Conversation([Message("user", "q"), Message("assistant", "a", False)])
    sample = render(untrained_end, tokenizer)
    assert (sample.input_ids[-1], sample.labels[-1], sample.trained_tokens, sample.trainable) == (
        eos, IGNORE_INDEX, 0, False)


def test_unknown_train_on_is_refused(fixture_tokenizers):
    with pytest.raises(InputError, match="unknown train-on 'first'"):
        render(CASES[0], fixture_tokenizers["chatml"], train_on="first")


def test_render_prompt_matches_real_templates(real_tokenizers):
    for tokenizer in real_tokenizers.values():
        _, expected = _template_ids(tokenizer, PROMPT, generation_prompt=True)
        assert render_prompt(PROMPT, tokenizer) == expected


def test_render_prompt_ends_with_generation_prompt(fixture_tokenizers):
    prompt = PROMPT
    for tokenizer in fixture_tokenizers.values():
        _, expected = _template_ids(tokenizer, prompt, generation_prompt=True)
        assert render_prompt(prompt, tokenizer) == expected
    chatml = fixture_tokenizers["chatml"]
    assert chatml.decode(render_prompt(prompt, chatml)).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert fixture_tokenizers["minicpm2"].decode(render_prompt(prompt, fixture_tokenizers["minicpm2"])) == "<s>s<用户>你好 😀<AI>"


def test_render_many_equals_render_and_reports_progress(fixture_tokenizers):
    tokenizer = fixture_tokenizers["chatml"]
    seen = []
    many = render_many(CASES * 300, tokenizer, on_progress=seen.append)
    assert sum(seen) == len(CASES) * 300 and len(seen) > 1
    assert [s.input_ids for s in many[:len(CASES)]] == [render(c, tokenizer).input_ids for c in CASES]
    assert [s.labels for s in many[-len(CASES):]] == [render(c, tokenizer).labels for c in CASES]


def test_turn_ends_split_tokens_per_message(fixture_tokenizers):
    tokenizer = fixture_tokenizers["chatml"]
    conversation = CASES[1]
    sample = render(conversation, tokenizer)
    assert len(sample.turn_ends) == 3 and sample.turn_ends[-1] == sample.num_tokens
    assert sample.turn_ends == sorted(sample.turn_ends)
    system_text = tokenizer.decode(sample.input_ids[:sample.turn_ends[0]])
    assert system_text == "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>"


def test_right_truncation_counts_lost_answer_tokens(fixture_tokenizers):
    tokenizer = fixture_tokenizers["chatml"]
    conversation = CASES[2]
    full = render(conversation, tokenizer)
    last_answer_start = max(i for i, label in enumerate(full.labels) if label == IGNORE_INDEX
                            and i < len(full.labels) - 2) + 1
    partly = render(conversation, tokenizer, max_length=last_answer_start + 2)
    assert partly.truncated and partly.trainable
    assert len(partly.input_ids) == len(partly.labels) == last_answer_start + 2
    assert partly.trained_tokens_lost == full.trained_tokens - (partly.labels.count(IGNORE_INDEX) * -1
                                                               + len(partly.labels))
    first_answer = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    none_left = render(conversation, tokenizer, max_length=first_answer)
    assert not none_left.trainable and none_left.trained_tokens_lost == full.trained_tokens
    fits = render(conversation, tokenizer, max_length=full.num_tokens)
    assert not fits.truncated and fits.trained_tokens_lost == 0


def test_drop_truncation_never_trains_an_over_long_sample(fixture_tokenizers):
    tokenizer = fixture_tokenizers["chatml"]
    full = render(CASES[2], tokenizer)
    dropped = render(CASES[2], tokenizer, max_length=full.num_tokens - 1, truncation="drop")
    assert not dropped.trainable and set(dropped.labels) == {IGNORE_INDEX}
    assert dropped.trained_tokens_lost == full.trained_tokens
    assert render(CASES[2], tokenizer, max_length=full.num_tokens, truncation="drop").labels == full.labels


def test_forced_and_unknown_templates(fixture_tokenizers):
    chatml, minicpm2 = fixture_tokenizers["chatml"], fixture_tokenizers["minicpm2"]
    with pytest.raises(TokenizerError, match="<|im_end|>"):
        render(CASES[0], minicpm2, template="chatml")
    with pytest.raises(TokenizerError, match="unknown template"):
        render(CASES[0], chatml, template="llama3")
    with pytest.raises(InputError, match="truncation"):
        render(CASES[0], chatml, truncation="left")
    original = chatml.chat_template
    try:
        chatml.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
        with pytest.raises(TokenizerError, match="unknown chat template"):
            detect_template(chatml)
        chatml.chat_template = None
        with pytest.raises(TokenizerError, match="no chat template"):
            detect_template(chatml)
    finally:
        chatml.chat_template = original


def test_template_that_rewrites_content_is_refused(fixture_tokenizers):
    tokenizer = fixture_tokenizers["chatml"]
    original = tokenizer.chat_template
    tokenizer.chat_template = original.replace("message['content']", "message['content'].strip()")
    try:
        with pytest.raises(TokenizerError, match="changes message contents"):
            render(conv(("user", " padded "), ("assistant", "x")), tokenizer, template="chatml")
    finally:
        tokenizer.chat_template = original


def test_forced_layouts(fixture_tokenizers):
    """--template minicpm2 equals detection; chatml forced on a template-less tokenizer uses MiniCPM's template."""
    minicpm2, chatml = fixture_tokenizers["minicpm2"], fixture_tokenizers["chatml"]
    assert render(CASES[2], minicpm2, template="minicpm2").labels == render(CASES[2], minicpm2).labels
    original = chatml.chat_template
    chatml.chat_template = None
    try:
        sample = render(CASES[1], chatml, template="chatml")
    finally:
        chatml.chat_template = original
    text = chatml.apply_chat_template([m.to_dict() for m in CASES[1].messages], tokenize=False,
                                      chat_template=MINICPM_CHATML_TEMPLATE)
    assert not text.startswith("<s>") and sample.input_ids == chatml(text)["input_ids"]
    assert sample.labels == _expected_labels(chatml, CASES[1], "<|im_end|>", template=MINICPM_CHATML_TEMPLATE)


def test_ocnli_records_count_as_minicpm2b_template_renders_them(minicpm2b, shared_dir):
    """The guide's own data: every OCNLI record is the template's tokens plus the trained </s>, no more."""
    from minicpm_data.io import read_conversations

    records = [c for _, c in read_conversations(shared_dir / "realdata" / "minicpm" / "ocnli_public_chatml" / "dev.json")]
    for conversation, sample in zip(records, render_many(records, minicpm2b)):
        _, expected = _template_ids(minicpm2b, conversation)
        assert sample.input_ids == expected + [minicpm2b.eos_token_id]
        assert sample.num_tokens == len(expected) + 1
