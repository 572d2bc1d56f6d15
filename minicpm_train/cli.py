"""`minicpm-train`: run, plan, doctor, merge, chat, eval.

Command functions stay thin: parse options, call library code, print. Library code raises
``MinicpmError`` subclasses; ``main`` turns them into one line on stderr and exit code 1.
Heavy libraries are imported inside the commands that need them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from typer.core import TyperCommand
from rich.markup import escape

from minicpm_data.cli_app import err_console, make_app, run_app
from minicpm_train.args import flag_name

app = make_app("minicpm-train", "Train MiniCPM on minicpm-data output; plan memory, check the machine, merge, chat, "
                                "evaluate. Flags are written as the guide's finetune.py writes them (--max_new_tokens); "
                                "the other spelling works too (--max-new-tokens).")
console = Console()


def main() -> None:
    """Console-script entry: library errors and refused paths become one-line messages, exit code 1."""
    run_app(app)


def _command(name: str, *, passthrough: bool = False, **kwargs):
    """``app.command`` where every multi-word option takes both spellings (``--a-b`` and ``--a_b``).

    ``passthrough`` leaves unknown flags to the command (run and plan hand them to the HF parser) and shows
    those flags in the command's help.
    """
    settings = {"token_normalize_func": flag_name}
    if passthrough:
        settings.update(allow_extra_args=True, ignore_unknown_options=True)
        kwargs["cls"] = _RunFlagsCommand
    return app.command(name, context_settings=settings, **kwargs)


class _RunFlagsCommand(TyperCommand):
    """``run`` and ``plan``: their help adds the run's flags in groups (they reach the command as extra args)."""

    def format_help(self, ctx, formatter) -> None:
        super().format_help(ctx, formatter)
        from minicpm_train.flag_help import render_groups

        render_groups(Console(), ctx.command_path)


def _show_help_all(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from minicpm_train.flag_help import training_arguments_help

        with _quiet_loading():
            text = training_arguments_help(ctx.command_path)
        typer.echo(text, nl=False)
        raise typer.Exit()


_HELP_ALL = typer.Option(False, "--help_all", is_eager=True, expose_value=False, callback=_show_help_all,
                         show_default=False,
                         help="List every Hugging Face TrainingArguments flag (all accepted) with its default, "
                              "and exit.")
_CONFIG = typer.Option(None, "--config", help="A YAML or JSON file of flag names and values; flags given override it.")
_SCRIPT = typer.Option(None, "--script", help="A guide-style finetune shell script to read the flags from.")


def _show_notices(notices: list[str]) -> None:
    """Notes on stderr, so stdout keeps only the answer (chat --prompt) or the JSON (--json)."""
    for notice in notices:
        err_console.print(f"[yellow]note:[/] {escape(notice)}", highlight=False, soft_wrap=True)


# --- run -----------------------------------------------------------------------


def _run_argv(ctx: typer.Context, config: str | None) -> list[str]:
    """The run's flags as the parser takes them: ``--config`` (shown in the help as an option) first."""
    return (["--config", config] if config else []) + list(ctx.args)


def _show_script(script) -> None:
    from rich.table import Table

    table = Table(title=f"read from {script.path}", show_header=True, header_style="bold")
    table.add_column("flag")
    table.add_column("value")
    for name, value in script.env.items():
        table.add_row(f"export {name}", value)
    table.add_row(f"[dim]{script.launcher}[/]", " ".join(script.launcher_argv))
    flags, index = script.argv, 0
    while index < len(flags):
        has_value = index + 1 < len(flags) and not flags[index + 1].startswith("--")
        table.add_row(flags[index], flags[index + 1] if has_value else "(on)")
        index += 2 if has_value else 1
    console.print(table)


@_command(
    "run",
    passthrough=True,
    help="Train: the guide's finetune.py flags (any HF TrainingArguments flag), --config FILE, or --script FILE.sh.",
)
def run_command(
    ctx: typer.Context,
    script: str = _SCRIPT,
    config: str = _CONFIG,
    dry_run: bool = typer.Option(False, "--dry_run", help="Show the resolved run and the hardware decisions only."),
    help_all: bool = _HELP_ALL,
) -> None:
    import json
    import logging

    # bitsandbytes warns on import that an optional CPU kernel cannot be downloaded (we run offline).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from minicpm_train.args import parse_run_args
    from minicpm_train.guide_script import resolve_script
    from minicpm_train.launch import launcher_command, plan_run, run_launcher

    argv = _run_argv(ctx, config)
    if script:
        guide, run = resolve_script(script, argv)
        _show_script(guide)
        if argv:
            console.print(f"over the script, from the command line: {escape(' '.join(argv))}", highlight=False)
    else:
        run = parse_run_args(argv)
    run, plan = plan_run(run)
    for notice in run.notices:
        console.print(f"[yellow]note:[/] {escape(notice)}", highlight=False)
    where = f"{plan.ranks} CPU process{'es' if plan.ranks > 1 else ''}" if plan.device == "cpu" else f"{plan.ranks} GPU(s)"
    if plan.nodes > 1:
        node = f"node {plan.node_rank} of {plan.nodes}" if plan.node_rank is not None else f"{plan.nodes} nodes"
        where = f"{node}, {where} {'here' if plan.node_rank is not None else 'each'}"
    console.print(f"run: {plan.mode.replace('_', '-')} on {where}, {plan.precision}, "
                  f"{'QLoRA' if run.options.qlora else 'LoRA' if run.options.use_lora else 'full'}"
                  f"{', DeepSpeed ' + Path(run.training['deepspeed']).stem if run.training.get('deepspeed') else ''}"
                  f" -> {run.training['output_dir']}", highlight=False)
    if dry_run:
        if plan.mode == "launcher":
            console.print(" ".join(launcher_command(plan, Path("RESOLVED.json"))), highlight=False)
        elif plan.mode == "rank":
            console.print(" ".join(f"{k}={v}" for k, v in plan.env.items()), highlight=False)
        return
    from minicpm_train.resume import interrupted_message

    try:
        if plan.mode == "launcher":
            code = run_launcher(run, plan)  # 0, or a LaunchError
            if plan.node_rank:  # node 0's rank 0 writes the outputs; the others only say they are done
                console.print(f"done: node {plan.node_rank} of {plan.nodes} finished; node 0 writes the outputs",
                              highlight=False)
            else:
                output_dir = Path(run.training["output_dir"])
                _print_done(json.loads((output_dir / "metrics.json").read_text())["final"], output_dir)
            raise typer.Exit(code)
        if plan.mode == "rank":  # srun started this process as one rank of the run
            import os

            from minicpm_train.recipe import run_rank

            os.environ.update(run.env)
            run_rank(run)
            return

        from minicpm_train.callbacks import ProgressCallback
        from minicpm_train.recipe import train

        progress = ProgressCallback(console)
        try:
            result = train(run, report=lambda m: console.print(m, highlight=False, markup=False), callbacks=(progress,))
        finally:
            progress.stop()  # before an error line, if training stopped on one
    except KeyboardInterrupt:  # Ctrl-C: one line on what was saved and how to go on, exit code 130 as for SIGINT
        err_console.print(escape(interrupted_message(Path(run.training["output_dir"]), sys.argv[1:])),
                          highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    _print_done(result.metrics, result.output_dir)


def _print_done(metrics: dict, output_dir: Path) -> None:
    import json

    final = {k: metrics[k] for k in ("train_loss", "eval_loss", "train_runtime") if k in metrics}
    console.print(f"done: {json.dumps(final)}; outputs in {output_dir}", highlight=False)


# --- plan / doctor / merge / chat / eval ------------------------

_VERDICT_STYLE = {"fits": "green", "tight": "yellow", "does not fit": "red", "unknown": "dim",
                  "ok": "green", "warn": "yellow", "fail": "red", "info": "dim"}


class _quiet_loading:
    """Hide what libraries log while they import and load: bitsandbytes' offline kernel download,
    DeepSpeed's "Setting accelerator to CPU", peft's deprecation warnings. Errors still show."""

    def __enter__(self) -> None:
        import logging
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", FutureWarning)
        logging.disable(logging.WARNING)

    def __exit__(self, *exc) -> None:
        import logging

        logging.disable(logging.NOTSET)
        self._warnings.__exit__(*exc)


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def _show_plan(report) -> None:
    from rich.table import Table

    from minicpm_train.plan import gpus_text, memory_terms

    e, s = report.estimate, report.settings
    ds = s.deepspeed.name if s.deepspeed else "none"
    padding = "padded to max" if s.pad_to_max else "dynamic padding"
    table = Table(title=f"{report.model}: {s.method}, {s.precision}, micro batch {s.micro_batch} x "
                        f"{s.max_length} tokens ({padding}, accumulation {s.gradient_accumulation}), checkpointing "
                        f"{'on' if s.gradient_checkpointing else 'off'}, DeepSpeed {ds}, {gpus_text(s)}",
                  header_style="bold")
    table.add_column("per GPU")
    table.add_column("memory", justify="right")
    table.add_column("what")
    for term in memory_terms(e, s):
        table.add_row(term.label, _gib(term.bytes), escape(term.what))
    table.add_row("[bold]total[/]", f"[bold]{_gib(e.total)}[/]", "what nvidia-smi shows at the peak")
    table.add_row("offloaded to CPU memory", _gib(e.cpu_offload), "per node, by the DeepSpeed offload preset")
    console.print(table)
    for note in e.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False)
    verdict = report.verdict
    style = _VERDICT_STYLE[verdict]
    if report.gpu_memory is None:
        console.print(f"[{style}]verdict: unknown[/] (no GPU detected: pass --gpu_memory GB)", highlight=False)
    else:
        gpu = f"{report.gpu_name}, " if report.gpu_name else ""
        console.print(f"[{style}]verdict: {verdict}[/] ({_gib(e.total)} of {gpu}{_gib(report.gpu_memory)} per GPU)",
                      highlight=False)
    for suggestion in report.suggestions:
        mark = "fits" if suggestion.fits else "still does not fit"
        cpu = f", {_gib(suggestion.cpu_offload)} in CPU memory" if suggestion.cpu_offload else ""
        console.print(f"  try {suggestion.change}: {_gib(suggestion.total)} ({mark}{cpu})\n"
                      f"      {' '.join(suggestion.settings.flags())}", highlight=False)


def _show_comparison(comparison) -> None:
    from rich.table import Table

    table = Table(title=f"{comparison.output_dir}: planned vs measured per GPU", header_style="bold")
    for column in ("rank", "GPU", "", "planned", "measured", "difference"):
        table.add_column(column, justify="right" if column in ("planned", "measured", "difference") else "left")
    for row in comparison.rows():
        table.add_row(*row)
    console.print(table)
    for note in comparison.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False)


@_command(
    "plan",
    passthrough=True,
    help="Estimate per-GPU memory of a run before starting it: the same flags and --config as run; "
         "--from_run compares a finished run's plan with what it measured.",
)
def plan_command(
    ctx: typer.Context,
    script: str = _SCRIPT,
    config: str = _CONFIG,
    gpu_memory: float = typer.Option(None, "--gpu_memory", help="GPU memory in GB (GiB) to judge against; "
                                                                 "default: the detected GPU."),
    pad_to_max: bool = typer.Option(False, "--pad_to_max", help="Plan as OpenBMB's finetune.py ran: every sample "
                                                                "padded to model_max_length, full logits."),
    from_run: str = typer.Option(None, "--from_run", help="A finished run's output folder: its plan against the "
                                                          "GPU memory it measured."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    help_all: bool = _HELP_ALL,
) -> None:
    import json

    if from_run:
        from minicpm_train.memory import compare_run
        from minicpm_train.plan import PlanError

        if ctx.args or script or config or pad_to_max:
            raise PlanError("--from_run takes no run flags: it plans from the run's own run_config.json")
        with _quiet_loading():
            comparison = compare_run(from_run)
        if as_json:
            print(json.dumps(comparison.to_dict(), indent=2, ensure_ascii=False))
        else:
            _show_comparison(comparison)
        return
    from minicpm_train.plan import plan_from_argv

    with _quiet_loading():
        report = plan_from_argv(_run_argv(ctx, config), script=script, gpu_memory_gib=gpu_memory,
                                pad_to_max=pad_to_max)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        _show_plan(report)


_ADAPTER = typer.Option(None, "--adapter", help="A LoRA adapter folder (a LoRA run's output or checkpoint).")
_TRUST = typer.Option(False, "--trust_remote_code", help="Allow the model folder's own Python code to run.")
_TEMPLATE = typer.Option(None, "--template", help="Chat layout: chatml or minicpm2 (default: detected).")


@_command("doctor", help="Check what a run depends on: Python, torch/CUDA, GPUs, bf16, NCCL, DeepSpeed ops, "
                         "bitsandbytes, library versions; with --model, the folder's files and the class it "
                         "loads with.")
def doctor_command(
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
    model: str = typer.Option(None, "--model", help="A model folder: check its files (every problem at once) and "
                                                    "say which class it loads with (built-in MiniCPM, "
                                                    "transformers' own, or its remote code)."),
    trust_remote_code: bool = _TRUST,
) -> None:
    import dataclasses
    import json

    from rich.table import Table

    from minicpm_train.doctor import check, gather, model_checks, overall

    checks = check(gather())
    if model:
        with _quiet_loading():
            checks += model_checks(model, trust_remote_code=trust_remote_code)
    verdict = overall(checks)
    if as_json:
        print(json.dumps({"verdict": verdict, "checks": [dataclasses.asdict(c) for c in checks]}, indent=2))
    else:
        table = Table(title="minicpm-train doctor", header_style="bold")
        for column in ("item", "value", "verdict", "advice"):
            table.add_column(column)
        for c in checks:
            style = _VERDICT_STYLE[c.verdict]
            table.add_row(c.item, c.value, f"[{style}]{c.verdict}[/]", c.advice)
        console.print(table)
        console.print(f"[{_VERDICT_STYLE[verdict]}]overall: {verdict}[/]", highlight=False)
    if verdict == "fail":
        raise typer.Exit(1)


@_command("merge", help="Merge a LoRA adapter into its base: a full model folder plain transformers loads.")
def merge_command(
    base: str = typer.Option(..., "--base", help="The base model folder the adapter was trained on."),
    adapter: str = typer.Option(..., "--adapter", help="The LoRA adapter folder."),
    output: str = typer.Option(..., "-o", "--output", help="New folder for the merged model."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's), bf16, fp16 or fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files in a non-empty output folder."),
    trust_remote_code: bool = _TRUST,
) -> None:
    from minicpm_train.merge import merge_adapter

    with console.status("merging"), _quiet_loading():
        result = merge_adapter(base, adapter, output, dtype=dtype, trust_remote_code=trust_remote_code,
                               overwrite=overwrite)
    _show_notices(result.notices)
    console.print(f"merged {result.adapter} into {result.base}: {result.parameters:,} parameters, {result.dtype} "
                  f"-> {result.output_dir} ({', '.join(result.files)})", highlight=False)


def _load_for_inference(model: str, adapter: str | None, trust_remote_code: bool):
    from minicpm_train.inference import load_model

    with err_console.status(f"loading {model}" + (f" + {adapter}" if adapter else "")), _quiet_loading():
        loaded = load_model(model, adapter, trust_remote_code=trust_remote_code)
    _show_notices(loaded.notices)
    return loaded


@_command("chat", help="Chat with a model in the terminal (streamed), rendered as training renders prompts.")
def chat_command(
    model: str = typer.Argument(..., help="Model folder (or a LoRA run's output folder)."),
    adapter: str = _ADAPTER,
    system: str = typer.Option(None, "--system", help="System message for the conversation."),
    prompt: str = typer.Option(None, "--prompt", help="Answer this one message and exit."),
    max_new_tokens: int = typer.Option(512, "--max_new_tokens", help="Longest answer in tokens."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(0.9, "--top_p", help="Nucleus sampling threshold."),
    template: str = _TEMPLATE,
    trust_remote_code: bool = _TRUST,
) -> None:
    from minicpm_train.chat import ChatSession, GenerationSettings

    settings = GenerationSettings(max_new_tokens, temperature, top_p)
    settings.check()
    from minicpm_train.inference import training_options

    loaded = _load_for_inference(model, adapter, trust_remote_code)
    template = template or training_options(loaded).get("template")
    session = ChatSession(loaded.model, loaded.tokenizer, system=system, template=template, settings=settings)

    def stream(text: str) -> None:
        print(text, end="", flush=True)

    if prompt is not None:
        session.ask(prompt, on_text=stream)
        print()
        return
    console.print("[dim]chat: /reset starts over, /exit or Ctrl-D quits[/]")
    while True:
        try:
            text = console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            session.reset()
            console.print("[dim](new conversation)[/]")
            continue
        if not text.strip():
            continue
        console.print("[bold green]assistant>[/] ", end="")
        try:
            session.ask(text, on_text=stream)
        except KeyboardInterrupt:
            console.print("[dim](interrupted)[/]")
            continue
        print()


def _show_eval(result, predictions_path) -> None:
    from rich.table import Table

    from minicpm_train.evaluate import OTHER

    console.print(f"{result.samples} samples ({result.scored} with trained tokens), {result.trained_tokens} trained "
                  f"tokens: loss {result.loss:.4f}, perplexity {result.perplexity:.3f}", highlight=False)
    if result.accuracy is not None and result.labels:
        table = Table(title=f"exact-match accuracy {result.accuracy:.1%} ({len(result.generated)} greedy answers)",
                      header_style="bold")
        table.add_column("reference \\ predicted")
        confusion = result.confusion()
        predicted = result.labels + ([OTHER] if any(OTHER in row for row in confusion.values()) else [])
        for label in predicted:
            table.add_column(label, justify="right")
        table.add_column("accuracy", justify="right")
        per_label = result.per_label()
        for gold, row in confusion.items():
            correct, total = per_label.get(gold, (0, 0))
            table.add_row(gold, *(str(row.get(p, 0)) for p in predicted),
                          f"{correct / total:.1%} ({correct}/{total})" if total else "-")
        console.print(table)
    elif result.generated:
        console.print(f"{len(result.generated)} greedy answers written (free-form answers: no accuracy)")
    console.print(f"predictions: {predictions_path}", highlight=False)


@_command("eval", help="Loss and perplexity on assistant tokens; accuracy for label-set answers (OCNLI); "
                       "preference accuracy and margin on a file of pairs.")
def eval_command(
    model: str = typer.Argument(..., help="Model folder (or a LoRA run's output folder)."),
    data: str = typer.Option(..., "--data", help="Dev file in the messages or pairs format (JSON or JSONL)."),
    adapter: str = _ADAPTER,
    output: str = typer.Option(None, "-o", "--output",
                               help="Predictions JSONL (default: eval_<data>.jsonl in the adapter/model folder)."),
    labels: str = typer.Option("auto", "--labels", help="auto, none, or the label set: a,b,c."),
    generate: bool = typer.Option(None, "--generate/--no_generate",
                                  help="Greedy answers for every sample (default: only for a label set)."),
    max_length: int = typer.Option(None, "--model_max_length",
                                   help="Truncate samples (default: the run's, from its run_config.json)."),
    max_new_tokens: int = typer.Option(256, "--max_new_tokens", help="Longest free-form answer."),
    batch_size: int = typer.Option(8, "--batch_size", help="Samples per forward pass."),
    template: str = _TEMPLATE,
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    ref_model: str = typer.Option(None, "--ref_model", help="Pairs: the reference model folder (default: a LoRA "
                                                            "adapter disabled, or the base the run started from)."),
    beta: float = typer.Option(None, "--beta", help="Pairs: beta of the rewards (default: the run's, else 0.1)."),
    trust_remote_code: bool = _TRUST,
) -> None:
    import json

    from rich.progress import Progress

    from minicpm_data.io import read_conversations
    from minicpm_data.validate import file_kind, require_valid
    from minicpm_train.evaluate import check_predictions_path, evaluate, write_predictions
    from minicpm_train.inference import training_options

    if output:
        check_predictions_path(output)
    if file_kind(data) == "pairs":
        _eval_pairs(model, data, adapter, output, ref_model, beta, max_length, batch_size, template, as_json,
                    trust_remote_code)
        return
    require_valid(data)  # the whole file, as run checks it, before the model loads
    label_set = labels if labels in ("auto", "none") else [x.strip() for x in labels.split(",") if x.strip()]
    records = list(read_conversations(data))
    loaded = _load_for_inference(model, adapter, trust_remote_code)
    trained = training_options(loaded)  # render as the run did, unless told otherwise
    template = template or trained.get("template")
    max_length = max_length or trained.get("model_max_length")
    with Progress(console=err_console, transient=True) as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        result = evaluate(loaded.model, loaded.tokenizer, records, template=template, max_length=max_length,
                          train_on=trained.get("train_on", "all"),
                          batch_size=batch_size, labels=label_set, generate=generate, max_new_tokens=max_new_tokens,
                          progress=report)
    folder = loaded.adapter or loaded.base
    path = write_predictions(result, output or folder / f"eval_{Path(data).stem}.jsonl")
    if as_json:
        print(json.dumps({**result.metrics(), "predictions": str(path)}, indent=2, ensure_ascii=False))
    else:
        _show_eval(result, path)


def _eval_pairs(model, data, adapter, output, ref_model, beta, max_length, batch_size, template, as_json,
                trust_remote_code) -> None:
    """``eval`` on a file of preference pairs: reward accuracy and margin against the reference, and the
    model's own log-probability ranking (see minicpm_train.evaluate.PairEvalResult)."""
    import json

    from minicpm_data.io import read_examples
    from minicpm_data.validate import require_valid
    from minicpm_train.evaluate import evaluate_pairs, write_predictions
    from minicpm_train.inference import load_model, training_options

    require_valid(data, kind="pairs")
    pairs = list(read_examples(data, "pairs"))
    loaded = _load_for_inference(model, adapter, trust_remote_code)
    trained = training_options(loaded)
    reference, reference_name = None, "the model with its LoRA adapter disabled"
    if ref_model is None and loaded.adapter is None and trained.get("model_name_or_path") not in (None, str(loaded.base)):
        ref_model = trained["model_name_or_path"]  # a full fine-tuning's output: the model it started from
    if ref_model is not None:
        with err_console.status(f"loading the reference {ref_model}"), _quiet_loading():
            reference = load_model(ref_model, trust_remote_code=trust_remote_code).model
        reference_name = str(ref_model)
    elif loaded.adapter is None:
        reference_name = "the model itself (no adapter, no --ref_model): every reward is 0"
    beta = beta or trained.get("beta") or 0.1
    with err_console.status("scoring pairs"):
        result = evaluate_pairs(loaded.model, loaded.tokenizer, pairs, reference=reference,
                                reference_name=reference_name, beta=beta,
                                template=template or trained.get("template"),
                                max_length=max_length or trained.get("model_max_length"), batch_size=batch_size)
    folder = loaded.adapter or loaded.base
    path = write_predictions(result, output or folder / f"eval_{Path(data).stem}.jsonl")
    metrics = result.metrics()
    if as_json:
        print(json.dumps({**metrics, "predictions": str(path)}, indent=2, ensure_ascii=False))
        return
    dropped = ", ".join(f"{reason} {count}" for reason, count in metrics["dropped"].items())
    not_scored = f" ({dropped} not)" if dropped else ""
    merged = (f", {metrics['merged_boundary']} of them with an answer merged with the prompt's end"
              if metrics["merged_boundary"] else "")
    console.print(f"{metrics['pairs']} pairs, {metrics['scored']} scored{not_scored}{merged}; "
                  f"reference: {metrics['reference']}; beta {beta:g}", highlight=False)
    console.print(f"reward accuracy {metrics['accuracy']:.1%}, margin {metrics['margin']:.4f} (chosen "
                  f"{metrics['chosen_reward']:.4f}, rejected {metrics['rejected_reward']:.4f}); log-probability "
                  f"ranking: model {metrics['logp_accuracy']:.1%}, reference {metrics['reference_logp_accuracy']:.1%}",
                  highlight=False)
    console.print(f"predictions: {path}", highlight=False)


@_command("export", help="Write a model folder (merged or fully fine-tuned) as GGUF for llama.cpp, Ollama and LM "
                         "Studio, or with --lora a LoRA run's adapter as a GGUF LoRA; an Ollama Modelfile goes beside.")
def export_command(
    model: str = typer.Argument(..., help="A model folder (a merged or full run's output), or with --lora a LoRA "
                                          "run's output folder."),
    output: str = typer.Option(..., "-o", "--output", help="The file to write, FILE.gguf (FILE.Modelfile beside it)."),
    output_format: str = typer.Option("gguf", "--format", help="Output format: gguf."),
    outtype: str = typer.Option("auto", "--outtype", help="auto (bf16 for bf16 weights, else f16), f32, f16, bf16 "
                                                          "or q8_0."),
    lora: bool = typer.Option(False, "--lora", help="Export MODEL's LoRA adapter for llama.cpp's --lora."),
    base: str = typer.Option(None, "--base", help="With --lora: the base model the adapter applies to, as a GGUF "
                                                  "file or its folder (never the path recorded at training)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output and Modelfile."),
) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from minicpm_train.gguf_export import ExportError, export_lora, export_model

    if output_format != "gguf":
        raise ExportError(f"--format {output_format}: the only export format is gguf")
    if base and not lora:
        raise ExportError("--base is for --lora (the base a LoRA adapter applies to); a model folder exports alone")
    progress = Progress(TextColumn("writing {task.description}"), BarColumn(), DownloadColumn(),
                        TimeRemainingColumn(), console=err_console, transient=True)
    task = progress.add_task(Path(output).name, total=None)

    def on_progress(done: int, total: int) -> None:
        progress.start()  # shown once writing starts, so a refusal before it is one clean line
        progress.update(task, completed=done, total=total)

    try:
        with _quiet_loading():
            if lora:
                result = export_lora(model, base, output, outtype=outtype, force=force, on_progress=on_progress)
            else:
                result = export_model(model, output, outtype=outtype, force=force, on_progress=on_progress)
    finally:
        progress.stop()
    _show_notices(result.notices)
    console.print(f"exported {model} -> {result.path} ({result.architecture}, {result.outtype}, {result.tensors} "
                  f"tensors, {result.size / 1e6:,.1f} MB)", highlight=False)
    if result.modelfile.is_file():
        console.print(f"Ollama: ollama create NAME -f {result.modelfile}", highlight=False)


if __name__ == "__main__":
    main()
