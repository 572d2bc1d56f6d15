"""The training run, top to bottom: load the tokenizer, the data, the model; train; save.

Called in-process by ``minicpm-train run`` (one device or CPU), or on every rank by the ``deepspeed`` launcher
(or torchrun) as ``python -m minicpm_train.recipe RESOLVED.json`` (several devices, several nodes).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from minicpm_data.errors import MinicpmError
from minicpm_train import nodes
from minicpm_train.args import ResolvedRun, latest_checkpoint
from minicpm_train.data import DataSummary
from minicpm_train.launch import name_cpu_accelerator
from minicpm_train.resume import RunIdentity, resume_point, write_record

Report = Callable[[str], None]


@dataclass
class RunResult:
    """What a finished run left behind."""

    output_dir: Path
    model: Any  # the trained model (a PeftModel for LoRA / QLoRA)
    metrics: dict[str, Any]
    train_summary: DataSummary
    eval_summary: DataSummary | None
    log_history: list[dict[str, Any]] = field(default_factory=list)


def _port_is_free(port: int) -> bool:
    """Whether torch's rendezvous store could listen on ``port``: bound the way it binds (all addresses,
    SO_REUSEADDR, so a closed connection still in TIME_WAIT does not count as busy)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _deepspeed_single_process_env(master_port: int | None, report: Report) -> None:
    """DeepSpeed outside its launcher looks for MPI unless these are set (the launcher sets its own).

    The port only serves this one process, so a busy one (another run from the same guide script, with
    the same ``--master_port``) is swapped for a free one instead of failing the run.
    """
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ[name] = value
    wanted = master_port or int(os.environ.get("MASTER_PORT", 0))
    port = wanted if wanted and _port_is_free(wanted) else _free_port()
    if wanted and port != wanted:
        report(f"note: port {wanted} is in use; this one-process run uses port {port} instead")
    os.environ["MASTER_PORT"] = str(port)


def _deepspeed_config(deepspeed: str | None) -> dict | None:
    """The DeepSpeed config a run names (a path, or inline JSON from a --config file)."""
    if not deepspeed:
        return None
    return json.loads(deepspeed if deepspeed.lstrip().startswith("{") else Path(deepspeed).read_text())


def _resume_point(run: ResolvedRun, value: str | None, output_dir: Path, report: Report) -> tuple[Path | None, RunIdentity]:
    """The checkpoint to resume from (None: a fresh start) and the identity checkpoints of this run carry;
    see :mod:`minicpm_train.resume` (a stale or foreign checkpoint, or an earlier run's folder, is an error)."""
    from dataclasses import asdict

    from minicpm_train.data import data_files, file_sha256

    options = run.options
    data = [[str(path), file_sha256(path), weight] for path, weight in data_files(options.train_data_path)]
    identity = RunIdentity(asdict(options), data)
    checkpoint = resume_point(value, output_dir, identity, max_steps=int(run.training.get("max_steps", -1)),
                              force=options.force_resume, overwrite=options.overwrite_output_dir,
                              main_process=os.environ.get("RANK", "0") == "0", report=report)
    return checkpoint, identity


def train(run: ResolvedRun, *, report: Report = lambda message: None, callbacks: tuple = (),
          under_launcher: bool = False) -> RunResult:
    """Run one training from a resolved run whose hardware decisions are already applied.

    ``under_launcher``: this is one rank started by the ``deepspeed`` launcher, which set the rendezvous.
    """
    if Path(run.options.model_name_or_path or "").is_dir():
        # Absolute, so the adapter's base_model_name_or_path (and run_config.json) work from any directory.
        absolute = str(Path(run.options.model_name_or_path).absolute())
        run = replace(run, options=replace(run.options, model_name_or_path=absolute))
    options, training = run.options, dict(run.training)
    os.environ.update(run.env)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output_dir = Path(training["output_dir"])
    precision = "bf16" if training.get("bf16") else "fp16" if training.get("fp16") else "fp32"
    device = "cpu" if training.get("use_cpu") else f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if device == "cpu":
        name_cpu_accelerator(os.environ)  # before anything imports deepspeed
    deepspeed = _deepspeed_config(training.get("deepspeed"))
    if deepspeed is not None:
        training["deepspeed"] = deepspeed
        if not under_launcher:
            _deepspeed_single_process_env(run.launch.master_port, report)
    if under_launcher and device == "cpu":
        nodes.join(training)  # the gloo group with --ddp_timeout (transformers drops it on CPU)

    if callbacks:  # the caller shows progress; transformers' own load / save bars would interleave with it
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

    # 1. Tokenizer: exactly as `minicpm-data stats` loads it, so training sees the ids stats showed.
    from minicpm_data.tokenizer import load_tokenizer, pad_token_id
    from minicpm_train import model as models

    model_config = models.read_model_config(options.model_name_or_path, trust_remote_code=options.trust_remote_code)
    report(f"model: {models.model_class(model_config, trust_remote_code=options.trust_remote_code)}")
    for notice in models.loading_notices(model_config, trust_remote_code=options.trust_remote_code):
        report(f"note: {notice}")
    # Where it starts, before anything is rendered or loaded: fresh, or from a checkpoint of this same run.
    resume, identity = _resume_point(run, training.pop("resume_from_checkpoint", None), output_dir, report)

    tokenizer = load_tokenizer(options.model_name_or_path, trust_remote_code=options.trust_remote_code)
    pad_id = pad_token_id(tokenizer)

    # 2. Data: each file validated and rendered in one streaming pass by the one renderer into a memory-mapped
    #    cache (the local main process renders, other ranks wait and map it); untrainable samples dropped, counted.
    from minicpm_train.data import PackingCollator, PaddingCollator, load_data, mix, named_sets, pack, trainer_class

    render_progress = next((c.render_progress for c in callbacks if hasattr(c, "render_progress")), None)
    preference = options.stage != "sft"  # dpo: pairs; kto: labelled answers (minicpm_train.preference)
    kind = {"sft": "messages", "dpo": "pairs", "kto": "kto"}[options.stage]

    def load(spec: str) -> tuple[list, DataSummary]:
        files, summary = load_data(spec, tokenizer, template=options.template, max_length=options.model_max_length,
                                   truncation=options.truncation,
                                   render_options={} if preference else {"train_on": options.train_on},
                                   cache_dir=options.data_cache_dir, kind=kind,
                                   local_main=os.environ.get("LOCAL_RANK", "0") == "0", on_progress=render_progress)
        for line in [file_summary.describe() for _, file_summary in files] + [summary.describe()] * (len(files) > 1):
            report(line)
        for note in (note for _, file_summary in files for note in file_summary.notes):
            report(f"note: {note}")
        return files, summary

    train_files, train_summary = load(options.train_data_path)
    eval_files, eval_summary = load(options.eval_data_path) if options.eval_data_path else ([], None)
    train_set, eval_sets = mix(train_files), named_sets(eval_files)  # several eval files: a loss for each
    if options.packing and not preference:  # preference batches pack in the collator: a pair's sides stay together
        train_set = pack(train_set, options.model_max_length)
        eval_sets = {name: pack(dataset, options.model_max_length) for name, dataset in eval_sets.items()}
        report(f"packing: {train_summary.epoch_samples} samples into {len(train_set)} rows")
    eval_set = eval_sets if len(eval_sets) > 1 else next(iter(eval_sets.values()), None)
    collator = (PackingCollator if options.packing else PaddingCollator)(pad_id)
    if preference:
        from minicpm_train.preference import PreferenceCollator, PreferenceSettings

        collator = PreferenceCollator(pad_id, packing=options.packing)
        settings = PreferenceSettings.of(options)

    # 3. Model: full, LoRA, or QLoRA (4-bit base + LoRA). Seeded first: LoRA's initial weights are drawn here,
    #    before the Trainer would seed, and --seed must decide them.
    from transformers import TrainingArguments, set_seed

    set_seed(training.get("seed", TrainingArguments.seed))
    checkpointing = bool(training.get("activation_checkpointing"))
    if options.qlora:  # (not under ZeRO-3: parse_run_args refuses that pairing)
        model = models.load_base_model(options, precision=precision, device=device, quantize_4bit=True)
        model = models.prepare_4bit_for_training(model, device=device, gradient_checkpointing=checkpointing)
        model = models.add_lora(model, options, model_config.get("model_type", ""))
    elif options.use_lora:
        model = models.load_base_model(options, precision=precision, device=device)
        if checkpointing:
            model.enable_input_require_grads()  # checkpointed frozen embeddings would otherwise cut the graph
        model = models.add_lora(model, options, model_config.get("model_type", ""))
    else:
        model = models.load_base_model(options, precision=precision, device=device)
    if options.use_lora:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        report(f"{'QLoRA' if options.qlora else 'LoRA'}: {trainable:,} trainable of {total:,} parameters")

    # 4. Trainer (DeepSpeed, when --deepspeed is set, is driven by the Trainer from the same arguments), whose
    #    loss goes chunk by chunk (or a fused kernel) through lm_head: no [batch, length, vocab] logits.
    from transformers import PrinterCallback

    from minicpm_train.callbacks import CheckpointFiles, LossGuard, ResumeGuard
    from minicpm_train.loss import make_trainer, resolve_loss
    from minicpm_train.memory import MemoryCallback, memory_record

    zero_stage = int(((deepspeed or {}).get("zero_optimization") or {}).get("stage", 0))
    loss = resolve_loss(options.loss_impl, model, device_type=device.split(":")[0], zero_stage=zero_stage)
    run.notices.append(loss.notice)
    report(loss.notice)

    training.setdefault("train_sampling_strategy",
                        "sequential" if options.packing and not preference else "group_by_length")
    training.setdefault("include_num_input_tokens_seen", "all" if options.packing else "non_padding")
    training.setdefault("remove_unused_columns", False)
    training.setdefault("logging_nan_inf_filter", False)  # a logged loss never averages a NaN away
    if "logging_steps" not in training:  # HF's 500 would leave a short run with no loss; the guide logs every 10
        training.update(logging_steps=10, logging_first_step=training.get("logging_first_step", True))
    if callbacks:
        training.setdefault("disable_tqdm", True)  # the caller's progress display replaces tqdm
    if eval_set is None:
        training["eval_strategy"] = "no"
    args = TrainingArguments(**training)
    # What was run (and on which data): run_config.json, in every checkpoint too, so a resume can be checked.
    record = {**run.to_dict(), "notices": run.notices, "training_arguments": args.to_sanitized_dict(),
              **identity.record()}
    memory = MemoryCallback()  # peak GPU memory per rank; measures nothing on CPU
    guard = LossGuard(train_summary.trained_tokens)  # garbage loss: an error, no save
    saved = CheckpointFiles(options.model_name_or_path, record)
    stale = [ResumeGuard(resume)] if resume and not options.force_resume else []
    trainer_kwargs = dict(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=collator, processing_class=tokenizer,
                          callbacks=[guard, *stale, saved, *callbacks, memory])
    if not preference:
        trainer = make_trainer(loss, trainer_class(), **trainer_kwargs)
    else:
        # 4b. Preference stages: the reference is the base with the adapter disabled (LoRA / QLoRA), or its
        #     log-probabilities computed once now, before the first step, and kept in each file's cache folder.
        from minicpm_train.preference import disable_dropout, make_preference_trainer, prepare_reference

        if disable_dropout(model):
            run.notices.append("dropout off for preference training (as TRL): the model's and the reference's "
                               "log-probabilities must differ by training only")
            report(run.notices[-1])
        if loss.impl == "fused":
            run.notices.append("loss: preference stages take log-probabilities chunk by chunk (no fused kernel)")
            report(run.notices[-1])
        for line in prepare_reference(run, model, collator, train_files + eval_files, args, precision=precision,
                                      full_logits=loss.impl == "full"):
            report(line)
        trainer = make_preference_trainer(settings, trainer_class(), full_logits=loss.impl == "full", **trainer_kwargs)
    guard.watch(trainer)
    if callbacks:
        trainer.remove_callback(PrinterCallback)
    # Several ranks (nodes): all hold the same rows and resume from the same step, or all stop here.
    rendered = [summary.path for _, summary in train_files + eval_files if not summary.from_cache]
    datasets = {"train": train_set, **{f"eval {name}": dataset for name, dataset in eval_sets.items()}}
    ranks = nodes.agree(datasets, rendered=rendered, resume=resume,
                        requested=run.training.get("resume_from_checkpoint"), output_dir=output_dir, report=report)

    # 5. Train; evaluate at the end (never before train(): DeepSpeed cannot evaluate an untrained engine).
    train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics = dict(train_output.metrics)
    if eval_set is not None:
        last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
        at_end = last is not None and last["step"] == trainer.state.global_step
        metrics.update({k: v for k, v in last.items() if k.startswith("eval_")} if at_end else trainer.evaluate())

    # 6. Save: weights (adapter or full model), the tokenizer's files as loaded, what was run, what was seen;
    # on GPUs also the planned vs measured memory, in one line.
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        models.copy_tokenizer_files(options.model_name_or_path, output_dir)
        measured = memory_record(run, memory.ranks) if memory.ranks else None
        if measured:
            report(measured["summary"])
        _write_outputs(output_dir, record, metrics, train_summary, eval_summary, trainer.state.log_history, measured,
                       ranks)
    return RunResult(output_dir, trainer.model, metrics, train_summary, eval_summary, trainer.state.log_history)


def _write_outputs(output_dir: Path, record: dict, metrics: dict, train_summary: DataSummary,
                   eval_summary: DataSummary | None, log_history: list[dict], memory: dict | None,
                   ranks: list[dict] | None = None) -> None:
    write_record(output_dir, record)
    summary = {"train": train_summary.to_dict(), "eval": eval_summary.to_dict() if eval_summary else None,
               **({"ranks": ranks} if ranks else {})}  # several ranks: each one's node, row fingerprints, renders
    (output_dir / "data_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    measured = {"memory": memory} if memory else {}
    (output_dir / "metrics.json").write_text(json.dumps({"final": metrics, "log_history": log_history, **measured},
                                                        indent=2) + "\n")
    plot_loss_curve(log_history, output_dir / "loss_curve.png")


def plot_loss_curve(log_history: list[dict], target: Path) -> None:
    """Train and eval loss against the optimizer step, as a PNG; for preference runs also the rewards of
    the chosen and rejected answers, their margin and the reward accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any("rewards/chosen" in entry or "rewards/margins" in entry for entry in log_history):
        from minicpm_train.preference import plot_rewards

        figure, (axes, rewards) = plt.subplots(1, 2, figsize=(13, 4))
        plot_rewards(log_history, rewards)
    else:
        figure, axes = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            few = len(points) <= 20  # a line alone would hide one point, and thin out a handful
            axes.plot(*zip(*points), marker="o" if key == "eval_loss" or few else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("loss")
    if axes.lines:
        axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """Entry for each rank under the launcher: ``python -m minicpm_train.recipe RESOLVED.json``."""
    argv = sys.argv[1:] if argv is None else argv
    resolved = Path(argv[0])
    run_rank(ResolvedRun.from_dict(json.loads(resolved.read_text())), errors=nodes.error_folder(resolved))


def run_rank(run: ResolvedRun, errors: Path | None = None) -> None:
    """Train as one rank of several; rank 0 shows progress. A library error, or another node lost, ends this
    rank with exit code 1 and one line for its node: left in ``errors`` for the node's ``minicpm-train run`` to
    print, or printed by the node's first rank (``nodes.stop``)."""
    from minicpm_train.callbacks import ProgressCallback

    rank_zero = os.environ.get("RANK", "0") == "0"
    report = print if rank_zero else (lambda message: None)
    progress = ProgressCallback()
    try:
        train(run, report=report, callbacks=(progress,) if rank_zero else (), under_launcher=True)
        nodes.end_finished_rank()
    except MinicpmError as error:  # every rank meets the same error: its node says it once
        progress.stop()
        nodes.stop(str(error), errors, lost=False)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: `minicpm-train run` says what was saved, once
        progress.stop()
        sys.exit(130)
    except Exception as error:
        cause = nodes.lost_contact(error)
        if cause is None:
            raise
        progress.stop()
        message = nodes.lost_contact_message(cause, run.training, latest_checkpoint(Path(run.training["output_dir"])))
        nodes.stop(message, errors, lost=True)


if __name__ == "__main__":
    main()
