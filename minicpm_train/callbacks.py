"""Progress display for training: Rich bars for rendering the data (samples/s, tokens/s, ETA) and for the
steps (loss, learning rate, tokens per second, ETA)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback


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
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
