"""Hostile files around the data: damaged model folders, tokenizers, adapters, run records, tokenized caches
and checkpoints, and re-runs into a used output folder.

Every case ends in exit code 1 and one ``error:`` line that names the file and what to do, or in a recovery
note and exit code 0; never a traceback, never output presented as finished, and no run trains a step on a
broken tokenizer. Most cases are fast checks of ``check_model_folder`` (the one check every command runs
before it loads a folder) on damaged copies of the tiny fixture folders, whose undamaged files are symlinks
to the session's originals; a few go through the CLIs, in this process.
"""

from __future__ import annotations

import json
import re
import shlex
import struct
import sys
from pathlib import Path

import pytest

from train_helpers import TASK_DEV, TASK_TRAIN, complete_checkpoint, run_cli

def said(message: str, text: str) -> bool:
    """Whether ``text`` (console output, which folds long lines, paths too) holds ``message``."""
    return "".join(message.split()) in "".join(text.split())


LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 64164992\n"


def linked_copy(source: Path, target: Path) -> Path:
    """A copy of a model folder whose files are symlinks to the originals (replace one with :func:`put`)."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file():
            (target / item.name).symlink_to(item)
    return target


def put(folder: Path, name: str, data: bytes | str | None) -> None:
    """Replace ``folder/name`` with ``data`` (None: remove it), never writing through a symlink."""
    path = folder / name
    path.unlink(missing_ok=True)
    if data is not None:
        path.write_bytes(data.encode() if isinstance(data, str) else data)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    put(folder, "config.json", json.dumps({**config, **changes}))


def truncate(folder: Path, name: str, keep: float = 0.5) -> None:
    data = (folder / name).read_bytes()
    put(folder, name, data[:int(len(data) * keep)])


def rewrite_weights(folder: Path, change) -> None:
    """Rewrite model.safetensors with ``change(tensors)`` applied (a dict of name -> tensor)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    put(folder, "model.safetensors", None)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def shard(folder: Path, *, drop_shard: bool = False, lie: bool = False) -> None:
    """Split model.safetensors into two shards and an index; optionally lose a shard, or list a tensor the
    shard does not hold."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {name: file for file, part in halves.items() for name in part}
    for file, part in halves.items():
        save_file({name: tensors[name] for name in part}, str(folder / file), metadata={"format": "pt"})
    if lie:
        weight_map["model.layers.9.mlp.up_proj.weight"] = "model-00002-of-00002.safetensors"
    put(folder, "model.safetensors", None)
    put(folder, "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))
    if drop_shard:
        put(folder, "model-00002-of-00002.safetensors", None)


def bin_weights(folder: Path, *, cut: bool) -> None:
    """pytorch_model.bin (torch's zip format) instead of safetensors; ``cut``: truncated."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    put(folder, "model.safetensors", None)
    if cut:
        truncate(folder, "pytorch_model.bin", 0.6)


def header_length_past_the_end(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    put(folder, "model.safetensors", struct.pack("<Q", 10 ** 9) + data[8:])


# (damage, the message the first finding must match). All on the tiny Llama folder (ChatML fixture tokenizer).
MODEL_DAMAGE = {
    "config syntax": (lambda f: put(f, "config.json", '{"model_type": "llama",\n "hidden_size": 64,,}'),
                      r"config.json: not valid JSON \(line 2, column \d+: .*\); correct the file, or download it"),
    "config dtype": (lambda f: edit_config(f, torch_dtype="bfloat17"),
                     r'config.json: "torch_dtype": "bfloat17" is not a dtype; correct it \(e.g. "bfloat16"\)'),
    "config size": (lambda f: edit_config(f, hidden_size=-64), r'"hidden_size": -64 is not a positive whole number'),
    "config missing": (lambda f: put(f, "config.json", None), r"config.json: missing: this is not a model folder"),
    "config lfs": (lambda f: put(f, "config.json", LFS_POINTER), r"config.json: a Git LFS pointer.*git lfs pull"),
    "more layers": (lambda f: edit_config(f, num_hidden_layers=3),
                    r"num_hidden_layers is 3 but the weights hold layers 0-1: layer 2 would be random weights; "
                    r"set num_hidden_layers to 2"),
    "fewer layers": (lambda f: edit_config(f, num_hidden_layers=1), r"weights hold 2 layers: layers 1 would be left"),
    "other sizes": (lambda f: edit_config(f, intermediate_size=256),
                    r"config.json: describes model.layers.0.mlp.\w+_proj.weight as \[\d+, \d+\] but the weights hold"),
    "other vocabulary": (lambda f: edit_config(f, vocab_size=4000),
                         r"vocab_size x hidden_size is 4000 x 64 but the weights' embedding is 1030 x 64"),
    "unbuildable": (lambda f: edit_config(f, rope_scaling={"rope_type": "no-such-rope"}),
                    r"config.json: describes no model transformers can build: "),
    "weights lfs": (lambda f: put(f, "model.safetensors", LFS_POINTER),
                    r"model.safetensors: a Git LFS pointer, not the file itself \(64,164,992 bytes; cloned without "
                    r"git-lfs\); run `git lfs install && git lfs pull` in "),
    "weights truncated": (lambda f: truncate(f, "model.safetensors"),
                          r"model.safetensors: truncated: its tensors need [\d,]+ bytes, the file has [\d,]+; download "
                          r"it again"),
    "weights empty": (lambda f: put(f, "model.safetensors", b""), r"model.safetensors: empty: not a safetensors file"),
    "weights missing": (lambda f: put(f, "model.safetensors", None), r"model.safetensors: missing: the folder has no"),
    "weights header": (header_length_past_the_end, r"its header claims 1,000,000,000 bytes"),
    "weights appended": (lambda f: put(f, "model.safetensors", (f / "model.safetensors").read_bytes() + b"\0" * 10),
                         r"10 bytes follow its last tensor"),
    "a layer's tensor lost": (lambda f: rewrite_weights(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                              r"layer 1 of the weights differs from layer 0 in mlp.up_proj.weight"),
    "shard missing": (lambda f: shard(f, drop_shard=True),
                      r"model-00002-of-00002.safetensors: missing \(named in model.safetensors.index.json\)"),
    "shard lacks a tensor": (lambda f: shard(f, lie=True),
                             r"model-00002-of-00002.safetensors: lacks model.layers.9.mlp.up_proj.weight, which "
                             r"model.safetensors.index.json places there"),
    "bin truncated": (lambda f: bin_weights(f, cut=True), r"pytorch_model.bin: truncated or damaged"),
    "bin, more layers": (lambda f: (bin_weights(f, cut=False), edit_config(f, num_hidden_layers=4)),
                         r"num_hidden_layers is 4 but the weights hold layers 0-1"),
    "tokenizer lfs": (lambda f: put(f, "tokenizer.json", LFS_POINTER), r"tokenizer.json: a Git LFS pointer"),
    "tokenizer missing": (lambda f: put(f, "tokenizer.json", None),
                          r"no tokenizer vocabulary: none of tokenizer.json, tokenizer.model, vocab.json, vocab.txt"),
    "tokenizer empty": (lambda f: put(f, "tokenizer.json", b""), r"tokenizer.json: empty; download it again"),
    "tokenizer config syntax": (lambda f: put(f, "tokenizer_config.json", "{\n"),
                                r"tokenizer_config.json: not valid JSON \(line 2"),
}


@pytest.mark.parametrize("damage", MODEL_DAMAGE, ids=list(MODEL_DAMAGE))
def test_damaged_model_folder_is_one_line_naming_the_file(damage, tiny_llama, tmp_path):
    from minicpm_data.model_files import ModelFolderError
    from minicpm_train.model import check_model_folder, read_model_config

    folder = linked_copy(tiny_llama, tmp_path / "model")
    apply, message = MODEL_DAMAGE[damage]
    apply(folder)
    _, findings = check_model_folder(folder, trust_remote_code=False)
    assert findings and all("\n" not in str(f) for f in findings), findings
    assert str(findings[0]).startswith(str(folder)), findings[0]
    assert re.search(message, str(findings[0])), str(findings[0])
    with pytest.raises(ModelFolderError):
        read_model_config(folder, trust_remote_code=False)


def test_whole_folders_pass(tiny_llama, tiny_minicpm2, tiny_minicpm4, tiny_minicpm3):
    from minicpm_train.model import check_model_folder

    for folder in (tiny_llama, tiny_minicpm2, tiny_minicpm4, tiny_minicpm3):
        assert check_model_folder(folder, trust_remote_code=False)[1] == [], folder


def test_an_8b_download_is_checked_from_its_headers(shared_dir, tmp_path):
    """MiniCPM4-8B's real config.json and tokenizer with four 4 GB shards whose headers are real and whose data
    is a hole in the file (sparse, nothing on disk): the check reads headers only, so it passes them, and finds
    a shard cut short or a layer the config has and the shards lack."""
    import os

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from minicpm_train.model import check_model_folder
    from minicpm_train.modeling import register_minicpm

    folder = linked_copy(shared_dir / "tokenizers" / "minicpm4", tmp_path / "MiniCPM4-8B")
    register_minicpm()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    weight_map = {name: f"model-0000{index % 4 + 1}-of-00004.safetensors" for index, name in enumerate(sorted(shapes))}
    for shard in sorted(set(weight_map.values())):
        header, offset = {}, 0
        for name in (n for n, s in weight_map.items() if s == shard):
            size = 2 * int(torch.Size(shapes[name]).numel())
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header).encode()
        put(folder, shard, struct.pack("<Q", len(encoded)) + encoded)
        os.truncate(folder / shard, 8 + len(encoded) + offset)  # a hole: no data written
    put(folder, "model.safetensors.index.json", json.dumps({"weight_map": weight_map}))
    assert sum(p.stat().st_size for p in folder.glob("*.safetensors")) > 16e9
    assert check_model_folder(folder, trust_remote_code=False)[1] == []
    shard = folder / "model-00003-of-00004.safetensors"
    os.truncate(shard, shard.stat().st_size - 1)
    assert "model-00003-of-00004.safetensors: truncated: its tensors need" in str(
        check_model_folder(folder, trust_remote_code=False)[1][0])
    os.truncate(shard, shard.stat().st_size + 1)
    edit_config(folder, num_hidden_layers=33)
    assert "num_hidden_layers is 33 but the weights hold layers 0-31: layer 32 would be random weights" in str(
        check_model_folder(folder, trust_remote_code=False)[1][0])


@pytest.mark.parametrize("kind", ["minicpm2", "minicpm4"])
def test_minicpm_tokenizer_without_its_vocabulary_never_loads(kind, request, tmp_path):
    """OpenBMB's layout: MiniCPM-2B's vocabulary is tokenizer.model alone (with ../shared), MiniCPM4's also
    tokenizer.json; without them transformers' LlamaTokenizer loads 3 special tokens and renders 2 per sample."""
    import transformers

    from minicpm_data.model_files import ModelFolderError, vocabulary_findings
    from minicpm_data.tokenizer import load_tokenizer

    base = request.getfixturevalue(f"tiny_{kind}")
    folder = linked_copy(base, tmp_path / "model")
    for name in ("tokenizer.model", "tokenizer.json"):
        put(folder, name, None)
    with pytest.raises(ModelFolderError, match="no tokenizer vocabulary"):
        load_tokenizer(str(folder))
    special_only = transformers.LlamaTokenizer.from_pretrained(folder)  # what loading used to give
    assert len(special_only) == len(special_only.get_added_vocab()) < 20
    assert f"loads with {len(special_only)} tokens, all of them special" in str(vocabulary_findings(special_only,
                                                                                                    folder)[0])


def test_tokenizer_against_the_models_vocab_size(tiny_llama, tmp_path):
    """The stats path: a tokenizer whose ids pass the embedding, or far smaller than it (another model's)."""
    from minicpm_data.model_files import ModelFolderError
    from minicpm_data.tokenizer import load_tokenizer

    folder = linked_copy(tiny_llama, tmp_path / "model")
    for vocab_size, message in ((1000, "vocab_size is 1,000 but the tokenizer has 1,030 tokens: ids past 999 have no "
                                       "embedding"),
                                (4000, "the tokenizer has 1,030 tokens but the model's vocab_size is 4,000: it is not "
                                       "this model's tokenizer")):
        edit_config(folder, vocab_size=vocab_size)
        with pytest.raises(ModelFolderError, match=message):
            load_tokenizer(str(folder))


# --- adapters and run records ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory) -> Path:
    from train_helpers import make_adapter

    return make_adapter(tiny_llama, tmp_path_factory.mktemp("adapter"), ["q_proj", "v_proj"])


ADAPTER_DAMAGE = {
    "config syntax": (lambda f: put(f, "adapter_config.json", '{"r": 8,'), r"adapter_config.json: not valid JSON"),
    "rank": (lambda f: put(f, "adapter_config.json", json.dumps({**json.loads((f / "adapter_config.json").read_text()),
                                                                "r": 4})),
             r"adapter_model.safetensors: base_model.*lora_A.weight has shape \[8, 64\], not of rank 4"),
    "weights truncated": (lambda f: truncate(f, "adapter_model.safetensors"),
                          r"adapter_model.safetensors: truncated: its tensors need"),
    "weights missing": (lambda f: put(f, "adapter_model.safetensors", None),
                        r"adapter_model.safetensors: missing: the adapter has no weights"),
    "weights lfs": (lambda f: put(f, "adapter_model.safetensors", LFS_POINTER), r"a Git LFS pointer"),
}


@pytest.mark.parametrize("damage", ADAPTER_DAMAGE, ids=list(ADAPTER_DAMAGE))
def test_damaged_adapter(damage, adapter, tiny_llama, tmp_path):
    from minicpm_data.model_files import ModelFolderError
    from minicpm_train.inference import resolve_folders

    folder = linked_copy(adapter, tmp_path / "adapter")
    apply, message = ADAPTER_DAMAGE[damage]
    apply(folder)
    with pytest.raises(ModelFolderError, match=message):
        resolve_folders(tiny_llama, folder)


def test_commands_on_damaged_folders_end_in_one_line(tiny_llama, adapter, tmp_path, monkeypatch, capsys):
    """chat, eval, merge, plan, run and doctor --model through the CLI: one error: line, exit code 1, nothing
    written; doctor lists every problem at once."""
    broken_adapter = linked_copy(adapter, tmp_path / "adapter")
    truncate(broken_adapter, "adapter_model.safetensors")
    bad_dtype = linked_copy(tiny_llama, tmp_path / "dtype")
    edit_config(bad_dtype, torch_dtype="bfloat17")
    record = linked_copy(adapter, tmp_path / "record")
    put(record, "run_config.json", '{"options": {"template": "chatml",')
    many = linked_copy(tiny_llama, tmp_path / "many")
    edit_config(many, torch_dtype="bfloat17")
    put(many, "tokenizer.json", LFS_POINTER)
    truncate(many, "model.safetensors")
    commands = {
        "chat": (["chat", str(tiny_llama), "--adapter", str(broken_adapter), "--prompt", "hi"],
                 "adapter_model.safetensors: truncated"),
        "merge": (["merge", "--base", str(tiny_llama), "--adapter", str(broken_adapter), "-o", str(tmp_path / "m")],
                  "adapter_model.safetensors: truncated"),
        "eval": (["eval", str(tiny_llama), "--adapter", str(record), "--data", str(TASK_DEV)],
                 "run_config.json: not valid JSON (line 1, column 35: Expecting property name enclosed in double "
                 "quotes); pass --template and --model_max_length yourself"),
        "plan": (["plan", "--model_name_or_path", str(bad_dtype), "--gpu-memory", "8"], '"bfloat17" is not a dtype'),
        "run": (["run", "--model_name_or_path", str(bad_dtype), "--train_data_path", str(TASK_TRAIN), "--output_dir",
                 str(tmp_path / "out"), "--data_cache_dir", str(tmp_path / "cache")], '"bfloat17" is not a dtype'),
        "run, mistyped folder": (["run", "--model_name_or_path", str(tmp_path / "MiniCPM4-8b"), "--train_data_path",
                                  str(TASK_TRAIN), "--output_dir", str(tmp_path / "out")],
                                 f"{tmp_path / 'MiniCPM4-8b'}: no such folder; check the path"),
        "doctor": (["doctor", "--model", str(many)], None),
    }
    for name, (argv, message) in commands.items():
        code, out, err = run_cli(monkeypatch, capsys, *argv)
        assert code == 1, (name, out, err)
        assert "Traceback" not in out + err, name
        if message:
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: ") and message in " ".join(err.split()), (name, err)
    assert not (tmp_path / "m").exists() and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    code, out, _ = run_cli(monkeypatch, capsys, "doctor", "--model", str(many), "--json")
    failed = [c for c in json.loads(out)["checks"] if c["item"] == "model files"]
    assert [Path(c["value"]).name for c in failed] == ["config.json", "tokenizer.json", "model.safetensors"], failed
    assert all(c["verdict"] == "fail" for c in failed)


def test_stats_and_a_run_refuse_a_tokenizer_without_vocabulary(tiny_minicpm2, tmp_path, monkeypatch, capsys):
    """The issue's MiniCPM-2B folder without tokenizer.model: stats and run stop before any token is counted
    or trained (no cache, no checkpoint, no progress)."""
    from minicpm_data import cli as data_cli

    folder = linked_copy(tiny_minicpm2, tmp_path / "model")
    for name in ("tokenizer.model", "tokenizer.json"):
        put(folder, name, None)
    monkeypatch.setattr(sys, "argv", ["minicpm-data", "stats", str(TASK_DEV), "--tokenizer", str(folder)])
    with pytest.raises(SystemExit) as stats_exit:
        data_cli.main()
    _, err = capsys.readouterr()
    assert stats_exit.value.code == 1 and err.startswith(f"error: {folder}: no tokenizer vocabulary")
    code, out, err = run_cli(monkeypatch, capsys, "run", "--model_name_or_path", str(folder), "--train_data_path",
                             str(TASK_TRAIN), "--output_dir", str(tmp_path / "out"), "--data_cache_dir",
                             str(tmp_path / "cache"), "--max_steps", "2")
    assert code == 1 and err.count("error:") == 1 and "no tokenizer vocabulary" in err
    assert "train" not in out.split("->")[-1] and not (tmp_path / "cache").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- the tokenized-data cache ------------------------------------------------------------------------------

CACHE_DAMAGE = {
    "ids truncated": (lambda c: truncate(c, "input_ids.bin"), r"input_ids.bin is [\d,]+ bytes, [\d,]+ expected"),
    "mask emptied": (lambda c: put(c, "trained.bin", b""), r"trained.bin is 0 bytes"),
    "lengths removed": (lambda c: put(c, "lengths.bin", None), r"lengths.bin is missing"),
    "marker removed": (lambda c: put(c, "meta.json", None), r"meta.json, written last when the cache is complete, is"),
    "marker damaged": (lambda c: put(c, "meta.json", '{"format": 2, "dtype": "uin'), r"meta.json is unreadable"),
    "lengths rewritten": (lambda c: put(c, "lengths.bin", b"\x01" + (c / "lengths.bin").read_bytes()[1:]),
                          r"lengths.bin adds up to [\d,]+ tokens, [\d,]+ expected"),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE, ids=list(CACHE_DAMAGE))
def test_damaged_cache_is_rendered_again_with_a_note(damage, fixtures_dir, tmp_path):
    import numpy as np

    from minicpm_data.tokenizer import load_tokenizer
    from minicpm_train.data import load_supervised

    tokenizer = load_tokenizer(str(fixtures_dir / "tokenizers" / "chatml"))
    fresh, summary = load_supervised(TASK_DEV, tokenizer, max_length=256, cache_dir=tmp_path)
    expected = [fresh[i]["input_ids"].tolist() for i in range(len(fresh))]
    (cache,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    apply, message = CACHE_DAMAGE[damage]
    apply(cache)
    dataset, repaired = load_supervised(TASK_DEV, tokenizer, max_length=256, cache_dir=tmp_path)
    assert not repaired.from_cache and len(repaired.notes) == 1
    assert re.search(f"the tokenized cache of .*dev.json in {cache} was damaged \\({message}.*\\); "
                                   "rendered it again", repaired.notes[0]), repaired.notes[0]
    assert [dataset[i]["input_ids"].tolist() for i in range(len(dataset))] == expected
    assert np.array_equal(dataset.offsets, fresh.offsets)
    again, summary = load_supervised(TASK_DEV, tokenizer, max_length=256, cache_dir=tmp_path)
    assert summary.from_cache and not summary.notes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache.name, f"{cache.name}.lock"])


# --- checkpoints and re-runs -------------------------------------------------------------------------------


def test_damaged_checkpoints_are_passed_over(tmp_path):
    from minicpm_train.args import latest_checkpoint
    from minicpm_train.resume import checkpoint_problem

    problems = {}
    for step, damage in ((2, None), (4, "optimizer.pt"), (6, "scheduler.pt"), (8, "adapter_model.safetensors"),
                         (10, "trainer_state.json"), (12, "missing optimizer"), (14, "missing weights")):
        folder = complete_checkpoint(tmp_path / f"checkpoint-{step}", step)
        if damage == "missing optimizer":
            put(folder, "optimizer.pt", None)
        elif damage == "missing weights":
            put(folder, "adapter_model.safetensors", None)
        elif damage:
            put(folder, damage, (folder / damage).read_bytes()[:5])
        problems[step] = checkpoint_problem(folder)
    assert problems == {
        2: None, 4: "optimizer.pt is truncated or damaged (5 bytes; its zip directory is missing)",
        6: "scheduler.pt is truncated or damaged (5 bytes; its zip directory is missing)",
        8: "adapter_model.safetensors is only 5 bytes: not a safetensors file",
        10: "trainer_state.json is not valid JSON (line 1, column 2: Unterminated string starting at) (the "
            "checkpoint was not finished)",
        12: "optimizer.pt missing",
        14: "its weights (model.safetensors or adapter_model.safetensors) missing"}
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_damaged_deepspeed_checkpoints_are_passed_over(tmp_path):
    """DeepSpeed keeps the weights and optimizer in the folder ``latest`` names, a file per rank (the layouts
    of two CPU ranks under ZeRO-2 and ZeRO-3): a rank's file missing between others, or truncated, or the model
    states missing, makes the checkpoint incomplete."""
    import zipfile

    from minicpm_train.args import latest_checkpoint
    from minicpm_train.resume import checkpoint_problem

    zero2 = ["mp_rank_00_model_states.pt", *(f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(3))]
    zero3 = [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(2) for kind in ("model", "optim")]
    problems = {}
    for step, (files, damage) in enumerate(((zero2, None), (zero3, None), (zero2, "missing rank 1"),
                                            (zero3, "missing model states of rank 1"), (zero2, "missing model states"),
                                            (zero3, "truncated"), (zero2, "no tag folder")), start=1):
        folder = complete_checkpoint(tmp_path / f"checkpoint-{step}", step)
        for name in ("optimizer.pt", "scheduler.pt", "adapter_model.safetensors"):
            put(folder, name, None)
        put(folder, "latest", f"global_step{step}")
        if damage != "no tag folder":
            (folder / f"global_step{step}").mkdir()
        for name in files if damage != "no tag folder" else ():
            zipfile.ZipFile(folder / f"global_step{step}" / name, "w").close()
        tag = folder / f"global_step{step}"
        if damage == "missing rank 1":
            put(tag, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", None)
        elif damage == "missing model states of rank 1":
            put(tag, "zero_pp_rank_1_mp_rank_00_model_states.pt", None)
        elif damage == "missing model states":
            put(tag, "mp_rank_00_model_states.pt", None)
        elif damage == "truncated":
            put(tag, "zero_pp_rank_1_mp_rank_00_optim_states.pt", b"PK\x03")
        problems[step] = checkpoint_problem(folder)
    assert problems == {
        1: None, 2: None,
        3: "global_step3/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt missing",
        4: "global_step4/zero_pp_rank_1_mp_rank_00_model_states.pt missing",
        5: "global_step5/mp_rank_00_model_states.pt missing",
        6: "global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated or damaged (3 bytes; its zip "
           "directory is missing)",
        7: "global_step7/ (named in latest) missing"}
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_a_checkpoint_without_its_run_record_resumes_with_a_note(tmp_path):
    """Killed between the Trainer's files and run_config.json, or another node's local copy (rank 0 writes the
    record): the checkpoint is complete, so it resumes, saying that its model and data are not checked."""
    from minicpm_train.resume import RunIdentity, resume_point

    complete_checkpoint(tmp_path / "checkpoint-4", 4)
    options = {"model_name_or_path": "/models/m", "qlora": False, "use_lora": True, "lora_r": 8, "stage": "sft",
               "model_max_length": 512, "template": None, "truncation": "right", "train_on": "all", "packing": False}
    said = []
    resumed = resume_point("auto", tmp_path, RunIdentity(options, [["train.json", "0" * 64, 1.0]]), max_steps=8,
                           force=False, overwrite=False, main_process=True, report=said.append)
    assert resumed == tmp_path / "checkpoint-4"
    assert said[0].startswith(f"note: {tmp_path / 'checkpoint-4'} has no run_config.json") and said[-1].endswith("(step 4)")


def test_continue_command_replaces_any_resume_flag():
    from minicpm_train.resume import continue_command

    assert continue_command(["run", "--config", "a b.yaml", "--resume-from-checkpoint", "runs/x/checkpoint-2",
                             "--max_steps", "9"]) == ("minicpm-train run --config 'a b.yaml' --max_steps 9 "
                                                      "--resume_from_checkpoint auto")
    assert continue_command(["run", "--resume_from_checkpoint=false"]) == "minicpm-train run --resume_from_checkpoint auto"


def lora_argv(model: Path, output: Path, cache: Path, *extra: str, steps: int, data: Path = TASK_TRAIN) -> list[str]:
    return ["run", "--model_name_or_path", str(model), "--train_data_path", str(data), "--output_dir", str(output),
            "--data_cache_dir", str(cache), "--model_max_length", "256", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-3", "--max_steps", str(steps), "--save_steps", "2", "--logging_steps", "1",
            "--use_lora", "--lora_r", "8", "--seed", "1", "--report_to", "none", *extra]


def test_reruns_into_a_used_output_folder(tiny_llama, tmp_path, monkeypatch, capsys):
    """An earlier run left checkpoint-2 and checkpoint-4 (and its final adapter). Re-runs with a shorter or
    longer --max_steps, other data, another model or method, a damaged checkpoint, --force_resume and
    --overwrite_output_dir each do what they say, in one line, before anything is trained."""
    output, cache = tmp_path / "out", tmp_path / "cache"

    def run(*extra: str, steps: int, data: Path = TASK_TRAIN, model: Path = tiny_llama, lora: bool = True):
        argv = lora_argv(model, output, cache, *extra, steps=steps, data=data)
        code, out, err = run_cli(monkeypatch, capsys, *(argv if lora else [a for a in argv if a != "--use_lora"]))
        assert "Traceback" not in out + err
        return code, out, err

    def trained_steps() -> list[int]:  # a resumed run's log starts with its checkpoint's
        return [e["step"] for e in json.loads((output / "metrics.json").read_text())["log_history"] if "loss" in e]

    code, _, err = run(steps=4)
    assert code == 0, err
    final = (output / "adapter_model.safetensors").read_bytes()

    def refused(message: str, *extra: str, **kwargs) -> None:
        code, out, err = run(*extra, **kwargs)
        assert code == 1 and err.count("error:") == 1 and said(message, err), err
        assert "done:" not in out and (output / "adapter_model.safetensors").read_bytes() == final

    # the same command again, or a shorter one, without resuming: refused before anything is loaded
    refused(f"{output} holds checkpoints of an earlier run (checkpoint-2 to checkpoint-4): continue it with "
            "--resume_from_checkpoint auto", steps=2)
    # the case: a shorter run with auto would train nothing and replace the adapter with the stale one
    refused(f"--resume_from_checkpoint auto: will not resume {output / 'checkpoint-4'}: its step 4 is at or past "
            "--max_steps 2, so nothing would be trained", "--resume_from_checkpoint", "auto", steps=2)
    refused("it trained on other data", "--resume_from_checkpoint", "auto", steps=6, data=TASK_DEV)
    other = linked_copy(tiny_llama, tmp_path / "other-model")
    refused(f"it trained another model ({tiny_llama})", "--resume_from_checkpoint", "auto", steps=6, model=other)
    refused("it rendered its data with --model_max_length 256", "--resume_from_checkpoint", "auto",
            "--model_max_length", "128", steps=6)
    refused(f"{output / 'checkpoint-4'} holds a LoRA adapter, and this run trains every weight: add --use_lora",
            "--resume_from_checkpoint", "auto", steps=6, lora=False)
    refused("holds a LoRA adapter of rank 8, this run's --lora_r is 4", "--resume_from_checkpoint", "auto",
            "--lora_r", "4", steps=6)
    refused("--overwrite_output_dir starts over, --resume_from_checkpoint continues", "--overwrite_output_dir",
            "--resume_from_checkpoint", "auto", steps=6)

    # longer: continues from step 4 (and its tokenized cache, truncated meanwhile, is rendered again)
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    truncate(entry, "input_ids.bin")
    code, out, err = run("--resume_from_checkpoint", "auto", steps=6)
    assert code == 0 and said(f"resume: {output / 'checkpoint-4'} (step 4)", out), err
    assert said(f"note: the tokenized cache of {TASK_TRAIN} in {entry} was damaged (input_ids.bin is", out), out
    assert trained_steps() == [1, 2, 3, 4, 5, 6]
    # the latest checkpoint damaged: passed over, with a note, for the previous complete one
    truncate(output / "checkpoint-6", "optimizer.pt")
    code, out, err = run("--resume_from_checkpoint", "auto", steps=6)
    assert code == 0, err
    assert said(f"note: skipped {output / 'checkpoint-6'}: optimizer.pt is truncated or damaged", out)
    assert said(f"resume: {output / 'checkpoint-4'} (step 4)", out) and trained_steps() == list(range(1, 7))
    # an epoch-based run whose last step the checkpoint already passed (known once the Trainer counted them)
    code, out, err = run("--resume_from_checkpoint", "auto", "--max_steps", "-1", "--num_train_epochs", "0.25", steps=6)
    assert code == 1 and said("is at step 6, at or past this run's last step 4: nothing would be trained", err), err
    # other data, resumed anyway with --force_resume (and said so)
    code, out, err = run("--resume_from_checkpoint", "auto", "--force_resume", steps=8, data=TASK_DEV)
    assert code == 0 and said("note: --force_resume: resuming", out) and said("it trained on other data", out), err
    assert trained_steps() == list(range(1, 9))
    # --overwrite_output_dir: the earlier checkpoints go, the run starts at step 0
    code, out, err = run("--overwrite_output_dir", steps=2)
    assert code == 0 and said("deleted 4 checkpoint(s) of an earlier run", out), err
    assert said("holds an earlier run's final files (its run_config.json); this run replaces them when it ends", out)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"] and trained_steps() == [1, 2]


def test_ctrl_c_says_what_was_saved_and_how_to_continue(tiny_llama, tmp_path, monkeypatch, capsys):
    from minicpm_train.callbacks import ProgressCallback

    output, cache = tmp_path / "out", tmp_path / "cache"
    argv = lora_argv(tiny_llama, output, cache, steps=4)
    step_end = ProgressCallback.on_step_end

    def interrupt_at_step_3(self, args, state, control, **kwargs):
        step_end(self, args, state, control, **kwargs)
        if state.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProgressCallback, "on_step_end", interrupt_at_step_3)
    code, out, err = run_cli(monkeypatch, capsys, *argv)
    monkeypatch.setattr(ProgressCallback, "on_step_end", step_end)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130 and len(lines) == 1 and "Traceback" not in out + err, err
    prefix = f"interrupted: the last checkpoint is {output / 'checkpoint-2'} (step 2); continue with: minicpm-train "
    assert " ".join(err.split()).startswith(prefix) and not (output / "adapter_model.safetensors").exists()
    command = shlex.split(" ".join(err.split())[len(prefix) - len("minicpm-train "):])
    assert command[-2:] == ["--resume_from_checkpoint", "auto"]
    code, out, err = run_cli(monkeypatch, capsys, *command[1:])
    assert code == 0 and said(f"resume: {output / 'checkpoint-2'} (step 2)", out), err
    history = json.loads((output / "metrics.json").read_text())["log_history"]  # the checkpoint's steps, then ours
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
