"""Training runs on the tiny models: full, LoRA, QLoRA, DeepSpeed ZeRO-2 in one process.

Each mode: trains on the learnable fixture task, eval loss falls, the saved output reloads and gives
the same logits, and a run killed after a checkpoint resumes from that checkpoint's step and ends
where the uninterrupted run ends.
"""

from __future__ import annotations

import json

import pytest
from transformers import TrainerCallback

from minicpm_data.errors import MinicpmError
from minicpm_train.model import ModelError
from train_helpers import (dev_batch, eval_losses, logits, reload_trained, run_in_process, task_argv)


STEPS = 16  # checkpoints and evaluations at 8 and 16


class Killed(Exception):
    pass


class KillAt(TrainerCallback):
    """Stops the run dead at a step, as a crash or Ctrl-C would (no save, no cleanup)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(self.step)


class FirstStep(TrainerCallback):
    """Records the global step the run starts its first optimizer step from."""

    first: int | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first is None:
            self.first = state.global_step


def _base_dev_loss(model_dir, batch) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def check_mode(tmp_path, model_dir, cache, *extra, adapter: bool, qlora: bool = False):
    """Train, check learning, reload, kill at step 12 and resume from the step-8 checkpoint."""
    import torch

    full = run_in_process(task_argv(model_dir, tmp_path / "full", cache, *extra, steps=STEPS))
    losses = eval_losses(full.log_history)
    batch = dev_batch(model_dir)
    assert len(losses) >= 2 and losses[-1] < losses[0] < _base_dev_loss(model_dir, batch)

    out = full.output_dir
    for name in ("run_config.json", "data_summary.json", "metrics.json", "loss_curve.png", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert (out / ("adapter_model.safetensors" if adapter else "model.safetensors")).is_file()
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["train"]["used"] == 128 and summary["train"]["dropped_no_trained_tokens"] == 0
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or (out / "chat_template.jinja").is_file()

    trained = full.model.eval()
    view = {k: v for k, v in batch.items() if k != "labels"}
    reloaded = reload_trained(out, model_dir, adapter=adapter, qlora=qlora)
    torch.testing.assert_close(logits(reloaded, view), logits(trained, view), atol=1e-4, rtol=1e-4)

    argv = task_argv(model_dir, tmp_path / "killed", cache, *extra, steps=STEPS)
    with pytest.raises(Killed):
        run_in_process(argv, callbacks=(KillAt(12),))
    start = FirstStep()
    resumed = run_in_process(argv + ["--resume_from_checkpoint", "auto"], callbacks=(start,))
    assert start.first == 8  # the step-8 checkpoint, not step 0 and not the lost step 12
    assert [e["step"] for e in resumed.log_history if "loss" in e] == list(range(2, STEPS + 1, 2))
    # It ends where the uninterrupted run ends (exactly for full fine-tuning; dropout draws may differ
    # after a restart), far closer to it than to where both stood at the step-8 checkpoint.
    gap = abs(resumed.metrics["eval_loss"] - full.metrics["eval_loss"])
    assert gap < (losses[0] - losses[-1]) / 2
    return full


def test_full_finetune(tmp_path, tiny_llama, data_cache):
    check_mode(tmp_path, tiny_llama, data_cache, adapter=False)


def test_resume_auto_without_a_complete_checkpoint_starts_fresh(tmp_path):
    from minicpm_train.resume import RunIdentity, resume_point

    (tmp_path / "checkpoint-8").mkdir()  # killed while saving: no trainer_state.json
    said: list[str] = []
    for folder in (tmp_path, tmp_path / "new"):
        assert resume_point("auto", folder, RunIdentity({}, []), max_steps=16, force=False, overwrite=False,
                            main_process=True, report=said.append) is None
    assert said == [f"note: skipped {tmp_path / 'checkpoint-8'}: trainer_state.json is missing (the checkpoint was "
                    "not finished)", f"resume: no complete checkpoint in {tmp_path}, starting fresh",
                    f"resume: no complete checkpoint in {tmp_path / 'new'}, starting fresh"]


def test_lora_with_guide_defaults(tmp_path, tiny_llama, data_cache):
    result = check_mode(tmp_path, tiny_llama, data_cache, "--use_lora", adapter=True)
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (64, 32, 0.1)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_minicpm3_lora_targets_its_latent_attention(tmp_path, tiny_minicpm3, data_cache):
    """A LoRA run on MiniCPM3ForCausalLM adapts its latent attention, learns, and reloads to the same logits."""
    import torch

    argv = task_argv(tiny_minicpm3, tmp_path / "m3", data_cache, "--use_lora", "--lora_r", "8", steps=4)
    result = run_in_process(argv)
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj", "q_b_proj"]
    losses = eval_losses(result.log_history)
    assert len(losses) == 2 and losses[-1] < losses[0]
    batch = {k: v for k, v in dev_batch(tiny_minicpm3).items() if k != "labels"}
    reloaded = reload_trained(result.output_dir, tiny_minicpm3, adapter=True)
    torch.testing.assert_close(logits(reloaded, batch), logits(result.model.eval(), batch), atol=1e-4, rtol=1e-4)
    with pytest.raises(ModelError, match="q_proj, v_proj not in this minicpm3 model.*kv_a_proj_with_mqa"):
        run_in_process(argv + ["--lora_target", "q_proj,v_proj", "--output_dir", str(tmp_path / "m3-guide")])


def test_lora_all_linear_and_packing(tmp_path, tiny_llama, data_cache):
    result = run_in_process(task_argv(tiny_llama, tmp_path / "all", data_cache, "--use_lora", "--lora_r", "8",
                                      "--lora_target", "all-linear", "--packing", steps=8))
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    losses = eval_losses(result.log_history)
    assert losses[-1] < losses[0]


def test_model_needing_custom_code_says_trust_remote_code(tmp_path, tiny_llama, data_cache):
    custom = tmp_path / "custom"
    custom.mkdir()
    for item in tiny_llama.iterdir():
        if item.is_file():
            (custom / item.name).write_bytes(item.read_bytes())
    config = json.loads((custom / "config.json").read_text())
    # (model_type "minicpm" is built in: a custom type of some other vendor still needs its code)
    config.update(model_type="vendor_lm", auto_map={"AutoModelForCausalLM": "modeling_vendor.VendorForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="modeling_vendor.VendorForCausalLM.*add --trust_remote_code"):
        run_in_process(task_argv(custom, tmp_path / "o", data_cache, steps=2))
    with pytest.raises(ModelError, match="runs the folder's own code, but modeling_vendor.py is not there"):
        run_in_process(task_argv(custom, tmp_path / "o", data_cache, "--trust_remote_code", steps=2))
    with pytest.raises(MinicpmError, match=f"^{tmp_path / 'missing'}: no such folder; check the path$"):
        run_in_process(task_argv(tmp_path / "missing", tmp_path / "o", data_cache, steps=2))


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_qlora_compute_dtype_follows_precision_with_kbit_preparation(tiny_llama, precision):
    import bitsandbytes as bnb
    import torch

    from minicpm_train.args import RunOptions
    from minicpm_train.model import add_lora, load_base_model, prepare_4bit_for_training

    options = RunOptions(model_name_or_path=str(tiny_llama), use_lora=True, qlora=True, lora_r=8)
    model = load_base_model(options, precision=precision, device="cpu", quantize_4bit=True)
    model = add_lora(prepare_4bit_for_training(model, device="cpu", gradient_checkpointing=True), options, "llama")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {layer.compute_dtype for layer in layers} == {getattr(torch, {"bf16": "bfloat16"}.get(precision, "float32"))}
    assert {layer.weight.quant_type for layer in layers} == {"nf4"} and layers[0].weight.quant_state.nested  # double quant
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)
    assert model.base_model.model.is_activation_checkpointing
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


# DeepSpeed keeps process-wide state: these run last in this module.


def test_qlora_on_zero2_offload_keeps_learning_after_evaluation(tmp_path, tiny_llama, data_cache):
    result = check_mode(tmp_path, tiny_llama, data_cache, "--use_lora", "--qlora", "--deepspeed",
                        "configs/ds_config_zero2_offload.json", "--master_port", "29631", adapter=True, qlora=True)
    first_eval = next(e["step"] for e in result.log_history if "eval_loss" in e)
    after = [e["grad_norm"] for e in result.log_history if "grad_norm" in e and e["step"] > first_eval]
    assert after and all(norm > 0 for norm in after)  # bitsandbytes' CPU repacking would zero these
    import bitsandbytes as bnb

    layers = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.compute_dtype is not None for layer in layers)


def test_full_finetune_with_zero2_in_one_process(tmp_path, tiny_llama, data_cache):
    check_mode(tmp_path, tiny_llama, data_cache, "--deepspeed", "zero2", "--master_port", "29632", adapter=False)
