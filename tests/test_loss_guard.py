"""A run never "succeeds" on garbage: a NaN / infinite loss, or a first logged loss of exactly 0, is one
`error:` line, exit code 1, and no finished model in the output folder."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from train_helpers import TASK_DEV, TASK_TRAIN, run_cli


def poisoned_copy(model: Path, target: Path, weight: str = "model.layers.0.mlp.down_proj.weight") -> Path:
    """The model folder with one NaN in one weight, as a corrupted download or a diverged save would have."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, target)
    weights = load_file(target / "model.safetensors")
    weights[weight][0, 0] = float("nan")
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("method", [["--use_lora"], []], ids=["lora", "full"])
def test_nan_weights_end_the_run_with_one_error_line(tiny_llama, tmp_path, data_cache, monkeypatch, capsys, method):
    model = poisoned_copy(tiny_llama, tmp_path / "model")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "run", "--model_name_or_path", str(model),
                                   "--output_dir", str(out), "--train_data_path", str(TASK_TRAIN),
                                   "--eval_data_path", str(TASK_DEV), "--max_steps", "4", "--logging_steps", "2",
                                   "--data_cache_dir", str(data_cache), *method)
    assert code == 1
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: loss is NaN at step 1:"), stderr
    assert "doctor" in errors[0] and "learning rate" in errors[0]  # what to check
    assert "done:" not in stdout
    finished = {"model.safetensors", "adapter_model.safetensors", "metrics.json", "run_config.json"}
    assert not out.exists() or not finished & {p.name for p in out.iterdir()}


def _guard(trained_tokens=100):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from minicpm_train.callbacks import LossGuard

    state = TrainerState()
    state.global_step = 3
    return LossGuard(trained_tokens), (TrainingArguments(output_dir="unused", report_to="none"), state,
                                       TrainerControl())


def test_first_logged_loss_of_exactly_zero_is_an_error():
    from minicpm_train.callbacks import TrainingLossError

    guard, context = _guard()
    with pytest.raises(TrainingLossError, match=r"loss is exactly 0 at step 3 although 100 tokens are trained"):
        guard.on_log(*context, logs={"loss": 0.0, "learning_rate": 1e-4})
    untrained, context = _guard(trained_tokens=0)
    untrained.on_log(*context, logs={"loss": 0.0})  # nothing to learn: 0 is not suspicious
    later, context = _guard()
    later.on_log(*context, logs={"loss": 0.7})
    later.on_log(*context, logs={"loss": 0.0})  # a loss that reached 0 by training is the model's business


@pytest.mark.parametrize("value, word", [(math.nan, "NaN"), (math.inf, "infinite")])
def test_non_finite_eval_and_logged_losses_are_errors(value, word):
    from minicpm_train.callbacks import TrainingLossError

    guard, context = _guard()
    with pytest.raises(TrainingLossError, match=rf"^eval loss is {word} at step 3: stopped"):
        guard.on_evaluate(*context, metrics={"eval_loss": value})
    guard.on_evaluate(*context, metrics={"eval_loss": 1.5})
    with pytest.raises(TrainingLossError, match=rf"^loss is {word} at step 3"):
        guard.on_log(*context, logs={"loss": value})


def test_every_forward_loss_of_a_step_is_checked():
    """A NaN in any micro-batch of an accumulated step stops the run at that step, not at the next log,
    whichever way the trainer computes its loss (the guard watches the trainer's compute_loss)."""
    import torch

    from minicpm_train.callbacks import TrainingLossError

    class Trainer:  # compute_loss as transformers' Trainer calls it; the "inputs" are the loss itself
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return (inputs, {"loss": inputs}) if return_outputs else inputs

    model, trainer = torch.nn.Linear(1, 1).train(), Trainer()
    guard, context = _guard()
    guard.watch(trainer)
    guard.on_train_begin(*context, model=model)
    assert trainer.compute_loss(model, torch.tensor(1.0)) == 1.0
    guard.on_step_end(*context)
    trainer.compute_loss(model, torch.tensor(0.5), num_items_in_batch=4)
    loss, _ = trainer.compute_loss(model, torch.tensor(float("inf")), return_outputs=True)
    assert loss.isinf()
    trainer.compute_loss(model.eval(), torch.tensor(float("nan")))  # evaluation is judged by eval_loss instead
    with pytest.raises(TrainingLossError, match="^loss is infinite at step 3"):
        guard.on_step_end(*context)
    guard.on_step_end(*context)  # the step's losses were consumed: nothing left to judge
