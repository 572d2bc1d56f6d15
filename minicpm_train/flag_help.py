"""What ``minicpm-train run --help`` and ``plan --help`` show: the run's flags in groups, each own flag with its
default, and ``--help_all``: every Hugging Face ``TrainingArguments`` flag, from transformers' own parser.

The groups are a mapping keyed by flag name, so a new :class:`~minicpm_train.args.RunOptions` field only needs
its name added to one group (a test checks that every field is in exactly one). ``--help`` never imports
transformers: the Hugging Face flags of the guide's group are described here, their defaults by ``--help_all``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

from minicpm_train.args import LaunchOptions, RunOptions

GUIDE_GROUP = "The guide's finetune.py flags"
DEVICE_GROUP = "Device selection (as the deepspeed launcher takes them)"

# Group title -> flag names (flag_name spelling, no dashes), in the order shown.
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    GUIDE_GROUP: (
        "model_name_or_path", "output_dir", "train_data_path", "eval_data_path", "model_max_length", "use_lora",
        "qlora", "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
        "gradient_accumulation_steps", "warmup_steps", "max_steps", "num_train_epochs", "weight_decay", "bf16",
        "fp16", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "seed", "log_level",
        "logging_strategy", "logging_steps", "deepspeed", "resume_from_checkpoint",
    ),
    "LoRA and QLoRA": ("lora_r", "lora_alpha", "lora_dropout", "lora_target"),
    "Data, template, packing and cache": ("template", "train_on", "truncation", "packing", "data_cache_dir"),
    "Precision, loss and remote code": ("precision", "loss_impl", "trust_remote_code"),
    "Preference training (DPO, KTO)": ("stage", "beta", "pref_loss", "sft_weight", "ref_model", "desirable_weight",
                                       "undesirable_weight"),
    "Re-runs into an output folder": ("overwrite_output_dir", "force_resume"),
    DEVICE_GROUP: ("include", "exclude", "num_gpus", "num_nodes", "node_rank", "hostfile", "master_port",
                   "master_addr"),
}

# Help for the flags that are not RunOptions fields (those carry their own in the field's metadata).
FLAG_HELP: dict[str, str] = {
    "output_dir": "Folder for the weights, checkpoints, run_config.json, metrics.json and loss_curve.png.",
    "learning_rate": "Peak learning rate.",
    "per_device_train_batch_size": "Training micro batch per GPU (or CPU process).",
    "per_device_eval_batch_size": "Evaluation batch per GPU.",
    "gradient_accumulation_steps": "Micro batches per optimizer step.",
    "warmup_steps": "Steps of linear warm-up.",
    "max_steps": "Optimizer steps to train; overrides --num_train_epochs.",
    "num_train_epochs": "Epochs to train when --max_steps is not given.",
    "weight_decay": "AdamW weight decay.",
    "bf16": "Mixed precision in bf16 (ignored on CPU; see --precision).",
    "fp16": "Mixed precision in fp16 (refused on CPU).",
    "eval_strategy": "no, steps or epoch (old name: --evaluation_strategy).",
    "eval_steps": "Evaluate every N steps.",
    "save_strategy": "no, steps, epoch or best.",
    "save_steps": "Save a checkpoint-N folder every N steps.",
    "seed": "Random seed.",
    "log_level": "transformers' log level: debug, info, warning, error, passive.",
    "logging_strategy": "no, steps or epoch.",
    "logging_steps": "Log the loss every N steps (here: step 1, then every 10, unless given).",
    "deepspeed": "A config file, inline JSON, or a preset: zero2, zero2_offload, zero3, zero3_offload; "
                 "none switches it off.",
    "resume_from_checkpoint": "A checkpoint-N folder, or auto: the latest complete one in --output_dir.",
    "include": "GPUs to use: localhost:0,1 (or host1:0,1@host2:2).",
    "exclude": "GPUs not to use, in --include's form.",
    "num_gpus": "GPUs per node (torchrun: --nproc_per_node).",
    "num_nodes": "Nodes of the run: with --hostfile, or with --node_rank on each node.",
    "node_rank": "This node's number (0 to --num_nodes - 1) when the run is started once on each node.",
    "hostfile": "File listing the nodes: one 'HOST slots=N' line each.",
    "master_port": "Port of the rank-0 process.",
    "master_addr": "Address of the rank-0 node (node 0), reachable from every node.",
}

# How a default is shown where the field's value alone would not say it.
DEFAULT_TEXT: dict[str, str] = {
    "model_name_or_path": "required",
    "train_data_path": "required by run",
    "eval_data_path": "none: no evaluation",
    "lora_target": "the architecture's attention pair",
    "template": "detected",
    "precision": "from --bf16/--fp16",
    "data_cache_dir": "~/.cache/minicpm-finetune/tokenized",
    "ref_model": "the base model",
    "include": "every GPU",
    "num_gpus": "every GPU",
    "num_nodes": "1; with --hostfile, all its nodes",
    "node_rank": "none: one start for all nodes; inside srun: SLURM_NODEID",
    "master_port": "29500",
}

_DEFAULT_IN_HELP = re.compile(r"\s*\(default: [^)]*\)|;\s*default: [^.]*")


@dataclasses.dataclass(frozen=True)
class FlagLine:
    """One row of the grouped help: the flag with its value placeholder, what it does, its default."""

    flag: str
    help: str
    default: str | None  # None: a Hugging Face flag, whose default --help_all shows


def own_fields() -> dict[str, dataclasses.Field]:
    """This toolkit's own flags: the fields of RunOptions and LaunchOptions, by name."""
    return {f.name: f for options in (RunOptions, LaunchOptions) for f in dataclasses.fields(options)}


def _placeholder(field: dataclasses.Field) -> str:
    kind = str(field.type)
    if "bool" in kind:
        return ""
    return " INT" if "int" in kind else " FLOAT" if "float" in kind else " TEXT"


def _default(name: str, field: dataclasses.Field) -> str:
    if name in DEFAULT_TEXT:
        return DEFAULT_TEXT[name]
    if isinstance(field.default, bool):
        return "on" if field.default else "off"
    return "none" if field.default is None else str(field.default)


def flag_lines(group: str) -> list[FlagLine]:
    """The rows of one group, in its order."""
    fields = own_fields()
    lines = []
    for name in FLAG_GROUPS[group]:
        field = fields.get(name)
        if field is None:  # a Hugging Face TrainingArguments flag
            lines.append(FlagLine(f"--{name}", FLAG_HELP[name], None))
            continue
        text = FLAG_HELP.get(name) or _DEFAULT_IN_HELP.sub("", field.metadata.get("help", ""))
        lines.append(FlagLine(f"--{name}{_placeholder(field)}", text, _default(name, field)))
    return lines


def render_groups(console, command_path: str) -> None:
    """Print every group as a panel (in the style of Typer's own Options panel), then the line on HF flags."""
    from rich import box
    from rich.markup import escape
    from rich.padding import Padding
    from rich.panel import Panel
    from rich.table import Table

    for group in FLAG_GROUPS:
        table = Table(box=None, show_header=False, padding=(0, 1), expand=True)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column(ratio=1)
        for line in flag_lines(group):
            default = "  [dim]\\[HF][/]" if line.default is None else f"  [dim]\\[default: {escape(line.default)}][/]"
            table.add_row(escape(line.flag), escape(line.help) + default)
        console.print(Panel(table, title=group, title_align="left", box=box.ROUNDED, border_style="dim"))
    console.print(Padding(
        f"\\[HF]: a Hugging Face TrainingArguments flag. Every TrainingArguments flag is accepted, in either "
        f"spelling (--max_steps or --max-steps); [bold]{escape(command_path)} --help_all[/] lists them with "
        f"their defaults.", (0, 1)), highlight=False)


class _CompactHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with one spelling per flag and a short value placeholder; long choice lists go into
    the help text instead of the flag's line (``--optim`` has forty)."""

    _LONGEST_INLINE_CHOICES = 40

    def _format_action_invocation(self, action: argparse.Action) -> str:
        flag = action.option_strings[0]
        if action.nargs == 0:
            return flag
        if action.nargs == "?" and action.const is True:  # HfArgumentParser's booleans: --bf16 [true|false]
            return f"{flag} [true|false]"
        if action.choices and len(",".join(map(str, action.choices))) <= self._LONGEST_INLINE_CHOICES:
            return f"{flag} {{{','.join(map(str, action.choices))}}}"
        kind = getattr(action.type, "__name__", "")
        return f"{flag} {kind.upper() if kind in ('int', 'float') else 'VALUE'}"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action) or ""
        if action.choices and len(",".join(map(str, action.choices))) > self._LONGEST_INLINE_CHOICES:
            text += " Choices: " + ", ".join(map(str, action.choices)) + "."
        return text


def training_arguments_help(command_path: str) -> str:
    """Every ``TrainingArguments`` flag with its help and default, from transformers' own ``HfArgumentParser``."""
    import transformers
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(
        TrainingArguments, prog=command_path, usage=f"{command_path} [FLAGS]", allow_abbrev=False, add_help=False,
        formatter_class=_CompactHelpFormatter,
        description=f"The Hugging Face TrainingArguments flags of transformers {transformers.__version__}, "
                    f"accepted by {command_path} as by transformers' own scripts, in either spelling "
                    f"(--max_steps or --max-steps). This toolkit's own flags: {command_path} --help.")
    return parser.format_help()
