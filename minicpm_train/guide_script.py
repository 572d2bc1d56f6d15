"""Reading a guide-style training script (``finetune.sh``) as the script meant.

A small reader of the shell its authors write: variables, exports, ``VAR=x`` prefixes, ``$(date ...)``,
backslash continuations (with the comments after ``\\`` that make bash drop every later flag), and the
launcher line (``deepspeed``, ``torchrun``, ``python``, ``accelerate``) split into the launcher's own flags
and the training flags, which :mod:`minicpm_train.args` then parses like a command line.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from minicpm_train.args import ArgumentError, ResolvedRun, read_mapping, flag_name, known_flag_names, parse_run_args

LAUNCHERS = ("deepspeed", "torchrun", "python", "python3", "accelerate")
# `python -m MODULE` forms of a launcher.
LAUNCHER_MODULES = {"torch.distributed.run": "torchrun", "torch.distributed.launch": "torchrun"}
# Each launcher's own flags that mean something here (in flag_name spelling) -> the LaunchOptions field.
LAUNCHER_FLAGS = {
    "deepspeed": {"include": "include", "i": "include", "exclude": "exclude", "e": "exclude", "hostfile": "hostfile",
                  "H": "hostfile", "num_gpus": "num_gpus", "num_accelerators": "num_gpus", "num_nodes": "num_nodes",
                  "master_port": "master_port", "master_addr": "master_addr", "node_rank": "node_rank"},
    "torchrun": {"nproc_per_node": "num_gpus", "nnodes": "num_nodes", "master_port": "master_port",
                 "master_addr": "master_addr", "node_rank": "node_rank", "rdzv_endpoint": "rdzv_endpoint"},
    "accelerate": {"num_processes": "num_gpus", "num_machines": "num_nodes", "gpu_ids": "include",
                   "main_process_port": "master_port", "main_process_ip": "master_addr", "machine_rank": "node_rank"},
}
# Launcher switches that say what a --node_rank start already implies: read without a notice.
IMPLIED_FLAGS = {"deepspeed": {"no_ssh"}}
_NUMBERS = ("num_gpus", "num_nodes", "master_port", "node_rank")  # LaunchOptions fields that take an integer
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)
_CONTINUATION = re.compile(r"\\\s*(#.*)?$")
_COMMENT = re.compile(r"(?:^|\s)#")
_GOES_ON = re.compile(r"\s+\S|\s*-")  # a line that continues a command: indented, or a flag
# $(...) with one level of nesting, or `...`; and a placeholder word for one of them.
_SUBSTITUTION = re.compile(r"\$\(((?:[^()]|\([^()]*\))*)\)|`([^`]*)`")
_PLACEHOLDER = re.compile(r"\0(\d+)\0")
# $NAME, ${NAME}, ${NAME:-default} and ${NAME-default}.
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class GuideScript:
    """What a guide-style training script says: its launcher, training flags and environment.

    ``launcher_argv`` are the launcher's own flags as written; ``launch_flags`` the ones that mean something
    here, in ``run``'s spelling (``--nproc_per_node 2`` -> ``--num_gpus 2``).
    """

    path: Path
    launcher: str
    launcher_argv: list[str]
    program: str
    argv: list[str]
    env: dict[str, str]
    notices: list[str]
    launch_flags: list[str] = field(default_factory=list)


@dataclass
class _Substitution:
    line: int
    text: str  # as written: $(date +%Y) or `hostname`
    command: str


class _Shell:
    """The variables, exports and command substitutions of a script being read.

    Substitutions run only when their value is used (the training command, an export), and only
    ``date [+FORMAT]``: anything else is an error there.
    """

    def __init__(self, path: Path, notices: list[str]):
        self.path, self.notices = path, notices
        self.variables: dict[str, str] = {}
        self.exported: dict[str, str] = {}
        self.substitutions: list[_Substitution] = []
        self.now = time.localtime()
        self._lines: dict[str, int] = {}  # the line each variable of the current command is used on
        self._reported: set[str] = set()

    def words(self, number: int, text: str) -> list[str]:
        """The words of the command on lines ``number``..., each substitution a placeholder in them."""
        def hide(match: re.Match) -> str:
            command = match.group(1) if match.group(1) is not None else match.group(2)
            self.substitutions.append(_Substitution(number + text[:match.start()].count("\n"), match[0], command))
            return f"\0{len(self.substitutions) - 1}\0"

        used = reversed([*_VARIABLE.finditer(text)])  # so the first use of a name wins
        self._lines = {match[1] or match[4]: number + text[:match.start()].count("\n") for match in used}
        try:
            return shlex.split(_SUBSTITUTION.sub(hide, text), comments=True)
        except ValueError as error:
            raise ArgumentError(f"{self.path}: cannot read line {number} {text.strip()[:60]!r}: {error}") from error

    def expand(self, word: str) -> str:
        """``word`` with its variables expanded, its substitutions still placeholders."""
        def replace(match: re.Match) -> str:
            name = match[1] or match[4]
            value = self.variables.get(name, os.environ.get(name))
            if match[2] and (value is None or (not value and match[2] == ":-")):
                return self.expand(match[3])
            if name not in self.variables and name not in self._reported:
                self._reported.add(name)
                where = f"${name} (line {self._lines.get(name, '?')})"
                self.notices.append(f"{where} is not set by the script: taken from this environment"
                                    if value is not None else
                                    f"{where} is set neither by the script nor in this environment: read as "
                                    "empty, as bash does; check the flags that use it")
            return value or ""

        return _VARIABLE.sub(replace, word)

    def value(self, word: str) -> str:
        """``word`` expanded and its substitutions run."""
        return self.substitute(self.expand(word))

    def substitute(self, text: str) -> str:
        """``text`` with its substitutions run."""
        return _PLACEHOLDER.sub(lambda match: self._run(self.substitutions[int(match[1])]), text)

    def _run(self, substitution: _Substitution) -> str:
        try:
            words = shlex.split(substitution.command)
        except ValueError:
            words = []
        if words[:1] == ["date"] and len(words) <= 2 and all(w.startswith("+") for w in words[1:]):
            return time.strftime(words[1][1:] if len(words) == 2 else "%a %b %d %H:%M:%S %Z %Y", self.now)
        raise ArgumentError(f"{self.path}: line {substitution.line}: cannot run the command substitution "
                            f"{substitution.text} (only $(date +FORMAT) is read): replace it with a value, or pass the "
                            "flag on the command line (flags after --script override the script's)")

    def assign(self, words: list[str], *, export: bool) -> None:
        """``NAME=value`` words (and bare ``NAME`` ones after ``export``)."""
        for word in words:
            match = _ASSIGNMENT.match(word)
            name = match[1] if match else word
            if match:
                self.variables[name] = self.expand(match[2])
            if export and name in self.variables:
                self.exported[name] = self.substitute(self.variables[name])


def _logical_lines(text: str, notices: list[str]) -> list[tuple[int, str]]:
    """Each command with its first line number, backslash continuations joined by newlines.

    Read as the script meant, with notices: a comment after (or before) a continuation's ``\\``, and a
    commented-out or blank line inside a continued command, which bash ends the command at: it is skipped
    when the next line goes on with the command (indented, or a flag).
    """
    raw_lines = text.splitlines()
    lines: list[tuple[int, str]] = []
    current, first, after, before = "", 0, [], []
    for number, raw in enumerate(raw_lines, start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            following = (line for line in raw_lines[number:] if line.strip()[:1] not in ("", "#"))
            if current and _GOES_ON.match(next(following, "")):
                what = f"'{stripped}'" if stripped else "(blank)"
                notices.append(f"line {number} {what} inside a continued command: skipped, and the flags after it "
                               "read (bash would have ended the command there)")
                continue
            if current:
                lines.append((first, current))
            current = ""
            continue
        first = first if current else number
        match = _CONTINUATION.search(raw)
        if match is None:
            lines.append((first, current + raw))
            current = ""
            continue
        if match.group(1):
            after.append(str(number))
        elif _COMMENT.search(raw[: match.start()]):
            before.append(str(number))
        current += raw[: match.start()] + "\n"
    if current:
        lines.append((first, current))
    if after:
        notices.append(f"a comment after '\\' ends the command in bash (line {', '.join(after)}): "
                       "read those lines as continuations, as the script meant")
    if before:
        notices.append(f"a comment before '\\' takes the '\\' with it, ending the command in bash (line "
                       f"{', '.join(before)}): read the lines after as continuations, as the script meant")
    return lines


def read_guide_script(path: str | Path, *, known_flags: set[str] | None = None) -> GuideScript:
    """Read a guide-style ``finetune.sh``: variables, exports and the training command's flags.

    ``known_flags`` (names without dashes) lets bare ``use_lora`` / ``qlora`` words count as flags.
    ``NAME=value`` words before the training command are exports for it.
    """
    path = Path(path)
    if not path.is_file():
        raise ArgumentError(f"script not found: {path}")
    notices: list[str] = []
    shell = _Shell(path, notices)
    command: list[str] | None = None
    for number, line in _logical_lines(path.read_text(encoding="utf-8"), notices):
        words = shell.words(number, line)
        export = words[:1] == ["export"]
        words = words[1:] if export else words
        count = next((i for i, word in enumerate(words) if not _ASSIGNMENT.match(word)), len(words))
        if export or count == len(words):
            shell.assign(words, export=export)
        elif os.path.basename(words[count]) not in LAUNCHERS:
            continue
        elif command is not None:
            notices.append(f"line {number}: a second training command ({words[count]} ...) is not run; "
                           "only the first is read")
        else:
            for word in words[:count]:
                name, value = word.split("=", 1)
                shell.exported[name] = shell.value(value)
            command = [shell.value(word) for word in words[count:]]
    if command is None:
        raise ArgumentError(f"{path}: no training command found (expected a line starting with "
                            f"{', '.join(LAUNCHERS)})")
    launcher, launcher_argv, program, argv = _split_command(path, command)
    launch_flags = _launch_flags(launcher, launcher_argv, notices)
    launch_flags += _visible_devices(shell.exported, launch_flags, notices)
    return GuideScript(path, launcher, launcher_argv, program, _bare_flags(argv, known_flags or set(), notices),
                       shell.exported, notices, launch_flags)


def _split_command(path: Path, command: list[str]) -> tuple[str, list[str], str, list[str]]:
    """``launcher [its flags] program.py [flags]`` -> launcher, its flags, program, the program's flags."""
    launcher, words = os.path.basename(command[0]), command[1:]
    if words[:1] == ["-m"] and len(words) > 1 and words[1] in LAUNCHER_MODULES:
        launcher, words = LAUNCHER_MODULES[words[1]], words[2:]
    elif launcher == "accelerate" and words[:1] == ["launch"]:
        words = words[1:]
    index = next((i for i, word in enumerate(words) if word.endswith(".py") or word == "-m"), None)
    program_index = index + 1 if index is not None and words[index] == "-m" else index
    if program_index is None or program_index >= len(words):
        raise ArgumentError(f"{path}: the {command[0]} command names no Python script")
    return launcher, words[:index], words[program_index], words[program_index + 1:]


def _launcher_options(argv: list[str]) -> list[tuple[str, str | None, str]]:
    """``--flag value`` / ``--flag=value`` / ``-i value`` / ``--switch`` -> (flag_name, value, as written)."""
    options, index = [], 0
    while index < len(argv):
        name, eq, value = argv[index].lstrip("-").partition("=")
        written = argv[index]
        if not eq and index + 1 < len(argv) and not argv[index + 1].startswith("-"):
            index += 1
            value, written = argv[index], f"{written} {argv[index]}"
        options.append((flag_name(name), value if eq or value else None, written))
        index += 1
    return options


def _launch_flags(launcher: str, argv: list[str], notices: list[str]) -> list[str]:
    """The launcher's own flags as ``run``'s launch flags; the others are noticed and left out.

    ``accelerate launch --config_file FILE`` adds the file's settings, under the flags given.
    """
    options = _launcher_options(argv)
    config = next((value for name, value, _ in options if name == "config_file" and value), None)
    if launcher == "accelerate" and config is not None:
        options = _accelerate_config(Path(config), notices) + [o for o in options if o[0] != "config_file"]
    table = LAUNCHER_FLAGS.get(launcher, {})
    chosen: dict[str, str] = {}
    ignored: list[str] = []
    for name, value, written in options:
        target = table.get(name)
        if target == "include" and value == "all":
            chosen.pop(target, None)  # every GPU: the default
        elif target == "rdzv_endpoint" and value and re.fullmatch(r"[^:]+:\d+", value):
            chosen["master_addr"], chosen["master_port"] = value.rsplit(":", 1)  # torchrun's host:port of node 0
        elif target and target != "rdzv_endpoint" and value and (target not in _NUMBERS or value.isdigit()):
            chosen[target] = f"localhost:{value}" if target == "include" and ":" not in value else value
        elif name not in IMPLIED_FLAGS.get(launcher, ()):
            ignored.append(written)
    if ignored:
        notices.append(f"{launcher}'s own {', '.join(ignored)}: no meaning here (minicpm-train starts the "
                       "processes itself); ignored")
    return [token for target, value in chosen.items() for token in (f"--{target}", value)]


def _accelerate_config(path: Path, notices: list[str]) -> list[tuple[str, str | None, str]]:
    """The settings of an ``accelerate`` config file that mean something here, as launcher options."""
    if not path.is_file():
        notices.append(f"accelerate --config_file {path} does not exist here: its settings are not used")
        return []
    config = read_mapping(path)
    used = [(flag_name(str(key)), str(value), f"{key}: {value}") for key, value in config.items()
            if flag_name(str(key)) in LAUNCHER_FLAGS["accelerate"] and value is not None]
    notices.append(f"accelerate --config_file {path}: read {', '.join(u[2] for u in used) or 'nothing'}; "
                   "its other settings are not used")
    return used


def _visible_devices(env: dict[str, str], launch_flags: list[str], notices: list[str]) -> list[str]:
    """The script's ``CUDA_VISIBLE_DEVICES=1`` as ``--include localhost:1`` (minicpm-train sets it per process)."""
    devices = env.pop("CUDA_VISIBLE_DEVICES", None)
    if devices is None:
        return []
    if "--include" in launch_flags or "--exclude" in launch_flags:
        notices.append(f"CUDA_VISIBLE_DEVICES={devices} ignored: the launcher's --include/--exclude choose "
                       "the GPUs, as in deepspeed")
        return []
    if not re.fullmatch(r"\d+(,\d+)*", devices):
        notices.append(f"CUDA_VISIBLE_DEVICES={devices!r} ignored: not GPU numbers; choose the GPUs with "
                       "--include localhost:N")
        return []
    notices.append(f"CUDA_VISIBLE_DEVICES={devices} read as --include localhost:{devices}")
    return ["--include", f"localhost:{devices}"]


def _bare_flags(argv: list[str], known_flags: set[str], notices: list[str]) -> list[str]:
    fixed = []
    for token in argv:
        if not token.startswith("-") and token in known_flags:
            notices.append(f"'{token}' has no leading '--'; read as --{token}")
            token = f"--{token}"
        fixed.append(token)
    return fixed


def resolve_script(path: str | Path, extra_argv: list[str]) -> tuple[GuideScript, ResolvedRun]:
    """A guide script's command, with ``extra_argv`` flags overriding it, resolved like flags."""
    script = read_guide_script(path, known_flags=known_flag_names())
    run = parse_run_args(script.launch_flags + script.argv + extra_argv, env=script.env,
                         notices=script.notices)
    return script, run
