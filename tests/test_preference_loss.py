"""Preference losses against TRL (a test-only dependency) and per-sequence log-probabilities against full logits.

The same tiny model, the same pairs (rendered by our renderer; TRL gets the same prompt and answer ids), a
reference that differs from the policy (a perturbed copy): loss, chosen / rejected rewards and every
parameter's gradient within 1e-5 relative, for each DPO loss we ship and for KTO. Full fine-tuning, so
lm_head's gradient (computed in its own chunked pass) is compared too.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from minicpm_data.conversation import LabeledConversation, Message, PreferencePair  # noqa: E402

QUESTIONS = ["Is the sky blue?", "Name a prime number.", "What is 2 + 2?", "Say hello in French."]
ANSWERS = [("Yes, on a clear day.", "No."), ("Seven is prime.", "Nine."), ("Four.", "It is 22, clearly."),
           ("Bonjour !", "Hello.")]
RELATIVE = 1e-5


def _pairs() -> list[PreferencePair]:
    return [PreferencePair([Message("system", "Answer briefly.")] * (i % 2) + [Message("user", q)],
                           Message("assistant", good), Message("assistant", bad))
            for i, (q, (good, bad)) in enumerate(zip(QUESTIONS, ANSWERS))]


@pytest.fixture(scope="module")
def setup(tiny_llama):
    """Tokenizer, our rendered pairs, and a (policy, reference) loader: the reference is the policy with noise."""
    from minicpm_data.render import render_pairs
    from minicpm_data.tokenizer import load_tokenizer, pad_token_id

    tokenizer = load_tokenizer(str(tiny_llama))
    rendered = list(render_pairs(_pairs(), tokenizer))
    assert all(pair.problem is None for pair in rendered)

    def models():
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for parameter in reference.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        return policy, reference

    return tokenizer, rendered, models


def _trained_span(sample) -> tuple[int, int]:
    trained = [i for i, label in enumerate(sample.labels) if label != -100]
    return trained[0], trained[-1] + 1


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def _assert_gradients_equal(ours, theirs) -> None:
    theirs = dict(theirs.named_parameters())
    compared = 0
    for name, parameter in ours.named_parameters():
        expected = theirs[name].grad
        assert expected is not None and parameter.grad is not None, name
        assert _relative(parameter.grad, expected) <= RELATIVE, (name, _relative(parameter.grad, expected))
        compared += 1
    assert compared == len(theirs)


def _trl_dpo(tmp_path, tokenizer, rendered, models, loss_type: list[str], weights: list[float] | None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = []
    for pair in rendered:
        start = pair.prompt_tokens
        rows.append({"prompt_ids": pair.chosen.input_ids[:start],
                     "chosen_ids": pair.chosen.input_ids[start:_trained_span(pair.chosen)[1]],
                     "rejected_ids": pair.rejected.input_ids[start:_trained_span(pair.rejected)[1]]})
    policy, reference = models()
    config = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=loss_type, loss_weights=weights,
                       bf16=False, use_cpu=True, gradient_checkpointing=False, max_length=None, report_to="none",
                       per_device_train_batch_size=len(rows))
    placeholder = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # the batch is ours
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=placeholder,
                         processing_class=tokenizer)
    batch = trainer.data_collator(rows)
    loss = trainer.compute_loss(policy, batch)
    loss.backward()
    return loss.detach(), {k: v[-1] for mode in ("train", "eval") for k, v in trainer._metrics[mode].items()}, policy


@pytest.mark.parametrize("loss_type,sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("sigmoid", 0.5)])
def test_dpo_loss_rewards_and_gradients_equal_trl(setup, tmp_path, loss_type, sft_weight):
    from minicpm_data.tokenizer import pad_token_id
    from minicpm_train.preference import PreferenceCollator, PreferenceSettings, dpo_loss, log_probs

    tokenizer, rendered, models = setup
    expected_loss, expected, trl_policy = _trl_dpo(tmp_path, tokenizer, rendered, models, [loss_type] + ["sft"] * bool(sft_weight),
                                                   [1.0, sft_weight] if sft_weight else None)
    policy, reference = models()
    rows = [{"chosen_input_ids": p.chosen.input_ids, "chosen_labels": p.chosen.labels,
             "rejected_input_ids": p.rejected.input_ids, "rejected_labels": p.rejected.labels} for p in rendered]
    batch = PreferenceCollator(pad_token_id(tokenizer))(rows)
    with torch.no_grad():
        reference_logps = log_probs(reference, batch).logps
    logps = log_probs(policy, batch)
    loss, metrics = dpo_loss(logps, reference_logps, PreferenceSettings("dpo", 0.1, loss_type, sft_weight))
    logps.with_head_gradients(loss).backward()

    assert loss.item() == pytest.approx(expected_loss.item(), rel=RELATIVE)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[name].item() == pytest.approx(expected[name], rel=RELATIVE, abs=1e-7), name
    assert metrics["rewards/accuracies"].item() == expected["rewards/accuracies"]
    assert abs(expected["rewards/margins"]) > 1e-3  # the reference differs: the rewards mean something
    _assert_gradients_equal(policy, trl_policy)


def test_kto_loss_rewards_and_gradients_equal_trl(setup, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from minicpm_data.render import render_stream
    from minicpm_data.tokenizer import pad_token_id
    from minicpm_train.preference import PreferenceCollator, PreferenceSettings, kto_kl, kto_loss, log_probs

    tokenizer, _, models = setup
    conversations = [LabeledConversation([*pair.messages, answer], label=label)
                     for pair in _pairs() for answer, label in ((pair.chosen, True), (pair.rejected, False))][:6]
    samples = list(render_stream(conversations, tokenizer, train_on="last"))
    rows = []
    for sample, conversation in zip(samples, conversations):
        start, end = _trained_span(sample)
        rows.append({"prompt_ids": sample.input_ids[:start], "completion_ids": sample.input_ids[start:end],
                     "label": conversation.label})
    policy, reference = models()
    config = KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, bf16=False, use_cpu=True,
                       gradient_checkpointing=False, max_length=None, report_to="none",
                       per_device_train_batch_size=len(rows))
    placeholder = Dataset.from_list([{"prompt": "a", "completion": "b", "label": True},
                                     {"prompt": "c", "completion": "d", "label": False}])  # the batch is ours
    trainer = KTOTrainer(model=policy, ref_model=reference, args=config, train_dataset=placeholder,
                         processing_class=tokenizer)
    completions = [row["completion_ids"] for row in rows]
    for row, mismatched in zip(rows, completions[-1:] + completions[:-1]):  # TRL's rotation within a batch
        row["KL_completion_ids"] = mismatched
    trl_batch = trainer.data_collator(rows)
    expected_loss = trainer.compute_loss(policy, trl_batch)
    expected_loss.backward()
    expected = {k: v[-1] for mode in ("train", "eval") for k, v in trainer._metrics[mode].items()}

    # Ours, on our rendered rows; the KL sequences are TRL's (each prompt with the previous row's answer).
    ours, ours_reference = models()
    collate = PreferenceCollator(pad_token_id(tokenizer)).collate
    batch = collate([(s.input_ids, s.labels) for s in samples])
    kl_batch = {"input_ids": trl_batch["KL_input_ids"], "attention_mask": trl_batch["KL_attention_mask"],
                "labels": trl_batch["KL_input_ids"].masked_fill(trl_batch["KL_completion_mask"] == 0, -100),
                "sequences": len(rows)}
    with torch.no_grad():
        reference_logps = log_probs(ours_reference, batch).logps
        kl = kto_kl(log_probs(ours, kl_batch).logps, log_probs(ours_reference, kl_batch).logps)
    logps = log_probs(ours, batch)
    loss, metrics = kto_loss(logps, reference_logps, torch.tensor([r["label"] for r in rows]), kl,
                             PreferenceSettings("kto", 0.1))
    logps.with_head_gradients(loss).backward()

    assert loss.item() == pytest.approx(expected_loss.item(), rel=RELATIVE)
    assert kl.item() == pytest.approx(expected["kl"], rel=RELATIVE, abs=1e-7)
    for name in ("rewards/chosen", "rewards/rejected"):
        assert metrics[name] == pytest.approx(expected[name], rel=RELATIVE, abs=1e-7), name
    # KTO's margin is the difference of those two means: its float32 floor is theirs, not its own size.
    scale = max(abs(expected["rewards/chosen"]), abs(expected["rewards/rejected"]))
    assert metrics["rewards/margins"] == pytest.approx(expected["rewards/margins"], abs=RELATIVE * scale)
    _assert_gradients_equal(ours, policy)


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_minicpm2"])
@pytest.mark.parametrize("packing", [False, True])
def test_sequence_log_probs_equal_full_logits(kind, packing, request):
    """Per-sequence summed log-probabilities within 1e-6 of log_softmax over the full logits, and the gradient
    of any function of them (here a weighted sum) equal to autograd's through the full logits: hidden
    states per sequence and a trained lm_head. Padded, or all sequences packed in one row."""
    from transformers import AutoModelForCausalLM

    from minicpm_data.tokenizer import load_tokenizer, pad_token_id
    from minicpm_data.render import render_pairs
    from minicpm_train.preference import PreferenceCollator, log_probs

    from minicpm_train.model import read_model_config

    folder = request.getfixturevalue(kind)
    read_model_config(folder, trust_remote_code=False)  # registers the built-in MiniCPM class
    tokenizer = load_tokenizer(str(folder))
    pairs = list(render_pairs(_pairs(), tokenizer))
    rows = [{"chosen_input_ids": p.chosen.input_ids, "chosen_labels": p.chosen.labels,
             "rejected_input_ids": p.rejected.input_ids, "rejected_labels": p.rejected.labels} for p in pairs]
    batch = PreferenceCollator(pad_token_id(tokenizer), packing=packing)(rows)
    weights = torch.linspace(-1.0, 2.0, 2 * len(rows))

    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    logps = log_probs(ours, batch)
    logps.with_head_gradients((weights * logps.logps).sum()).backward()

    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "use_cache") if k in batch}
    token_logps = torch.log_softmax(full(**inputs).logits.double(), dim=-1)[:, :-1]
    targets = batch["labels"][:, 1:]
    picked = token_logps.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    owners = batch["sequence_ids"][:, 1:] if packing else torch.arange(len(targets))[:, None].expand_as(targets)
    expected = torch.zeros(2 * len(rows), dtype=torch.float64).index_add(0, owners.reshape(-1), picked.reshape(-1))
    (weights.double() * expected).sum().backward()

    torch.testing.assert_close(logps.logps.double(), expected, rtol=1e-6, atol=0)
    assert logps.counts.tolist() == [sum(1 for x in r[f"{side}_labels"] if x != -100)
                                     for side in ("chosen", "rejected") for r in rows]
    full_parameters = dict(full.named_parameters())
    for name, parameter in ours.named_parameters():
        assert _relative(parameter.grad, full_parameters[name].grad.float()) <= RELATIVE, name
