"""minicpm-train eval: loss on render()'s labels, label-set accuracy with a confusion table, predictions JSONL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from minicpm_data.conversation import Conversation, Message
from minicpm_train.evaluate import OTHER, EvalResult, EvaluationError, SamplePrediction, detect_label_set, evaluate


from train_helpers import TASK_DEV  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    from minicpm_train.inference import load_model

    return load_model(tiny_llama, device="cpu")


@pytest.fixture(scope="module")
def dev_records():
    from minicpm_data.io import read_conversations

    return list(read_conversations(TASK_DEV))[:12]


def test_label_set_detection():
    assert detect_label_set(["neutral", "entailment", "neutral ", "contradiction", "entailment", "neutral"]) == [
        "contradiction", "entailment", "neutral"]
    assert detect_label_set([f"answer number {i}" for i in range(10)]) == []  # free-form
    assert detect_label_set(["yes", "no"]) == []  # too few samples to call it a label set
    assert detect_label_set(["a long answer that repeats itself " * 3] * 4) == []


def test_confusion_and_per_label_by_hand():
    predictions = [SamplePrediction(0, "neutral", 1.0, 1, "neutral"), SamplePrediction(1, "neutral", 1.0, 1, "entailment"),
                   SamplePrediction(2, "entailment", 1.0, 1, "entailment"), SamplePrediction(3, "contradiction", 1.0, 1, "maybe")]
    result = EvalResult(4, 4, 4, 0.5, ["contradiction", "entailment", "neutral"], predictions)
    assert result.accuracy == 0.5
    assert result.per_label() == {"neutral": (1, 2), "entailment": (1, 1), "contradiction": (0, 1)}
    assert result.confusion() == {"contradiction": {OTHER: 1}, "entailment": {"entailment": 1},
                                  "neutral": {"neutral": 1, "entailment": 1}}
    assert result.perplexity == pytest.approx(math.exp(0.5))


def test_loss_equals_transformers_loss_on_render_labels(loaded, dev_records):
    """Token-weighted mean of the model's own loss over render()'s labels, whatever the batch size."""
    import torch

    from minicpm_data.render import render

    total, tokens = 0.0, 0
    for _, conversation in dev_records:
        sample = render(conversation, loaded.tokenizer)
        with torch.no_grad():
            out = loaded.model(input_ids=torch.tensor([sample.input_ids]), labels=torch.tensor([sample.labels]))
        trained = sum(1 for label in sample.labels[1:] if label != -100)
        total += float(out.loss) * trained
        tokens += trained
    one = evaluate(loaded.model, loaded.tokenizer, dev_records, batch_size=1, generate=False)
    batched = evaluate(loaded.model, loaded.tokenizer, dev_records, batch_size=5, generate=False)
    assert one.trained_tokens == batched.trained_tokens == tokens
    assert one.loss == pytest.approx(total / tokens, rel=1e-5)
    assert batched.loss == pytest.approx(one.loss, rel=1e-5)
    assert one.generated == []


def test_greedy_answers_match_unpadded_generation(loaded, dev_records):
    """Left-padded batches give each prompt the answer it gets alone."""
    from minicpm_train.chat import GenerationSettings, generate_reply

    free = evaluate(loaded.model, loaded.tokenizer, dev_records, batch_size=4, labels="none", generate=True,
                    max_new_tokens=6)
    for (_, conversation), prediction in list(zip(dev_records, free.predictions))[:3]:
        alone = generate_reply(loaded.model, loaded.tokenizer, Conversation(conversation.messages[:-1]),
                               GenerationSettings(max_new_tokens=6, temperature=0))
        assert prediction.prediction == alone
    result = evaluate(loaded.model, loaded.tokenizer, dev_records, batch_size=4)
    assert result.labels == ["contradiction", "entailment", "neutral"]
    assert len(result.generated) == len(dev_records)
    per_label = result.per_label()
    assert sum(total for _, total in per_label.values()) == len(dev_records)
    assert sum(sum(row.values()) for row in result.confusion().values()) == len(dev_records)


def test_answers_truncated_away_are_not_scored(loaded):
    long_question = Conversation([Message("user", "word " * 300), Message("assistant", "neutral")])
    short = Conversation([Message("user", "hi"), Message("assistant", "neutral")])
    result = evaluate(loaded.model, loaded.tokenizer, [(0, long_question), (1, short)], max_length=64, labels="none")
    assert (result.samples, result.scored) == (2, 1)
    assert result.predictions[0].loss is None and result.predictions[1].loss is not None
    with pytest.raises(EvaluationError, match="last message must be the assistant"):
        evaluate(loaded.model, loaded.tokenizer, [(0, Conversation([Message("user", "hi")]))])


def test_cli_eval_writes_predictions(tiny_llama, tmp_path, monkeypatch, capsys):
    from train_helpers import run_cli

    out = tmp_path / "pred.jsonl"
    code, stdout, err = run_cli(monkeypatch, capsys, "eval", str(tiny_llama), "--data", str(TASK_DEV),
                                "-o", str(out), "--json")
    assert code == 0, err
    metrics = json.loads(stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == metrics["samples"] == 32
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 32)
    assert set(metrics["confusion"]) == {"contradiction", "entailment", "neutral"}
    assert json.loads(out.with_suffix(".metrics.json").read_text())["loss"] == metrics["loss"]
    code, stdout, _ = run_cli(monkeypatch, capsys, "eval", str(tiny_llama), "--data", str(TASK_DEV),
                              "-o", str(out))
    assert code == 0 and "exact-match accuracy" in stdout and "perplexity" in stdout


def test_cli_eval_paths_and_flag_spellings(tiny_llama, tiny_minicpm3, tmp_path, monkeypatch, capsys):
    """Unwritable -o and a mismatched --adapter are one-line errors; flags take dashes or underscores."""
    from train_helpers import ADAPTER_TARGETS, make_adapter, run_cli

    eval_dev = ["eval", str(tiny_llama), "--data", str(TASK_DEV), "--json"]
    code, _, err = run_cli(monkeypatch, capsys, *eval_dev, "-o", str(tmp_path))
    assert code == 1 and err.count("\n") == 1 and f"-o {tmp_path} is a folder" in err
    code, _, err = run_cli(monkeypatch, capsys, *eval_dev, "-o", str(Path(__file__) / "pred.jsonl"))
    assert code == 1 and err.count("\n") == 1 and f"{Path(__file__)} is a file, not a folder" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"messages": [{"role": "bot", "content": "hi"}, {"role": "user", "content": "q"}]}]))
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(tiny_llama), "--data", str(bad))
    assert code == 1 and err.count("\n") == 1 and "record(s) 0" in err and f"minicpm-data validate {bad}" in err

    def refused(result, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("minicpm_train.evaluate.write_predictions", refused)
    code, _, err = run_cli(monkeypatch, capsys, *eval_dev, "-o", str(tmp_path / "p.jsonl"))
    assert code == 1 and err.strip() == f"error: Permission denied: {tmp_path / 'p.jsonl'}"  # after the progress
    monkeypatch.undo()

    adapter = make_adapter(tiny_minicpm3, tmp_path / "m3_adapter", ADAPTER_TARGETS["minicpm3"])
    code, _, err = run_cli(monkeypatch, capsys, *eval_dev, "--adapter", str(adapter))
    assert code == 1 and err.count("\n") == 1 and "trained on another model" in err

    metrics = []
    for flags in (["--batch-size", "4", "--model-max-length", "64", "--max-new-tokens", "2"],
                  ["--batch_size", "4", "--model_max_length", "64", "--max_new_tokens", "2"]):
        code, out, err = run_cli(monkeypatch, capsys, *eval_dev, "--labels", "none", "--generate",
                                 "-o", str(tmp_path / "p.jsonl"), *flags)
        assert code == 0, err
        metrics.append(json.loads(out))
    assert metrics[0] == metrics[1]


def test_real_ocnli_dev(loaded, shared_dir):
    """OpenBMB's own OCNLI conversion (external data): labels found, every record predicted."""
    from minicpm_data.io import read_conversations

    records = list(read_conversations(shared_dir / "realdata" / "minicpm" / "ocnli_public_chatml" / "dev.json"))
    result = evaluate(loaded.model, loaded.tokenizer, records, batch_size=8)
    assert set(result.labels) <= {"entailment", "neutral", "contradiction"} and len(result.labels) >= 2
    assert len(result.generated) == len(records) == result.samples
    assert math.isfinite(result.loss)
