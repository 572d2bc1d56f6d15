"""Every command on MiniCPM-1/2/4 folders (model_type "minicpm", laid out as OpenBMB's downloads, with the real
tokenizers when ../shared is there): run (LoRA with the guide's targets and all-linear, QLoRA, full, --packing,
DeepSpeed ZeRO-2 in one process, ZeRO-3 under the two-rank launcher), eval, chat, merge, doctor; all with the
built-in class and no --trust_remote_code. One LoRA run per kind is shared by the eval / chat / merge tests."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import TASK_DEV, eval_losses, run_cli, run_in_process, task_argv

KINDS = ["minicpm2", "minicpm4"]
STEPS = 8
CLI = str(Path(sys.executable).with_name("minicpm-train"))


def falling(losses: list[float]) -> bool:
    return len(losses) >= 2 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.fixture(scope="module", params=KINDS)
def lora_run(request, tmp_path_factory, data_cache):
    """(kind, base folder, output folder, result) of a LoRA run with the guide's default targets."""
    base = request.getfixturevalue(f"tiny_{request.param}")
    output = tmp_path_factory.mktemp(f"{request.param}-lora")
    result = run_in_process(task_argv(base, output, data_cache, "--use_lora", steps=STEPS))
    return request.param, base, output, result


def test_lora_with_the_guides_targets_learns(lora_run):
    kind, base, output, result = lora_run
    assert falling(eval_losses(result.log_history)), result.log_history
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert type(result.model.get_base_model()).__module__ == "minicpm_train.modeling.modeling_minicpm"
    # chat and eval on the output or a checkpoint tokenize exactly as training did
    from minicpm_data.tokenizer import load_tokenizer

    probe = "<|im_start|>user\n 你好 <|im_end|>\n<|im_start|>assistant\n<用户>hi <AI> ok"
    expected = load_tokenizer(str(base))(probe)["input_ids"]
    for folder in (output, output / f"checkpoint-{STEPS // 2}"):
        assert load_tokenizer(str(folder))(probe)["input_ids"] == expected, folder


def test_eval_chat_and_merge_on_the_run(lora_run, tmp_path, monkeypatch, capsys):
    import torch

    from minicpm_data.conversation import Conversation, Message
    from minicpm_train.inference import load_model, stop_token_ids
    from minicpm_data.render import render_prompt

    kind, base, output, result = lora_run
    metrics = {}
    for model in (base, output):
        code, out, err = run_cli(monkeypatch, capsys, "eval", str(model), "--data", str(TASK_DEV), "--json",
                                 "--batch-size", "16", "-o", str(tmp_path / f"{model.name}.jsonl"))
        assert code == 0, err
        metrics[model] = json.loads(out)
    assert math.isfinite(metrics[output]["loss"]) and metrics[output]["loss"] < metrics[base]["loss"]
    assert metrics[output]["accuracy"] is not None  # greedy answers were generated for the label set

    code, answer, err = run_cli(monkeypatch, capsys, "chat", str(output), "--prompt", "premise: a cat sleeps",
                                "--temperature", "0", "--max-new-tokens", "6")
    assert code == 0, err
    loaded = load_model(output)  # what chat streamed with its cache equals decoding with no cache at all
    prompt = torch.tensor([render_prompt(Conversation([Message("user", "premise: a cat sleeps")]), loaded.tokenizer)])
    uncached = loaded.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=6, use_cache=False, pad_token_id=loaded.tokenizer.eos_token_id,
                                     eos_token_id=stop_token_ids(loaded.model, loaded.tokenizer))
    assert answer.strip() == loaded.tokenizer.decode(uncached[0, prompt.shape[1]:], skip_special_tokens=True).strip()

    merged = tmp_path / "merged"
    code, out, err = run_cli(monkeypatch, capsys, "merge", "--base", str(base), "--adapter", str(output), "-o",
                             str(merged))
    assert code == 0, err
    check_openbmb_format(base, merged)
    from minicpm_train.model import from_pretrained

    vocab = loaded.model.config.vocab_size  # the fixture tokenizer's without ../shared, the real one's with it
    ids = torch.randint(5, min(2000, vocab), (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits
        got = from_pretrained(merged, dtype=torch.float32).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if kind == "minicpm4":  # (one kind: a fresh interpreter costs seconds)
        check_merged_loads_as_documented(merged, ids, expected, tmp_path, err)


# What docs/after-training.md says about a merged MiniCPM folder, run in a fresh interpreter of this environment.
LOAD_MERGED = """
import sys, torch
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    print("OpenBMB's code: loaded")
except Exception as error:
    print(f"OpenBMB's code: {type(error).__name__}: {error}")
from minicpm_train.modeling import register_minicpm
register_minicpm()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(type(model).__module__)
from minicpm_data.tokenizer import load_tokenizer
load_tokenizer(sys.argv[1])
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def check_merged_loads_as_documented(merged: Path, ids, expected, tmp_path: Path, merge_err: str) -> None:
    """Plain transformers 5 fails inside OpenBMB's .py files (which the merged folder keeps); after
    register_minicpm() the built-in class loads it, to base + adapter's logits. merge says so."""
    import torch

    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", LOAD_MERGED, str(merged), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if (merged / "modeling_minicpm.py").is_file():  # OpenBMB's code is there with ../shared
        assert "OpenBMB's code: ImportError: cannot import name 'is_torch_fx_available'" in done.stdout
        assert "call minicpm_train.modeling.register_minicpm() before" in " ".join(merge_err.split())
    assert "minicpm_train.modeling.modeling_minicpm" in done.stdout
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-4, atol=1e-4)


def check_openbmb_format(base: Path, merged: Path) -> None:
    """The merged folder reads as the base did: every config.json key of the base with its value (model_type,
    auto_map, rope_scaling as written, muP scalars), the same modelling .py files and tokenizer.model."""
    written = json.loads((base / "config.json").read_text())
    config = json.loads((merged / "config.json").read_text())
    changed = {key for key, value in written.items() if config.get(key, "missing") != value}
    assert changed <= {"_name_or_path", "transformers_version"}, changed
    assert config["model_type"] == "minicpm" and config["architectures"] == ["MiniCPMForCausalLM"]
    for path in [*base.glob("*.py"), *base.glob("tokenizer*")]:  # (no .py nor tokenizer.model without ../shared)
        assert (merged / path.name).read_bytes() == path.read_bytes(), path.name
    from minicpm_data.tokenizer import load_tokenizer

    text = "<用户>你好<AI>好的" if "minicpm2" in base.name else "<|im_start|>user\n你好<|im_end|>"
    assert load_tokenizer(str(merged))(text)["input_ids"] == load_tokenizer(str(base))(text)["input_ids"]


def test_qlora_through_the_cli(tiny_minicpm2, tiny_minicpm4, tmp_path, data_cache, monkeypatch, capsys):
    """QLoRA on both kinds; --trust_remote_code on a minicpm folder still loads the built-in class, and says so
    once, as it says once that MiniCPM4's sparse attention runs dense."""
    for base, trust in ((tiny_minicpm2, []), (tiny_minicpm4, ["--trust_remote_code"])):
        output = tmp_path / base.name
        code, out, err = run_cli(monkeypatch, capsys, "run", *task_argv(base, output, data_cache, "--use_lora",
                                                                        "--qlora", *trust, steps=STEPS))
        assert code == 0, err
        assert falling(eval_losses(json.loads((output / "metrics.json").read_text())["log_history"]))
        flat = " ".join(out.split())
        assert "model: minicpm_train.modeling.MiniCPMForCausalLM: the built-in MiniCPM class" in flat
        if trust and (base / "modeling_minicpm.py").is_file():
            assert flat.count("loads with the built-in MiniCPM class") == 1
        assert flat.count("sparse_config") == (1 if base == tiny_minicpm4 else 0)
        assert "SparseAttentionNotice" not in out + err


@pytest.mark.parametrize("kind, extra", [
    ("minicpm2", ["--deepspeed", "zero2", "--master_port", "29651"]),
    ("minicpm4", ["--use_lora", "--lora_target", "all-linear", "--packing"]),
], ids=["full-zero2", "all-linear-packing"])
def test_other_modes_learn(kind, extra, request, tmp_path, data_cache):
    base = request.getfixturevalue(f"tiny_{kind}")
    result = run_in_process(task_argv(base, tmp_path / "out", data_cache, *extra, steps=STEPS))
    assert falling(eval_losses(result.log_history)), result.log_history
    if "all-linear" in extra:
        adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        targets = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
        assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_nan_weights_end_a_minicpm_run_with_one_error_line(tiny_minicpm4, tmp_path, data_cache, monkeypatch, capsys):
    from test_loss_guard import poisoned_copy

    model = poisoned_copy(tiny_minicpm4, tmp_path / "model", "model.layers.1.self_attn.o_proj.weight")
    code, out, err = run_cli(monkeypatch, capsys, "run", *task_argv(model, tmp_path / "out", data_cache,
                                                                    "--use_lora", steps=4))
    assert code == 1 and [line for line in err.splitlines() if line.strip()][0].startswith("error: loss is NaN at")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_doctor_names_the_class_a_folder_loads_with(kind, request, tiny_llama, monkeypatch, capsys):
    base = request.getfixturevalue(f"tiny_{kind}")
    code, out, _ = run_cli(monkeypatch, capsys, "doctor", "--model", str(base), "--json")
    checks = {c["item"]: c for c in json.loads(out)["checks"]}
    assert checks["model class"]["value"] == "minicpm_train.modeling.MiniCPMForCausalLM: the built-in MiniCPM class"
    assert checks["model class"]["verdict"] == "ok"
    code, out, _ = run_cli(monkeypatch, capsys, "doctor", "--model", str(tiny_llama), "--json")
    checks = {c["item"]: c for c in json.loads(out)["checks"]}
    assert checks["model class"]["value"] == "LlamaForCausalLM: transformers' own class"


@pytest.mark.slow
def test_two_cpu_ranks_zero3_on_minicpm4(tiny_minicpm4, tmp_path, data_cache):
    """The deepspeed launcher, two CPU ranks, ZeRO-3: every rank loads the built-in class; the saved full
    model reloads and learned."""
    output = tmp_path / "z3"
    done = subprocess.run([CLI, "run", *task_argv(tiny_minicpm4, output, data_cache, steps=STEPS), "--num_gpus", "2",
                           "--master_port", "29652", "--deepspeed", "zero3"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert falling(eval_losses(metrics["log_history"]))
    # The launcher's node ends with the one-process run's line: the final metrics rank 0 wrote, and where.
    final = {k: metrics["final"][k] for k in ("train_loss", "eval_loss", "train_runtime")}
    assert f"done: {json.dumps(final)}; outputs in {output}" in " ".join(done.stdout.split()), done.stdout[-500:]
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "minicpm" and config["rope_scaling"]["rope_type"] == "longrope"
    assert (output / "model.safetensors").is_file()


@pytest.mark.parametrize("change, message", [
    ({"num_experts": 8}, "MiniCPM-MoE (num_experts 8) is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'"),
])
def test_minicpm_configs_the_built_in_class_cannot_build_are_one_line_errors(change, message, tiny_minicpm2, tmp_path,
                                                                            monkeypatch, capsys):
    import shutil

    folder = shutil.copytree(tiny_minicpm2, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    code, _, err = run_cli(monkeypatch, capsys, "chat", str(folder), "--prompt", "hi")
    assert code == 1 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_plan_sizes_minicpm_folders_and_names(tiny_minicpm4, monkeypatch, capsys):
    from safetensors.torch import load_file

    from minicpm_train.model_sizes import resolve_architecture

    code, out, err = run_cli(monkeypatch, capsys, "plan", "--model_name_or_path", str(tiny_minicpm4), "--use_lora",
                             "--json")
    assert code == 0, err
    report = json.loads(out)
    weights = load_file(tiny_minicpm4 / "model.safetensors")  # the folder's own config, untied head included
    assert report["parameters"] == sum(tensor.numel() for tensor in weights.values())
    assert report["settings"]["lora_targets"] == ["q_proj", "v_proj"]
    four_one, _ = resolve_architecture("openbmb/MiniCPM4.1-8B")
    assert four_one.parameters().total == resolve_architecture("MiniCPM4-8B")[0].parameters().total
    assert (four_one.num_kv_heads, four_one.tie_word_embeddings) == (2, False)
