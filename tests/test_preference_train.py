"""`minicpm-train run --stage dpo / kto` end to end on a tiny model: LoRA, QLoRA, full fine-tuning with the
reference computed once and cached, packing, gradient accumulation, resume, two ranks with DeepSpeed (ZeRO-3 full,
ZeRO-2 LoRA), OpenBMB's sft_dpo.sh flags, and the one-line errors of a file of the wrong kind.

The pairs come from the learnable task (tests/train_helpers.py): chosen is the right label, rejected another.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import TASK_DEV, TASK_TRAIN, build_tiny_models, run_cli, run_in_process

LABELS = ("entailment", "neutral", "contradiction")


def _preference_rows(source: Path, kind: str, count: int) -> list[dict]:
    rows = []
    for record in json.loads(source.read_text())[:count]:
        context, answer = record["messages"][:-1], record["messages"][-1]["content"]
        wrong = LABELS[(LABELS.index(answer) + 1) % len(LABELS)]
        if kind == "kto":
            rows += [{"messages": record["messages"], "label": True},
                     {"messages": [*context, {"role": "assistant", "content": wrong}], "label": False}]
        else:
            rows.append({"messages": context, "chosen": {"role": "assistant", "content": answer},
                         "rejected": {"role": "assistant", "content": wrong}})
    return rows


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    """Pairs and KTO rows of the task's train and dev files; the train pairs end with one whose context is
    longer than --model_max_length (counted as dropped, never trained)."""
    folder = tmp_path_factory.mktemp("preference")
    files = {}
    for kind in ("pairs", "kto"):
        for split, source, count in (("train", TASK_TRAIN, 48), ("dev", TASK_DEV, 16)):
            rows = _preference_rows(source, kind, count)
            if kind == "pairs" and split == "train":
                long = [{"role": "user", "content": " ".join(["premise: the team is cooking"] * 200)}]
                rows.append({**rows[0], "messages": long})
            path = folder / f"{kind}_{split}.json"
            path.write_text(json.dumps(rows, ensure_ascii=False))
            files[f"{kind}_{split}"] = path
    return files


def _argv(model: Path, files: dict, kind: str, output_dir: Path, cache: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["--model_name_or_path", str(model), "--output_dir", str(output_dir),
            "--train_data_path", str(files[f"{kind}_train"]), "--eval_data_path", str(files[f"{kind}_dev"]),
            "--data_cache_dir", str(cache), "--model_max_length", "256", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3", "--max_steps", str(steps),
            "--warmup_steps", "0", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", str(steps),
            "--save_strategy", "no", "--seed", "7", "--report_to", "none",
            "--stage", "kto" if kind == "kto" else "dpo", *extra]


def _logged(result, key: str) -> list[float]:
    return [entry[key] for entry in result.log_history if key in entry]


def test_dpo_lora_run_logs_rewards_plots_them_and_counts_dropped_pairs(tiny_llama, task_files, tmp_path, data_cache,
                                                                       monkeypatch, capsys):
    lines: list[str] = []
    result = run_in_process(_argv(tiny_llama, task_files, "pairs", tmp_path / "run", data_cache, "--use_lora"),
                            report=lines.append)
    assert "data " + str(task_files["pairs_train"]) + ": 48 pairs used, 1 dropped (answer truncated away 1)" in "\n".join(lines)
    assert "reference: the base model, by disabling the LoRA adapter (no second copy)" in lines
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/accuracies"):
        assert _logged(result, key), key
    assert all(math.isfinite(v) and v > 0 for v in _logged(result, "grad_norm"))
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert (result.output_dir / "loss_curve.png").stat().st_size > 10_000  # two panels: loss, rewards
    summary = json.loads((result.output_dir / "data_summary.json").read_text())["train"]
    assert summary["kind"] == "pairs" and summary["dropped"] == {"answer truncated away": 1} and summary["used"] == 48

    # eval, merge and chat on the result, as for SFT: the adapter's preference metrics against the base, and the
    # merged model's against --ref-model base, are the same; the run's last eval saw the same pairs.
    capsys.readouterr()  # the run's own printed logs
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(result.output_dir), "--data",
                             str(task_files["pairs_dev"]), "--json")
    assert code == 0, err
    adapter = json.loads(out)
    assert adapter["reference"] == "the model with its LoRA adapter disabled" and adapter["scored"] == 16
    assert adapter["accuracy"] == pytest.approx(_logged(result, "eval_rewards/accuracies")[-1], abs=1e-6)
    assert adapter["margin"] == pytest.approx(_logged(result, "eval_rewards/margins")[-1], rel=1e-3, abs=1e-7)
    merged = tmp_path / "merged"
    assert run_cli(monkeypatch, capsys, "merge", "--base", str(tiny_llama), "--adapter", str(result.output_dir),
                   "-o", str(merged))[0] == 0
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(merged), "--data", str(task_files["pairs_dev"]),
                             "--ref_model", str(tiny_llama), "--json")
    assert code == 0, err
    assert json.loads(out)["margin"] == pytest.approx(adapter["margin"], rel=1e-3, abs=1e-6)
    code, out, err = run_cli(monkeypatch, capsys, "chat", str(merged), "--prompt", "premise: a\nhypothesis: b",
                             "--max-new-tokens", "3", "--temperature", "0")
    assert code == 0 and out.strip(), err


def test_qlora_dpo_keeps_learning_after_reference_forwards(tiny_llama, task_files, tmp_path, data_cache):
    """Every step runs a no-grad reference forward (adapter disabled) before the policy's: on CPUs with
    avx512_bf16, bitsandbytes would repack the 4-bit weights there and LoRA's gradients would vanish."""
    result = run_in_process(_argv(tiny_llama, task_files, "pairs", tmp_path / "run", data_cache, "--use_lora",
                                  "--qlora", "--eval_strategy", "no", steps=2))
    norms = _logged(result, "grad_norm")
    assert len(norms) == 2 and all(norm > 0 for norm in norms), norms


def test_full_dpo_computes_the_reference_once_and_keys_it(tiny_llama, task_files, tmp_path, data_cache):
    """Full fine-tuning: the reference log-probabilities are computed before training into the data's cache
    folder, read by the next run, and a different reference gets its own file."""
    cache = tmp_path / "cache"
    first: list[str] = []
    run_in_process(_argv(tiny_llama, task_files, "pairs", tmp_path / "a", cache, steps=1), report=first.append)
    assert sum("computed into" in line for line in first) == 2  # train and dev
    again: list[str] = []
    result = run_in_process(_argv(tiny_llama, task_files, "pairs", tmp_path / "b", cache, steps=1),
                            report=again.append)
    assert sum("read from" in line for line in again) == 2 and not any("computed into" in line for line in again)
    assert _logged(result, "grad_norm")[0] > 0
    other = build_tiny_models.build_tiny_model("llama-chatml", tmp_path / "other_reference", seed=1)
    changed: list[str] = []
    run_in_process(_argv(tiny_llama, task_files, "pairs", tmp_path / "c", cache, "--ref_model", str(other),
                         steps=1), report=changed.append)
    assert sum("computed into" in line for line in changed) == 2
    assert len(list(cache.glob("*/reference-*.npy"))) == 4


def test_gradient_accumulation_and_packing_give_the_batch_gradient(tiny_llama, task_files, tmp_path, data_cache):
    """One step of 8 pairs, 4 pairs x 2 accumulated, and 8 pairs packed in one row: the same loss and
    gradient norm (the per-pair mean is divided by the accumulation steps; packed pairs never mix)."""
    common = ("--use_lora", "--max_steps", "1", "--train_sampling_strategy", "sequential", "--eval_strategy", "no")
    runs = {name: run_in_process(_argv(tiny_llama, task_files, "pairs", tmp_path / name, data_cache, *common, *extra))
            for name, extra in (("batch", ("--per_device_train_batch_size", "8")),
                                ("accumulated", ("--gradient_accumulation_steps", "2")),
                                ("packed", ("--per_device_train_batch_size", "8", "--packing")))}
    expected = runs["batch"].log_history[0]
    for name in ("accumulated", "packed"):
        got = runs[name].log_history[0]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), name
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), name


def test_kto_lora_run_and_resume(tiny_llama, task_files, tmp_path, data_cache):
    output = tmp_path / "run"
    lines: list[str] = []
    run_in_process(_argv(tiny_llama, task_files, "kto", output, data_cache, "--use_lora", "--save_strategy", "steps",
                         "--save_steps", "2", steps=2), report=lines.append)
    assert f"data {task_files['kto_train']}: 96 samples used (48 desirable, 48 undesirable)" in "\n".join(lines)
    lines.clear()
    resumed = run_in_process(_argv(tiny_llama, task_files, "kto", output, data_cache, "--use_lora",
                                   "--resume_from_checkpoint", "auto", steps=4), report=lines.append)
    assert f"resume: {output / 'checkpoint-2'} (step 2)" in lines
    steps = [entry["step"] for entry in resumed.log_history if "loss" in entry]
    assert steps == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's history, then 3-4
    assert {"kl", "rewards/chosen", "rewards/rejected"} <= resumed.log_history[-3].keys()


def test_openbmb_sft_dpo_script_runs_as_written(tiny_llama, task_files, tmp_path, data_cache, monkeypatch, capsys):
    """OpenBMB's finetune/sft_dpo_trainer/sft_dpo.sh, paths and length changed: its flags map to ours with a
    notice each, through --script."""
    script = tmp_path / "sft_dpo.sh"
    script.write_text(f"""#!/bin/bash
python finetune_dpo_trainer.py \\
    --model_name_or_path "{tiny_llama}" \\
    --train_data_path "{task_files['pairs_train']}" \\
    --eval_data_path "{task_files['pairs_dev']}" \\
    --output_dir "{tmp_path / 'output_dpo_sft'}" \\
    --num_train_epochs 3 \\
    --per_device_train_batch_size 1 \\
    --per_device_eval_batch_size 1 \\
    --gradient_accumulation_steps 8 \\
    --learning_rate 5e-6 \\
    --weight_decay 0.01 \\
    --warmup_steps 100 \\
    --logging_steps 10 \\
    --save_steps 500 \\
    --eval_steps 500 \\
    --model_max_length 512 \\
    --use_lora True \\
    --bf16 True \\
    --gradient_checkpointing True \\
    --dataloader_num_workers 4 \\
    --remove_unused_columns False \\
    --use_dpo True \\
    --dpo_beta 0.1 \\
    --sft_loss_weight 0.5
""")
    code, out, err = run_cli(monkeypatch, capsys, "run", "--script", str(script), "--max_steps", "1",
                             "--data_cache_dir", str(data_cache), "--dataloader_num_workers", "0")
    assert code == 0, err[-2000:]
    text = " ".join(out.split())
    for notice in ("--use_dpo (OpenBMB's sft_dpo_trainer) is --stage dpo", "--dpo_beta is OpenBMB sft_dpo_trainer's "
                   "name for --beta", "--sft_loss_weight is OpenBMB sft_dpo_trainer's name for --sft_weight"):
        assert notice in text, notice
    config = json.loads((tmp_path / "output_dpo_sft" / "run_config.json").read_text())
    assert config["options"]["stage"] == "dpo" and config["options"]["sft_weight"] == 0.5
    history = json.loads((tmp_path / "output_dpo_sft" / "metrics.json").read_text())["log_history"]
    assert {"sft_loss", "dpo_loss", "rewards/margins"} <= history[0].keys()


@pytest.mark.parametrize("stage,kind,says", [("dpo", "messages", "holds SFT conversations (messages), not preference "
                                                                  "pairs (chosen/rejected): train it with --stage sft"),
                                             ("sft", "pairs", "train it with --stage dpo"),
                                             ("dpo", "kto", "train it with --stage kto")])
def test_a_file_of_another_kind_is_one_error_line(stage, kind, says, tiny_llama, task_files, tmp_path, monkeypatch,
                                                  capsys):
    data = TASK_TRAIN if kind == "messages" else task_files[f"{kind}_train"]
    code, _, err = run_cli(monkeypatch, capsys, "run", "--model_name_or_path", str(tiny_llama), "--train_data_path",
                           str(data), "--output_dir", str(tmp_path / "out"), "--data_cache_dir", str(tmp_path / "c"),
                           "--stage", stage)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err


@pytest.mark.slow
@pytest.mark.parametrize("stage,method", [("zero3", ()), ("zero2", ("--use_lora",))], ids=["zero3-full", "zero2-lora"])
def test_two_ranks_deepspeed_take_the_same_first_step(stage, method, tiny_llama, task_files, tmp_path, data_cache):
    """Two CPU ranks of 2 pairs each under DeepSpeed take the first step of one process of 4 pairs without it:
    its loss, gradient norm and logged metrics (averaged over the ranks, not rank 0's own). ZeRO-3 partitions
    every weight, lm_head included (its gradient comes from the second chunked pass, through a call of lm_head);
    ZeRO-2 with LoRA takes the reference from the same engine with the adapter disabled.
    (Only the first step: DeepSpeed's own scheduler starts at a learning rate of 0.)"""
    common = ("--eval_strategy", "no", "--train_sampling_strategy", "sequential", *method)
    plain = run_in_process(_argv(tiny_llama, task_files, "pairs", tmp_path / "plain", data_cache, *common, steps=1))
    argv = _argv(tiny_llama, task_files, "pairs", tmp_path / stage, data_cache, *common, "--deepspeed", stage,
                 "--num_gpus", "2", "--master_port", "30011", steps=1)
    argv[argv.index("--per_device_train_batch_size") + 1] = "2"
    done = subprocess.run([str(Path(sys.executable).with_name("minicpm-train")), "run", *argv], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--num_gpus 2 starts 2 CPU processes" in done.stdout
    ranks, first = json.loads((tmp_path / stage / "metrics.json").read_text())["log_history"][0], plain.log_history[0]
    assert ranks["loss"] == pytest.approx(math.log(2), rel=1e-6)  # the policy is still the reference
    assert ranks["loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert ranks["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-4)
    for key in ("logps/chosen", "logps/rejected", "logps/accuracies"):
        assert ranks[key] == pytest.approx(first[key], rel=1e-5), key


def test_plan_sizes_a_dpo_micro_batch_as_two_sequences_per_pair(tiny_llama):
    """A DPO micro batch of 4 pairs holds 8 sequences: the activations of an SFT micro batch of 8; the plan says
    where the reference comes from (LoRA: adapter disabled; full: computed once before training)."""
    from minicpm_train.plan import plan_from_argv

    def plan(*flags: str):
        return plan_from_argv(["--model_name_or_path", str(tiny_llama), "--bf16", "true", *flags], gpu_memory_gib=24,
                              devices=[])

    dpo = plan("--stage", "dpo", "--per_device_train_batch_size", "4", "--use_lora")
    sft = plan("--per_device_train_batch_size", "8", "--use_lora")
    assert dpo.estimate.activations == sft.estimate.activations > plan("--per_device_train_batch_size", "4",
                                                                       "--use_lora").estimate.activations
    assert any("two sequences (chosen and rejected)" in note and "adapter disabled" in note
               for note in dpo.estimate.notes)
    full = plan("--stage", "dpo", "--per_device_train_batch_size", "4")
    assert any("computed once before training" in note for note in full.estimate.notes)
    assert "--stage" in " ".join(suggestion for s in full.suggestions for suggestion in s.settings.flags()) or \
        not full.suggestions


def test_logged_metrics_are_means_over_every_ranks_batches():
    """Two ranks' metrics since the last log: each is averaged over all their batches; a KTO side that only the
    other rank's batches held is averaged over those; a metric no rank has is left out; an unregistered one is
    refused (it would otherwise make ranks reduce different tensors)."""
    import torch

    from minicpm_train.preference import METRICS, PreferenceError, mean_over_ranks

    this_rank = {"kl": [0.5], "rewards/chosen": [1.0, 3.0]}
    other_rank = torch.zeros(len(METRICS), 2, dtype=torch.float64)  # [total, count] per metric
    for name, total, count in (("kl", 1.5, 1), ("rewards/chosen", 5.0, 1), ("rewards/rejected", -2.0, 1)):
        other_rank[METRICS.index(name)] = torch.tensor([total, count])
    assert mean_over_ranks(this_rank, lambda totals: totals + other_rank) == \
        {"kl": 1.0, "rewards/chosen": 3.0, "rewards/rejected": -2.0}
    assert mean_over_ranks(this_rank) == {"kl": 0.5, "rewards/chosen": 2.0}
    with pytest.raises(PreferenceError, match="unregistered"):
        mean_over_ranks({"unregistered": [1.0]})


def test_merged_boundary_pairs_are_trained_and_scored_from_the_shared_prefix(tiny_minicpm2, tmp_path):
    """MiniCPM-2's tokenizers merge "<AI>"'s ">" with some answers' first characters (the real one with a quote,
    the fixture's with "H"): those pairs are kept, counted on the run's data line and by eval, and each answer is
    scored from the tokens both sides share, the merged token's place included."""
    import torch
    from transformers import AutoModelForCausalLM

    from minicpm_data.conversation import PreferencePair
    from minicpm_data.render import render_pairs
    from minicpm_data.tokenizer import load_tokenizer
    from minicpm_train.data import load_data
    from minicpm_train.evaluate import evaluate_pairs
    from minicpm_train.modeling import register_minicpm

    rows = [{"messages": [{"role": "user", "content": question}], "chosen": {"role": "assistant", "content": chosen},
             "rejected": {"role": "assistant", "content": rejected}}
            for question, chosen, rejected in (("Quote it.", '"Carpe diem."', "Carpe diem."),
                                               ("Say hi.", "Hello there.", "Bye."), ("Say hi.", "Sure.", "No."))]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = load_tokenizer(str(tiny_minicpm2))
    pairs = [PreferencePair.from_record(row) for row in rows]
    rendered = list(render_pairs(pairs, tokenizer))
    merged = sum(pair.merged_boundary for pair in rendered)
    assert merged >= 1 and all(pair.problem is None for pair in rendered)

    files, summary = load_data(str(path), tokenizer, max_length=256, cache_dir=tmp_path / "cache", kind="pairs")
    assert (summary.used, summary.merged_boundary) == (3, merged)
    assert f"{merged} trained from an answer merged with the prompt's end" in summary.describe()
    for row, pair in zip(files[0][0], rendered):
        assert row["chosen_labels"].tolist() == pair.chosen.labels
        assert row["rejected_labels"].tolist() == pair.rejected.labels

    register_minicpm()
    model = AutoModelForCausalLM.from_pretrained(tiny_minicpm2, dtype=torch.float32).eval()
    result = evaluate_pairs(model, tokenizer, list(enumerate(pairs)), reference_name="the model itself")
    assert (result.metrics()["merged_boundary"], result.metrics()["scored"]) == (merged, 3)
    for prediction, pair in zip(result.predictions, rendered):
        for logp, side in ((prediction.chosen_logp, pair.chosen), (prediction.rejected_logp, pair.rejected)):
            ids = torch.tensor([side.input_ids])
            with torch.no_grad():
                logprobs = model(ids).logits.log_softmax(-1)[0]
            expected = sum(logprobs[i - 1, side.input_ids[i]].item()
                           for i in range(pair.prompt_tokens, len(side.input_ids)))
            assert logp == pytest.approx(expected, rel=1e-4)
