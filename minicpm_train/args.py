"""The training command line: the guide's flags, legacy names, ``--config`` and ``--script``.

Everything ends in one :class:`ResolvedRun`: our own options (:class:`RunOptions`), the launcher's
(:class:`LaunchOptions`), the HF ``TrainingArguments`` keys the user set, environment variables the
guide's script exports, and the notices to show. Parsing uses transformers' ``HfArgumentParser`` over
``TrainingArguments``, so every one of its flags works; ``TrainingArguments`` itself is built later, in
the recipe, after the hardware decisions (building it touches devices and DeepSpeed).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm_data.errors import MinicpmError

PRESETS = ("zero2", "zero2_offload", "zero3", "zero3_offload")
PRESET_DIR = Path(__file__).resolve().parent / "deepspeed"

# Flags transformers renamed or removed: old name -> today's name.
LEGACY_RENAMES = {
    "evaluation_strategy": "eval_strategy",
    "no_cuda": "use_cpu",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
}
# `--group_by_length` became `--train_sampling_strategy group_by_length`.
LEGACY_GROUP_BY_LENGTH = "group_by_length"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # the Trainer's checkpoint folder names
NO_RESUME = (None, "", "false", "False")  # --resume_from_checkpoint values meaning a fresh start


class ArgumentError(MinicpmError):
    """A flag, config file or guide script could not be understood."""


@dataclass
class RunOptions:
    """Options of ``minicpm-train run`` beyond HF ``TrainingArguments`` (the guide's finetune.py ones first)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Local model folder."})
    train_data_path: str | None = field(default=None, metadata={"help": "Converted JSON or JSONL training file."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Converted JSON or JSONL evaluation file."})
    model_max_length: int = field(default=512, metadata={"help": "Longest sample in tokens; longer ones are truncated."})
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    qlora: bool = field(default=False, metadata={"help": "LoRA over a 4-bit (nf4) quantised base model."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names, or 'all-linear'; default: the architecture's attention pair."},
    )
    template: str | None = field(default=None, metadata={"help": "Chat layout: chatml or minicpm2 (default: detected)."})
    truncation: str = field(default="right", metadata={"help": "Truncation policy of the renderer."})
    packing: bool = field(default=False, metadata={"help": "Pack several samples per row; they never attend to each other."})
    precision: str | None = field(
        default=None,
        metadata={"help": "auto, bf16, fp16 or fp32; auto picks the best the hardware has (default: from --bf16/--fp16)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model folder's own Python code to run."})
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "Where tokenized data is cached (default: ~/.cache/minicpm-finetune/tokenized)."}
    )


@dataclass
class LaunchOptions:
    """The ``deepspeed`` launcher's device-selection flags, accepted on our command line too."""

    include: str | None = None
    exclude: str | None = None
    num_gpus: int | None = None
    num_nodes: int | None = None
    hostfile: str | None = None
    master_port: int | None = None
    master_addr: str | None = None


@dataclass
class ResolvedRun:
    """One training run, fully resolved from flags, config file and script."""

    options: RunOptions
    launch: LaunchOptions
    training: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": dataclasses.asdict(self.options),
            "launch": dataclasses.asdict(self.launch),
            "training": self.training,
            "env": self.env,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResolvedRun":
        return cls(RunOptions(**data["options"]), LaunchOptions(**data["launch"]), dict(data["training"]),
                   dict(data.get("env", {})))


# --- flags ------------------------------------------------------------------------------------------


def _launch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for option in dataclasses.fields(LaunchOptions):
        parser.add_argument(f"--{option.name}", type=int if "int" in str(option.type) else str)
    parser.add_argument("--nproc_per_node", dest="num_gpus", type=int)  # torchrun's name for it
    return parser


def _hf_parser():
    from transformers import HfArgumentParser, TrainingArguments

    return HfArgumentParser((RunOptions, TrainingArguments), allow_abbrev=False)


def _training_fields() -> dict[str, Any]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def flag_name(name: str) -> str:
    """The one spelling of a flag name: ``max-new-tokens`` and ``max_new_tokens`` are the same flag."""
    return name.replace("-", "_")


def _canonical_flag(token: str) -> str:
    """A ``--flag`` or ``--flag=value`` token with the name in :func:`flag_name` spelling; values unchanged."""
    if not token.startswith("--"):
        return token
    name, eq, value = token[2:].partition("=")
    return f"--{flag_name(name)}{eq}{value}"


def _rename_legacy(argv: list[str], notices: list[str]) -> list[str]:
    """Map renamed HF flags to today's names, with a one-line notice each."""
    renamed: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        name, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if name in LEGACY_RENAMES:
            new = LEGACY_RENAMES[name]
            notices.append(f"--{name} is the old name of --{new} (renamed in transformers); using --{new}")
            renamed.append(f"--{new}{eq}{value}")
        elif name == LEGACY_GROUP_BY_LENGTH:
            notices.append("--group_by_length is now --train_sampling_strategy group_by_length; using that")
            if not eq and index + 1 < len(argv) and argv[index + 1].lower() in ("true", "false"):
                index += 1
                value = argv[index]
            if value.lower() != "false":
                renamed += ["--train_sampling_strategy", "group_by_length"]
        else:
            renamed.append(token)
        index += 1
    return renamed


def _config_to_argv(path: Path) -> list[str]:
    """Turn a YAML or JSON config of flag names into argv tokens (so later flags override it)."""
    if not path.is_file():
        raise ArgumentError(f"config file not found: {path}")
    import yaml

    text = path.read_text(encoding="utf-8")
    is_json = path.suffix.lower() == ".json"
    try:
        data = json.loads(text) if is_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ArgumentError(f"{path}: not valid {'JSON' if is_json else 'YAML'}: {error}") from error
    if not isinstance(data, dict):
        raise ArgumentError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    argv: list[str] = []
    for key, value in data.items():
        key = str(key).lstrip("-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _extract_config(argv: list[str]) -> tuple[Path | None, list[str]]:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config")
    known, rest = parser.parse_known_args(argv)
    return (Path(known.config) if known.config else None), rest


def _raise_argument_error(message: str):
    raise ArgumentError(message)


def _given_dests(parser, argv: list[str]) -> set[str]:
    """The destinations of the flags that appear in ``argv`` (explicitly set, even to a default value)."""
    flags = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    return {action.dest for action in parser._actions if flags & set(action.option_strings)}


def parse_run_args(argv: list[str], *, env: dict[str, str] | None = None, notices: list[str] | None = None,
                   require_data: bool = True) -> ResolvedRun:
    """Resolve ``minicpm-train run`` flags (``--config FILE`` first, then the flags over it).

    ``require_data=False`` (for ``plan``) needs only the model, not ``--train_data_path`` / ``--output_dir``.
    """
    notices = list(notices or [])
    config_path, argv = _extract_config(argv)
    if config_path is not None:
        argv = _config_to_argv(config_path) + argv
    argv = _rename_legacy([_canonical_flag(token) for token in argv], notices)
    launch_ns, rest = _launch_parser().parse_known_args(argv)

    parser = _hf_parser()
    parser.error = _raise_argument_error  # one-line error instead of usage text and exit code 2
    namespace, unknown = parser.parse_known_args(rest)
    if unknown:
        known_flags = [a for action in parser._actions for a in action.option_strings]
        first = next((u for u in unknown if u.startswith("--")), unknown[0])
        close = difflib.get_close_matches(first.split("=")[0], known_flags, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ArgumentError(f"unrecognised argument {first}{hint}")
    values = vars(namespace)

    option_names = {f.name for f in dataclasses.fields(RunOptions)}
    options = RunOptions(**{k: values[k] for k in option_names})
    training_names = set(_training_fields())
    training = {k: values[k] for k in _given_dests(parser, rest) if k in training_names}

    _check_required(options, training, require_data)
    if "deepspeed" in training:
        training["deepspeed"] = resolve_deepspeed(training["deepspeed"], notices)
    return ResolvedRun(options, LaunchOptions(**vars(launch_ns)), training, dict(env or {}), notices)


def _check_required(options: RunOptions, training: dict[str, Any], require_data: bool) -> None:
    missing = [] if options.model_name_or_path else ["--model_name_or_path"]
    if require_data and not options.train_data_path:
        missing.append("--train_data_path")
    if require_data and not training.get("output_dir"):
        missing.append("--output_dir")
    if missing:
        raise ArgumentError(f"missing required flag{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    if options.qlora and not options.use_lora:
        options.use_lora = True  # the guide passes both; QLoRA is LoRA on a 4-bit base
    if training.get("deepspeed") and training.get("eval_on_start"):
        raise ArgumentError("--eval_on_start with --deepspeed: DeepSpeed cannot evaluate before training starts; "
                            "drop --eval_on_start (the first evaluation runs at --eval_steps)")
    if options.precision not in (None, "auto", "bf16", "fp16", "fp32"):
        raise ArgumentError(f"--precision must be auto, bf16, fp16 or fp32, not {options.precision!r}")
    _check_resume(training.get("resume_from_checkpoint"))


def _is_checkpoint(folder: Path) -> bool:
    """A complete Trainer checkpoint: its trainer_state.json is written last."""
    return (folder / "trainer_state.json").is_file()


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete ``checkpoint-N`` folder with the highest N (a half-written one is skipped)."""
    steps = {int(match[1]): p for p in output_dir.glob("checkpoint-*")
             if (match := _CHECKPOINT.fullmatch(p.name)) and _is_checkpoint(p)}
    return steps[max(steps)] if steps else None


def _check_resume(value: str | None) -> None:
    """``--resume_from_checkpoint`` names a checkpoint folder (``auto`` is resolved when the run starts)."""
    if value in NO_RESUME or value == "auto" or _is_checkpoint(Path(value)):
        return
    folder = Path(value)
    latest = latest_checkpoint(folder) if folder.is_dir() else None
    if latest is not None:
        raise ArgumentError(f"--resume_from_checkpoint {value} is a run folder, not a checkpoint: pass one of its "
                            f"checkpoints (the latest is {latest}) or auto")
    what = "has no trainer_state.json" if folder.is_dir() else "does not exist" if not folder.exists() else "is a file"
    raise ArgumentError(f"--resume_from_checkpoint {value} {what}: pass a checkpoint-N folder of an earlier run, "
                        "or auto (the latest in --output_dir)")


def resolve_deepspeed(value: str, notices: list[str]) -> str:
    """A DeepSpeed config path, inline JSON, or preset name -> a path or JSON string that exists."""
    if value.lstrip().startswith("{"):
        return value
    if value in PRESETS:
        return str(PRESET_DIR / f"{value}.json")
    if Path(value).is_file():
        return value
    stem = Path(value).stem.removeprefix("ds_config_")
    if stem in PRESETS:
        notices.append(f"--deepspeed {value} does not exist here; using the shipped preset '{stem}' "
                       f"({PRESET_DIR / f'{stem}.json'})")
        return str(PRESET_DIR / f"{stem}.json")
    raise ArgumentError(f"--deepspeed {value}: no such file, and not a preset ({', '.join(PRESETS)})")


# --- guide-style shell scripts --------------------------------------------------------------------


LAUNCHERS = ("deepspeed", "torchrun", "python", "python3", "accelerate")
_ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_DATE = re.compile(r"\$\(\s*date(?:\s+(\+?(?:\"[^\"]*\"|'[^']*'|[^\s)]+)))?\s*\)")
_CONTINUATION = re.compile(r"\\\s*(#.*)?$")


@dataclass
class GuideScript:
    """What a guide-style training script says: its launcher flags, training flags and environment."""

    path: Path
    launcher: str
    launcher_argv: list[str]
    program: str
    argv: list[str]
    env: dict[str, str]
    notices: list[str]


def _expand_date(text: str, now: time.struct_time) -> str:
    def replace(match: re.Match) -> str:
        fmt = (match.group(1) or "").replace('"', "").replace("'", "")
        return time.strftime(fmt[1:] if fmt.startswith("+") else "%a %b %d %H:%M:%S %Z %Y", now)

    return _DATE.sub(replace, text)


def _expand_vars(text: str, variables: dict[str, str]) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, os.environ.get(name, ""))

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", replace, text)


def _logical_lines(text: str, notices: list[str]) -> list[str]:
    """Join backslash continuations, also the guide's broken ``\\ # comment`` ones."""
    lines, current, commented = [], "", []
    for number, raw in enumerate(text.splitlines(), start=1):
        match = _CONTINUATION.search(raw)
        if match:
            if match.group(1):
                commented.append(str(number))
            current += raw[: match.start()] + " "
            continue
        lines.append(current + raw)
        current = ""
    if current:
        lines.append(current)
    if commented:
        notices.append(f"a comment after '\\' ends the command in bash (line {', '.join(commented)}): "
                       "read those lines as continuations, as the script meant")
    return lines


def read_guide_script(path: str | Path, *, known_flags: set[str] | None = None) -> GuideScript:
    """Read a guide-style ``finetune.sh``: variables, exports and the training command's flags.

    ``known_flags`` (names without dashes) lets bare ``use_lora`` / ``qlora`` words count as flags.
    """
    path = Path(path)
    if not path.is_file():
        raise ArgumentError(f"script not found: {path}")
    notices: list[str] = []
    variables: dict[str, str] = {}
    exported: dict[str, str] = {}
    now = time.localtime()
    command: list[str] | None = None
    for line in _logical_lines(path.read_text(encoding="utf-8"), notices):
        try:
            tokens = shlex.split(_expand_date(line, now), comments=True)
        except ValueError as error:
            raise ArgumentError(f"{path}: cannot read line {line.strip()[:60]!r}: {error}") from error
        if not tokens:
            continue
        is_export = tokens[0] == "export"
        assignments = tokens[1:] if is_export else tokens
        if all(_ASSIGNMENT.match(t) for t in assignments) and assignments:
            for token in assignments:
                name, value = _ASSIGNMENT.match(token).groups()
                variables[name] = _expand_vars(value, variables)
                if is_export:
                    exported[name] = variables[name]
            continue
        program = os.path.basename(tokens[0])
        if program in LAUNCHERS and command is None:
            command = [_expand_vars(t, variables) for t in tokens]
    if command is None:
        raise ArgumentError(f"{path}: no training command found (expected a line starting with "
                            f"{', '.join(LAUNCHERS)})")
    script_index = next((i for i, t in enumerate(command) if t.endswith(".py") or t == "-m"), None)
    if script_index is None:
        raise ArgumentError(f"{path}: the {command[0]} command names no Python script")
    if command[script_index] == "-m":
        script_index += 1
    launcher_argv = command[1:script_index]
    argv = _bare_flags(command[script_index + 1:], known_flags or set(), notices)
    return GuideScript(path, os.path.basename(command[0]), launcher_argv, command[script_index], argv,
                       exported, notices)


def _bare_flags(argv: list[str], known_flags: set[str], notices: list[str]) -> list[str]:
    fixed = []
    for token in argv:
        if not token.startswith("-") and token in known_flags:
            notices.append(f"'{token}' has no leading '--'; read as --{token}")
            token = f"--{token}"
        fixed.append(token)
    return fixed


def known_flag_names() -> set[str]:
    """Every flag name ``run`` accepts (without dashes)."""
    return ({f.name for f in dataclasses.fields(RunOptions)} | set(_training_fields())
            | {f.name for f in dataclasses.fields(LaunchOptions)} | set(LEGACY_RENAMES) | {LEGACY_GROUP_BY_LENGTH})


def resolve_script(path: str | Path, extra_argv: list[str]) -> tuple[GuideScript, ResolvedRun]:
    """A guide script's command, with ``extra_argv`` flags overriding it, resolved like flags."""
    script = read_guide_script(path, known_flags=known_flag_names())
    run = parse_run_args(script.launcher_argv + script.argv + extra_argv, env=script.env,
                         notices=script.notices)
    return script, run
