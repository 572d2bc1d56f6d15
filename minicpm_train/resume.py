"""Where a run starts: fresh, or from a checkpoint of the same run, decided before anything is loaded.

- A checkpoint is complete when ``trainer_state.json`` (the Trainer writes it last) reads, its weights,
  optimizer and scheduler files are there (DeepSpeed's: every rank's), and every file is whole
  (:func:`checkpoint_problem`);
  ``--resume_from_checkpoint auto`` takes the latest complete one and says which damaged ones it passed over.
- A run resumes only a checkpoint it could have written itself: each checkpoint carries the run's
  ``run_config.json`` (with the training files' SHA-256), and a checkpoint of another model, other training
  data, rendering or method, or one at or past ``--max_steps`` (nothing would be trained, and the stale weights
  would be saved as the result) stops the run in one line; ``--force_resume`` resumes it anyway where the
  weights can load at all (never a LoRA checkpoint into a full run, or of another LoRA rank).
- A fresh run into an output folder that holds an earlier run's checkpoints is refused (they would mix with
  its own and mislead a later ``auto``), unless ``--overwrite_output_dir`` deletes them first.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from minicpm_data.errors import MinicpmError
from minicpm_data.model_files import ADAPTER_WEIGHTS, WEIGHT_NAMES, file_finding, read_json_file

CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # the Trainer's checkpoint folder names
RUN_RECORD = "run_config.json"
# DeepSpeed's files in a checkpoint's global_stepN folder: each data-parallel rank's optimizer states, and the
# model states (ZeRO-3: each rank's part; ZeRO-1/2: one file).
OPTIMIZER_STATES = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
RANK_MODEL_STATES = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt")
MODEL_STATES = "mp_rank_00_model_states.pt"
# RunOptions that decide the rows a run trains on, beside the files themselves.
ROW_OPTIONS = ("model_max_length", "template", "truncation", "train_on", "packing")


class ResumeError(MinicpmError):
    """The run cannot start where it was asked to: a stale or foreign checkpoint, or an earlier run's folder."""


def checkpoints(output_dir: Path) -> dict[int, Path]:
    """Every ``checkpoint-N`` folder of ``output_dir`` by its step N, complete or not."""
    if not output_dir.is_dir():
        return {}
    return {int(match[1]): p for p in output_dir.iterdir() if (match := CHECKPOINT.fullmatch(p.name)) and p.is_dir()}


def checkpoint_problem(folder: Path) -> str | None:
    """What makes a checkpoint folder unusable (half-written, a file missing or truncated), or None."""
    state, finding = read_json_file(folder / "trainer_state.json")
    if finding:
        return f"trainer_state.json is {finding.problem} (the checkpoint was not finished)"
    deepspeed = (folder / "latest").is_file()  # DeepSpeed keeps weights and optimizer in its global_step folder
    required = [] if deepspeed else ["optimizer.pt", "scheduler.pt"]
    record, _ = read_json_file(folder / RUN_RECORD, required=False)
    if (record or {}).get("training", {}).get("save_only_model"):
        required = []
    if not deepspeed and not any((folder / name).is_file() for name in WEIGHT_NAMES + ADAPTER_WEIGHTS):
        required.append("its weights (model.safetensors or adapter_model.safetensors)")
    if deepspeed:
        tag = (folder / "latest").read_text().strip()
        required += _deepspeed_files(folder, tag) if (folder / tag).is_dir() else [f"{tag}/ (named in latest)"]
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        return f"{', '.join(missing)} missing"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        finding = file_finding(path)
        if finding:
            return f"{path.relative_to(folder)} is {finding.problem}"
    return None


def _deepspeed_files(folder: Path, tag: str) -> list[str]:
    """The files a DeepSpeed checkpoint's ``tag`` folder needs beside those it has: a rank's optimizer or model
    states, where ranks on both sides of it have theirs (a rank killed before writing). Without the world size,
    a missing last rank cannot be told from a folder that holds one node's ranks (each node writes its own)."""
    names = {path.name for path in (folder / tag).iterdir()}
    ranks = {int(match[1]) for name in names if (match := OPTIMIZER_STATES.fullmatch(name))}
    if not ranks:
        return [f"{tag}/ its optimizer states (zero_pp_rank_0_mp_rank_00_optim_states.pt)"]
    span = range(min(ranks), max(ranks) + 1)
    prefix = "bf16_" if any(name.startswith("bf16_") for name in names) else ""
    needed = [f"{tag}/{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in span if rank not in ranks]
    if any(RANK_MODEL_STATES.fullmatch(name) for name in names):  # ZeRO-3: one per rank
        return needed + [f"{tag}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in span]
    return needed + [f"{tag}/{MODEL_STATES}"]


def write_record(folder: Path, record: dict) -> None:
    """A run's ``run_config.json`` (what was run, on which data) in its output folder or a checkpoint."""
    import json

    (folder / RUN_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def checkpoint_step(folder: Path) -> int:
    """The optimizer step a checkpoint was saved at."""
    state, _ = read_json_file(folder / "trainer_state.json")
    return int((state or {}).get("global_step", CHECKPOINT.fullmatch(folder.name)[1]))


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must share with the run that resumes it."""

    options: dict  # the RunOptions, as run_config.json holds them
    data: list  # [file, SHA-256, weight] of every training file

    def record(self) -> dict:
        """The part of run_config.json this identity is read back from."""
        return {"data": self.data}

    def differences(self, record: dict) -> list[str]:
        """What differs from the run that wrote ``record`` (its run_config.json), in words."""
        saved = record.get("options") or {}
        said = []
        if saved.get("model_name_or_path") != self.options["model_name_or_path"]:
            said.append(f"it trained another model ({saved.get('model_name_or_path')})")
        if saved.get("stage", "sft") != self.options.get("stage", "sft"):
            said.append(f"it trained --stage {saved.get('stage', 'sft')}")
        if saved.get("qlora", False) != self.options["qlora"]:
            said.append(f"it trained {'with' if saved.get('qlora') else 'without'} --qlora")
        if "data" in record and [d[1:] for d in record["data"]] != [d[1:] for d in self.data]:
            names = ", ".join(d[0] for d in record["data"])
            said.append(f"it trained on other data ({names}: other contents or weights)")
        changed = [f"--{name} {saved[name]}" for name in ROW_OPTIONS if name in saved and saved[name] != self.options[name]]
        if changed:
            said.append(f"it rendered its data with {', '.join(changed)}")
        return said


def method_problem(checkpoint: Path, options: dict) -> str | None:
    """Why the run's method cannot load the checkpoint's weights at all (no --force_resume helps)."""
    adapter, _ = read_json_file(checkpoint / "adapter_config.json", required=False)
    if adapter is not None and not options["use_lora"]:
        return ("holds a LoRA adapter, and this run trains every weight: add --use_lora (with that run's LoRA "
                "flags) to resume it")
    if adapter is None and options["use_lora"]:
        return "holds fully trained weights, and this run trains a LoRA adapter: drop --use_lora to resume it"
    if adapter is not None and adapter.get("r") != options["lora_r"]:
        return f"holds a LoRA adapter of rank {adapter.get('r')}, this run's --lora_r is {options['lora_r']}"
    return None


def resume_point(value: str | None, output_dir: Path, identity: RunIdentity, *, max_steps: int, force: bool,
                 overwrite: bool, main_process: bool, report) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), or a :class:`ResumeError`.

    ``value`` is ``--resume_from_checkpoint`` (a checkpoint folder, ``auto``, or none), checked when the flags
    were parsed. ``main_process`` deletes an earlier run's checkpoints for ``--overwrite_output_dir``.
    """
    from minicpm_train.args import NO_RESUME, latest_checkpoint

    earlier = checkpoints(output_dir)
    if value in NO_RESUME:
        if earlier and not overwrite:
            steps = sorted(earlier)
            raise ResumeError(
                f"{output_dir} holds checkpoints of an earlier run ({_span(steps)}): continue it with "
                "--resume_from_checkpoint auto, start this run in a new --output_dir, or add --overwrite_output_dir "
                "to start over here (deletes them)")
        if earlier and main_process:
            for folder in earlier.values():
                shutil.rmtree(folder)
            report(f"note: --overwrite_output_dir: deleted {len(earlier)} checkpoint(s) of an earlier run in {output_dir}")
        if (output_dir / RUN_RECORD).is_file():
            report(f"note: {output_dir} holds an earlier run's final files (its {RUN_RECORD}); this run replaces them "
                   "when it ends")
        return None
    if value == "auto":
        checkpoint = latest_checkpoint(output_dir)
        for step in sorted(earlier):  # the damaged ones after the latest complete one
            if checkpoint is None or step > int(CHECKPOINT.fullmatch(checkpoint.name)[1]):
                report(f"note: skipped {earlier[step]}: {checkpoint_problem(earlier[step])}")
        if checkpoint is None:
            report(f"resume: no complete checkpoint in {output_dir}, starting fresh")
            return None
        asked = "--resume_from_checkpoint auto"
    else:
        checkpoint, asked = Path(value), f"--resume_from_checkpoint {value}"
    step = checkpoint_step(checkpoint)
    cannot = method_problem(checkpoint, identity.options)
    if cannot:
        raise ResumeError(f"{asked}: {checkpoint} {cannot}")
    record, _ = read_json_file(checkpoint / RUN_RECORD, required=False)  # a damaged one made it incomplete
    differs = identity.differences(record) if record is not None else []  # none: nothing to compare (a note below)
    if max_steps > 0 and step >= max_steps:
        differs.insert(0, f"its step {step} is at or past --max_steps {max_steps}, so nothing would be trained "
                          "and its weights saved as this run's")
    if differs and not force:
        raise ResumeError(f"{asked}: will not resume {checkpoint}: {'; '.join(differs)}. Start this run in a new "
                          "--output_dir, add --overwrite_output_dir to start over here, or --force_resume to resume it "
                          "anyway")
    if differs:
        report(f"note: --force_resume: resuming {checkpoint} although {'; '.join(differs)}")
    elif record is None:
        report(f"note: {checkpoint} has no {RUN_RECORD} (an older version saved it): its model and data are not "
               "checked against this run's")
    report(f"resume: {checkpoint} (step {step})")
    return checkpoint


def past_the_end(step: int, last_step: int, checkpoint: Path) -> ResumeError:
    """The error of a resumed run whose checkpoint leaves no step to train (known once the Trainer counted them)."""
    return ResumeError(f"{checkpoint} is at step {step}, at or past this run's last step {last_step}: nothing would "
                       "be trained and its weights saved as this run's; raise --max_steps or --num_train_epochs, "
                       "start in a new --output_dir, or add --force_resume to accept it")


def continue_command(argv: list[str]) -> str:
    """The command line that resumes an interrupted ``minicpm-train run ARGV``."""
    kept, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0].replace("-", "_")
        if skip:
            skip = False
        elif name == "__resume_from_checkpoint":
            skip = "=" not in token
        else:
            kept.append(token)
    return shlex.join(["minicpm-train", *kept, "--resume_from_checkpoint", "auto"])


def interrupted_message(output_dir: Path, argv: list[str]) -> str:
    """The one line a run stopped with Ctrl-C ends with: what was saved, and the command that continues it."""
    from minicpm_train.args import latest_checkpoint

    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        return f"interrupted: no checkpoint saved yet in {output_dir}; run the same command again to start over"
    return (f"interrupted: the last checkpoint is {checkpoint} (step {checkpoint_step(checkpoint)}); continue with: "
            f"{continue_command(argv)}")


def _span(steps: list[int]) -> str:
    return f"checkpoint-{steps[0]}" if len(steps) == 1 else f"checkpoint-{steps[0]} to checkpoint-{steps[-1]}"
