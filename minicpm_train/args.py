"""The training command line: the guide's flags, legacy names, ``--config`` files and DeepSpeed presets.

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
    "gradient_checkpointing": "activation_checkpointing",  # deprecated in transformers 5, removed in 6
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}
# `--group_by_length` became `--train_sampling_strategy group_by_length`.
LEGACY_GROUP_BY_LENGTH = "group_by_length"
NO_RESUME = (None, "", "false", "False")  # --resume_from_checkpoint values meaning a fresh start
LOSS_IMPLS = ("auto", "chunked", "fused", "full")  # --loss_impl: how the loss meets lm_head (minicpm_train.loss)
STAGES = ("sft", "dpo", "kto")  # --stage: what a run trains (minicpm_train.preference for dpo / kto)
PREF_LOSSES = ("sigmoid", "ipo", "hinge")  # --pref_loss: the DPO loss
# OpenBMB's finetune/sft_dpo_trainer flags -> ours (--use_dpo true is --stage dpo).
OPENBMB_DPO_RENAMES = {"dpo_beta": "beta", "sft_loss_weight": "sft_weight", "reference_model_path": "ref_model"}
OPENBMB_USE_DPO = "use_dpo"
# Switches (an optional true / false after them) -> the flags they mean when on, and the notice then.
LEGACY_SWITCHES = {
    LEGACY_GROUP_BY_LENGTH: (["--train_sampling_strategy", "group_by_length"],
                             "--group_by_length is now --train_sampling_strategy group_by_length; using that"),
    OPENBMB_USE_DPO: (["--stage", "dpo"],
                      "--use_dpo (OpenBMB's sft_dpo_trainer) is --stage dpo; using it. As there, the loss is the DPO "
                      "loss plus --sft_weight times the chosen answers' SFT loss; unlike there, a sequence's "
                      "log-probability sums its answer tokens (the DPO paper's and TRL's form; OpenBMB's averages "
                      "every token, prompt included), and the reference is the base model without a second copy "
                      "(LoRA: adapter disabled)"),
}
QLORA_ZERO3 = "QLoRA with ZeRO-3 is not supported: use --deepspeed zero2_offload (the guide's QLoRA setting) or zero2"


class ArgumentError(MinicpmError):
    """A flag, config file or guide script could not be understood."""


@dataclass
class RunOptions:
    """Options of ``minicpm-train run`` beyond HF ``TrainingArguments`` (the guide's finetune.py ones first)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Local model folder."})
    train_data_path: str | None = field(default=None, metadata={
        "help": "Converted JSON or JSONL training file(s): comma-separated files, folders or globs, each with an "
                "optional :WEIGHT (times each sample is seen per epoch)."})
    eval_data_path: str | None = field(default=None, metadata={
        "help": "Converted JSON or JSONL evaluation file(s), as --train_data_path; each file gets its own loss."})
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
    train_on: str = field(default="all", metadata={
        "help": "Assistant turns trained: all, or last (only the final one); a turn's own train flag wins."})
    packing: bool = field(default=False, metadata={"help": "Pack several samples per row; they never attend to each other."})
    loss_impl: str = field(default="auto", metadata={"help": "How the loss is computed: auto, chunked, fused or full (full materialises [batch, length, vocab] logits)."})
    precision: str | None = field(
        default=None,
        metadata={"help": "auto, bf16, fp16 or fp32; auto picks the best the hardware has (default: from --bf16/--fp16)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model folder's own Python code to run."})
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "Where tokenized data is cached (default: ~/.cache/minicpm-finetune/tokenized)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an --output_dir that holds an earlier run's checkpoints (deletes them)."})
    force_resume: bool = field(default=False, metadata={
        "help": "Resume a checkpoint of another model, data or --max_steps anyway (refused otherwise)."})
    stage: str = field(default="sft", metadata={
        "help": "What to train: sft (conversations), dpo (preference pairs) or kto (answers labelled desirable or not)."})
    beta: float = field(default=0.1, metadata={
        "help": "DPO / KTO beta: how far the model may move from the reference (higher: less)."})
    pref_loss: str = field(default="sigmoid", metadata={"help": "DPO loss: sigmoid (DPO), ipo or hinge."})
    sft_weight: float = field(default=0.0, metadata={
        "help": "DPO: add this weight times the chosen answers' SFT loss (OpenBMB's --sft_loss_weight)."})
    ref_model: str | None = field(default=None, metadata={
        "help": "DPO / KTO reference model folder; default: the base model (LoRA: adapter disabled; full: "
                "log-probabilities computed once before training and cached)."})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of the desirable answers' losses."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of the undesirable answers' losses."})


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
    node_rank: int | None = None  # set: this node's part of a run started once per node (minicpm_train.nodes)


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
    parser.error = _raise_argument_error  # one-line error instead of usage text and exit code 2
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
    """Map renamed HF flags and OpenBMB's sft_dpo_trainer flags to today's names, and switches (``--group_by_length``,
    ``--use_dpo``, with an optional true / false) to the flags they mean, with a one-line notice each."""
    renamed: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        name, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if name in LEGACY_RENAMES or name in OPENBMB_DPO_RENAMES:
            new = LEGACY_RENAMES.get(name) or OPENBMB_DPO_RENAMES[name]
            whose = ("the old name of --{0} (renamed in transformers)" if name in LEGACY_RENAMES
                     else "OpenBMB sft_dpo_trainer's name for --{0}").format(new)
            notices.append(f"--{name} is {whose}; using --{new}")
            renamed.append(f"--{new}{eq}{value}")
        elif name in LEGACY_SWITCHES:
            if not eq and index + 1 < len(argv) and argv[index + 1].lower() in ("true", "false"):
                index += 1
                value = argv[index]
            if value.lower() != "false":
                meaning, notice = LEGACY_SWITCHES[name]
                notices.append(notice)
                renamed += meaning
        else:
            renamed.append(token)
        index += 1
    return renamed


def _did_you_mean(name: str, names) -> str:
    """``; did you mean X?`` for the closest of ``names``, or nothing."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _load_mapping(text: str, source: str, *, is_json: bool) -> dict[str, Any]:
    """The top-level mapping of a YAML or JSON text; a one-line error naming ``source`` otherwise."""
    import yaml

    try:
        data = json.loads(text) if is_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        mark = getattr(error, "problem_mark", None)
        line = getattr(error, "lineno", None) or (mark.line + 1 if mark else None)
        message = getattr(error, "msg", None) or getattr(error, "problem", None) or str(error)
        where = f" (line {line})" if line else ""
        raise ArgumentError(f"{source}: not valid {'JSON' if is_json else 'YAML'}{where}: "
                            f"{' '.join(message.split())}") from error
    if not isinstance(data, dict):
        raise ArgumentError(f"{source}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def read_mapping(path: Path) -> dict[str, Any]:
    """:func:`_load_mapping` of a ``.json`` (JSON) or other (YAML) file."""
    if not path.is_file():
        raise ArgumentError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ArgumentError(f"{path}: not a text file: {error.reason}") from error
    return _load_mapping(text, str(path), is_json=path.suffix.lower() == ".json")


def _config_to_argv(path: Path) -> list[str]:
    """Turn a YAML or JSON config of flag names into argv tokens (so later flags override it)."""
    known = known_flag_names()
    argv: list[str] = []
    for key, value in read_mapping(path).items():
        key = flag_name(str(key).lstrip("-"))
        if key not in known:
            raise ArgumentError(f"{path}: unknown key '{key}'{_did_you_mean(key, known)}")
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
        first = next((u for u in unknown if u.startswith("--")), unknown[0])
        known_flags = [a for action in parser._actions for a in action.option_strings]
        raise ArgumentError(f"unrecognised argument {first}{_did_you_mean(first.split('=')[0], known_flags)}")
    values = vars(namespace)

    option_names = {f.name for f in dataclasses.fields(RunOptions)}
    options = RunOptions(**{k: values[k] for k in option_names})
    training_names = set(_training_fields())
    training = {k: values[k] for k in _given_dests(parser, rest) if k in training_names}

    launch = LaunchOptions(**vars(launch_ns))
    _check_required(options, training, require_data)
    _check_preference(options)
    if launch.hostfile and not Path(launch.hostfile).is_file():
        raise ArgumentError(f"--hostfile {launch.hostfile} does not exist: it lists the nodes, one "
                            "'HOST slots=N' line each")
    if training.get("deepspeed") in ("", "none"):  # --deepspeed none: switch off a config file's DeepSpeed
        del training["deepspeed"]
    if "deepspeed" in training:
        training["deepspeed"] = resolve_deepspeed(training["deepspeed"], notices)
        if options.qlora and _zero_stage(training["deepspeed"]) == 3:
            raise ArgumentError(QLORA_ZERO3)
    return ResolvedRun(options, launch, training, dict(env or {}), notices)


def _check_preference(options: RunOptions) -> None:
    """The preference flags make sense together (one line each when they do not)."""
    if options.stage not in STAGES:
        raise ArgumentError(f"--stage must be one of {', '.join(STAGES)}, not {options.stage!r}")
    if options.pref_loss not in PREF_LOSSES:
        raise ArgumentError(f"--pref_loss must be one of {', '.join(PREF_LOSSES)}, not {options.pref_loss!r}")
    if not options.beta > 0:
        raise ArgumentError(f"--beta must be above 0, not {options.beta}")
    if options.sft_weight < 0 or options.desirable_weight < 0 or options.undesirable_weight < 0:
        raise ArgumentError("--sft_weight, --desirable_weight and --undesirable_weight must be 0 or more")
    if options.sft_weight and options.stage != "dpo":
        raise ArgumentError(f"--sft_weight is a DPO option; this run is --stage {options.stage}")
    if options.ref_model and options.stage == "sft":
        raise ArgumentError("--ref_model is for --stage dpo or kto; an SFT run has no reference model")
    if options.ref_model and not (Path(options.ref_model) / "config.json").is_file():
        raise ArgumentError(f"--ref_model {options.ref_model}: not a model folder (no config.json)")


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
    if options.loss_impl not in LOSS_IMPLS:
        raise ArgumentError(f"--loss_impl must be one of {', '.join(LOSS_IMPLS)}, not {options.loss_impl!r}")
    _check_resume(training.get("resume_from_checkpoint"))
    if options.overwrite_output_dir and training.get("resume_from_checkpoint") not in NO_RESUME:
        raise ArgumentError("--overwrite_output_dir starts over, --resume_from_checkpoint continues: drop one of them "
                            "(--resume_from_checkpoint false turns a config file's off)")


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete ``checkpoint-N`` folder with the highest N (a half-written or damaged one is skipped; see
    :func:`minicpm_train.resume.checkpoint_problem`)."""
    from minicpm_train.resume import checkpoint_problem, checkpoints

    found = checkpoints(output_dir)
    return next((found[step] for step in sorted(found, reverse=True) if checkpoint_problem(found[step]) is None), None)


def _check_resume(value: str | None) -> None:
    """``--resume_from_checkpoint`` names a complete checkpoint folder (``auto`` is resolved when the run starts)."""
    from minicpm_train.resume import checkpoint_problem

    if value in NO_RESUME or value == "auto":
        return
    folder = Path(value)
    if (folder / "trainer_state.json").is_file():
        problem = checkpoint_problem(folder)
        if problem is None:
            return
        latest = latest_checkpoint(folder.parent)
        raise ArgumentError(f"--resume_from_checkpoint {value} is damaged: {problem}; pass an earlier checkpoint"
                            f"{f' (the latest complete one is {latest})' if latest else ''} or auto")
    latest = latest_checkpoint(folder) if folder.is_dir() else None
    if latest is not None:
        raise ArgumentError(f"--resume_from_checkpoint {value} is a run folder, not a checkpoint: pass one of its "
                            f"checkpoints (the latest is {latest}) or auto")
    what = "has no trainer_state.json" if folder.is_dir() else "does not exist" if not folder.exists() else "is a file"
    raise ArgumentError(f"--resume_from_checkpoint {value} {what}: pass a checkpoint-N folder of an earlier run, "
                        "or auto (the latest in --output_dir)")


def _zero_stage(deepspeed: str) -> int:
    """The ZeRO stage of a resolved ``--deepspeed`` value (a path or inline JSON)."""
    inline = deepspeed.lstrip().startswith("{")
    text = deepspeed if inline else Path(deepspeed).read_text(encoding="utf-8")
    config = _load_mapping(text, "--deepspeed" if inline else f"--deepspeed {deepspeed}", is_json=True)
    return int((config.get("zero_optimization") or {}).get("stage", 0))


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


def known_flag_names() -> set[str]:
    """Every flag name ``run`` accepts, in :func:`flag_name` spelling without dashes (``--config`` aside)."""
    options = {flag_name(option[2:]) for parser in (_hf_parser(), _launch_parser()) for action in parser._actions
               for option in action.option_strings if option.startswith("--")}
    return (options - {"help"}) | set(LEGACY_RENAMES) | set(OPENBMB_DPO_RENAMES) | set(LEGACY_SWITCHES)
