"""README.md and docs/*.md name only what exists: every `minicpm-data` / `minicpm-train` subcommand and every
`--flag` (a flag on a command's line must be one that command accepts, in that CLI's spelling: minicpm-train's
with underscores, minicpm-data's with hyphens), every relative link and its #anchor; and README's first commands
are the ones `.ci/run` runs."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import click
import pytest
import typer

from minicpm_data.cli import app as data_app
from minicpm_train.args import flag_name, known_flag_names
from minicpm_train.cli import app as train_app
from minicpm_train.flag_help import own_fields
from minicpm_train.guide_script import IMPLIED_FLAGS, LAUNCHER_FLAGS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Flags of other programs that the docs name: pip's and `hf download`'s in install notes, the deepspeed
# command `run` starts, and `accelerate launch --config_file` (read from guide scripts, not a run flag).
OTHER_PROGRAMS_FLAGS = {"--index-url", "--local-dir", "--module", "--config_file", "--no_local_rank",
                        # sbatch / srun, in the SLURM page's job script
                        "--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--gpus-per-task",
                        "--cpus-per-task", "--time", "--output"}
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
_INLINE = re.compile(r"`([^`\n]+)`")
_COMMAND = re.compile(r"\bminicpm-(data|train)(?:\s+([a-z][a-z-]*))?")
_FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*(?![\w*])")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@cache
def _commands() -> dict[str, dict[str, click.Command]]:
    return {name: typer.main.get_command(app).commands for name, app in (("data", data_app), ("train", train_app))}


def _options(command: click.Command) -> set[str]:
    params = command.get_params(click.Context(command))  # with --help
    return {option for param in params for option in (*param.opts, *param.secondary_opts) if option.startswith("--")}


@cache
def _accepted(cli: str, subcommand: str) -> frozenset[str]:
    """The flags ``minicpm-CLI SUBCOMMAND`` accepts, as written (each CLI takes both spellings of each)."""
    names = {flag_name(option[2:]) for option in _options(_commands()[cli][subcommand])}
    if cli == "train" and subcommand in ("run", "plan"):
        names |= known_flag_names()
    return frozenset(spelling for name in names for spelling in (f"--{name}", f"--{name.replace('_', '-')}"))


def _spelt(cli: str, flag: str) -> str:
    """``flag`` as ``minicpm-CLI`` writes it: minicpm-train with underscores (the guide's and Hugging Face's
    spelling), minicpm-data with hyphens."""
    return "--" + (flag[2:].replace("-", "_") if cli == "train" else flag[2:].replace("_", "-"))


@cache
def _script_flags() -> frozenset[str]:
    """The flags of the project's own scripts (bench/, fixtures/), read from their argparse declarations."""
    scripts = [*ROOT.glob("bench/*.py"), *ROOT.glob("fixtures/**/*.py")]
    return frozenset(flag for path in scripts
                     for flag in re.findall(r'add_argument\(\s*"(--[\w-]+)"', path.read_text(encoding="utf-8")))


@cache
def _any_flag() -> frozenset[str]:
    """Every flag some command accepts, the launcher flags guide scripts are read with, the project's scripts'
    flags, and OTHER_PROGRAMS_FLAGS."""
    launcher = {f"--{name}" for table in (LAUNCHER_FLAGS, IMPLIED_FLAGS) for flags in table.values() for name in flags
                if len(name) > 1}
    every = {flag for cli, commands in _commands().items() for sub in commands for flag in _accepted(cli, sub)}
    return frozenset(every | launcher | _script_flags() | OTHER_PROGRAMS_FLAGS)


def _code(text: str) -> list[str]:
    """The logical lines of the code in a page: fenced blocks (continuation lines joined, `$ ` prompts and
    `# comments` removed) and inline code spans."""
    spans = []
    for block in _FENCE.findall(text):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            spans.append(re.sub(r"(^|\s)#\s.*$", "", line.removeprefix("$ ")))
    spans += _INLINE.findall(_FENCE.sub("", text))
    return spans


def _problems(span: str) -> list[str]:
    """What in one code span names a subcommand or flag that does not exist."""
    if "did you mean" in span:  # the example of a misspelt flag and its suggestion
        return []
    problems, command = [], None
    for match in _COMMAND.finditer(span):
        cli, sub = match.groups()
        if sub is not None and sub not in _commands()[cli]:
            problems.append(f"minicpm-{cli} {sub}: no such command")
        elif sub is not None and command is None:
            command = (cli, sub, match.end())
    for match in _FLAG.finditer(span):
        flag = match.group()
        on_its_line = command is not None and match.start() > command[2]
        if on_its_line and flag not in _accepted(command[0], command[1]):
            problems.append(f"minicpm-{command[0]} {command[1]} does not take {flag}")
        elif on_its_line and flag != _spelt(command[0], flag):
            problems.append(f"minicpm-{command[0]} writes {_spelt(command[0], flag)}, not {flag}")
        elif not on_its_line and flag not in _any_flag():
            problems.append(f"no command takes {flag}")
    return problems


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", _FENCE.sub("", path.read_text(encoding="utf-8")), re.MULTILINE)
    anchors, seen = set(), {}
    for heading in headings:
        slug = _slug(heading)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_and_flag_named_exists(page):
    problems = [f"`{span.strip()[:90]}`: {problem}" for span in _code(page.read_text(encoding="utf-8"))
                for problem in _problems(span)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_their_anchors_resolve(page):
    broken = []
    for target in _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, "\n".join(broken)


def test_every_own_flag_of_run_is_documented():
    text = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    undocumented = [name for name in own_fields()
                    if f"`--{name}" not in text and f"`--{name.replace('_', '-')}" not in text]
    assert not undocumented, f"not in README.md or docs/: {undocumented}"


def test_the_check_finds_what_does_not_exist_and_the_other_spelling():
    assert _problems("minicpm-data convert x.json --dev-ration 0.1") == [
        "minicpm-data convert does not take --dev-ration"]
    assert _problems("minicpm-data convert x.json --dev_ratio 0.1") == ["minicpm-data writes --dev-ratio, not --dev_ratio"]
    assert _problems("minicpm-train run --learning-rate 1e-4 --lora_r 8 --include localhost:0") == [
        "minicpm-train writes --learning_rate, not --learning-rate"]
    assert _problems("minicpm-train plan --gpu_memory 8 --max_steps 3 --help_all") == []
    assert _problems("minicpm-train chat --lora_r 8") == ["minicpm-train chat does not take --lora_r"]
    assert _problems("minicpm-train evaluate runs/x") == ["minicpm-train evaluate: no such command"]
    assert _problems("pass --learning_rat") == ["no command takes --learning_rat"]
    assert _problems("--nproc_per_node 2 -> --num_gpus, --per_device_* flags") == []
    assert "#the-guides-script-as-written" in {f"#{a}" for a in _anchors(ROOT / "docs" / "training.md")}


def test_readme_starts_with_the_commands_ci_runs_and_stays_short():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    first_block = _FENCE.search(readme)
    assert first_block and readme.index("\n## ") > first_block.start()  # before the first section
    commands = [line.strip() for line in first_block.group(1).splitlines() if not line.lstrip().startswith("#")]
    assert ci == ["bash scripts/setup.sh && .venv/bin/python -m pytest -q"]
    assert ci[0] in commands
    assert len(readme.splitlines()) <= 300
