"""Training callbacks: Rich progress bars for rendering the data (samples/s, tokens/s, ETA) and for the steps
(loss, learning rate, tokens per second, ETA), and the loss guard that stops a run whose loss is garbage."""

from __future__ import annotations

import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback

from minicpm_data.errors import MinicpmError

WHAT_TO_CHECK = ("check the base model's weights (`minicpm-train doctor --model DIR` names the class it loads with), "
                 "the learning rate, and the precision (fp16 weights diverge; try --bf16)")


class ProgressCallback(TrainerCallback):
    """Shows step progress, the last logged loss and learning rate, tokens/s, ETA; prints eval losses."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None
        # Tokens/s counts only time inside optimizer steps: evaluation and checkpoint saves are left out.
        self._step_started = 0.0
        self._step_seconds = 0.0
        self._tokens_at = (0.0, 0)  # (step seconds, num_input_tokens_seen) at the previous log
        self._rendering: Progress | None = None

    def render_progress(self, update) -> None:
        """Show a data file's rendering (a ``minicpm_train.data.RenderProgress``); the bar goes when it ends."""
        if self._rendering is None:
            self._rendering = Progress(
                TextColumn("[bold]render[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rates]}"), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=True)
            self._rendering.start()
            self._rendering.add_task(Path(update.file).name, total=update.total, rates="")
        task = self._rendering.tasks[0]
        elapsed = max(task.elapsed or 0.0, 1e-6)
        self._rendering.update(task.id, completed=update.samples, total=max(update.total or 0, update.samples),
                               rates=f"{update.samples / elapsed:,.0f} samples/s  {update.tokens / elapsed:,.0f} tok/s")
        if update.finished:
            self._rendering.stop()
            self._rendering = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, stats="")
        self._tokens_at = (self._step_seconds, state.num_input_tokens_seen)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        self._step_seconds += time.monotonic() - self._step_started
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.progress is None:
            return
        if "eval_loss" in logs:
            self.progress.console.print(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")
            return
        if "loss" not in logs:
            return
        now, seen = self._step_seconds, state.num_input_tokens_seen
        then, seen_before = self._tokens_at
        self._tokens_at = (now, seen)
        rate = (seen - seen_before) / (now - then) if now > then else 0.0
        stats = f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}  {rate:,.0f} tok/s"
        self.progress.update(self.task, completed=state.global_step, stats=stats)

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        """End the display (also when training stopped with an error)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class TrainingLossError(MinicpmError):
    """Training or evaluation produced a loss that cannot be trusted."""


class LossGuard(TrainerCallback):
    """Stops a run on a NaN or infinite training or eval loss, or a first logged loss of exactly 0.

    The training loss of every forward, however the trainer computes it (the model's own loss, or the chunked
    loss of :mod:`minicpm_train.loss`), is recorded by :meth:`watch` and checked at each optimizer step (on
    every rank together, so they all stop at the same step), before the Trainer's logging could average a NaN
    away; the raised :class:`TrainingLossError` leaves nothing saved as a finished model.
    """

    def __init__(self, trained_tokens: int):
        self.trained_tokens = trained_tokens
        self._losses: list = []
        self._logged = False

    def watch(self, trainer) -> None:
        """Record the loss each training forward of ``trainer`` returns."""
        compute_loss = trainer.compute_loss

        def recorded(model, inputs, return_outputs=False, **kwargs):
            result = compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            if model.training:
                self._losses.append((result[0] if return_outputs else result).detach())
            return result

        trainer.compute_loss = recorded

    def on_train_begin(self, args, state, control, **kwargs):
        self._logged = state.global_step > 0  # a resumed run logged its first loss before

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if not self._losses:
            return
        losses, self._losses = torch.stack(self._losses).float(), []
        # 0 finite, 1 infinite, 2 NaN; the worst over every rank
        code = torch.where(losses.isnan(), 2, torch.where(losses.isinf(), 1, 0)).max()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
        if code.item():
            self._fail("loss", float("nan") if code.item() == 2 else math.inf, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            self._fail("loss", loss, state.global_step)
        if not self._logged and loss == 0 and self.trained_tokens:
            self._fail("loss", loss, state.global_step)
        self._logged = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is not None and not math.isfinite(loss):
            self._fail("eval loss", loss, state.global_step)

    def _fail(self, what: str, loss: float, step: int):
        if loss == 0:
            raise TrainingLossError(
                f"{what} is exactly 0 at step {step} although {self.trained_tokens:,} tokens are trained: the model "
                f"predicts nothing real (weights or buffers left uninitialised?); {WHAT_TO_CHECK}")
        value = "NaN" if math.isnan(loss) else "infinite"
        raise TrainingLossError(f"{what} is {value} at step {step}: stopped, nothing saved as a finished model; "
                                f"{WHAT_TO_CHECK}")


class CheckpointFiles(TrainerCallback):
    """Puts into every checkpoint the Trainer saves the base model's tokenizer files, byte for byte (its own
    ``save_pretrained`` copy would reload as a different tokenizer for SentencePiece models), and the run's
    ``run_config.json``, which a resume checks the checkpoint against."""

    def __init__(self, source, record: dict):
        self.source, self.record = source, record

    def on_save(self, args, state, control, **kwargs):
        from minicpm_train.model import copy_tokenizer_files
        from minicpm_train.resume import write_record

        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            copy_tokenizer_files(self.source, checkpoint)
            write_record(checkpoint, self.record)


class ResumeGuard(TrainerCallback):
    """Stops a resumed run before its first step when the checkpoint leaves no step to train (an epoch-based
    run's last step is known only once the Trainer counted the batches)."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        from minicpm_train.resume import past_the_end

        if state.global_step >= state.max_steps:
            raise past_the_end(state.global_step, state.max_steps, self.checkpoint)
