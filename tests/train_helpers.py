"""Fixtures and helpers for the training tests: tiny models, the learnable task, running and reloading."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TASK_TRAIN = FIXTURES / "train" / "train.json"
TASK_DEV = FIXTURES / "train" / "dev.json"
MAX_LENGTH = 256
sys.path.insert(0, str(FIXTURES))

import build_tiny_models  # noqa: E402  (fixtures/ is not a package)


def _build(kind: str, factory) -> Path:
    return build_tiny_models.build_tiny_model(kind, factory.mktemp(kind))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A MiniCPM5-style LlamaForCausalLM folder with the ChatML fixture tokenizer."""
    return _build("llama-chatml", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_minicpm3(tmp_path_factory) -> Path:
    """A native MiniCPM3ForCausalLM folder (latent attention projections)."""
    return _build("minicpm3", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_minicpm2(tmp_path_factory) -> Path:
    """A MiniCPM-2B-style folder (model_type "minicpm": MHA, tied head, rope_scaling null), laid out as
    OpenBMB's download: their .py files, auto_map and the real tokenizer when ../shared is present."""
    return _build("minicpm2", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_minicpm4(tmp_path_factory) -> Path:
    """A MiniCPM4-style folder (model_type "minicpm": GQA, untied head, LongRoPE, sparse_config)."""
    return _build("minicpm4", tmp_path_factory)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenized")


def task_argv(model: Path, output_dir: Path, cache: Path, *extra: str, steps: int = 16) -> list[str]:
    """The guide's flags for a short run on the learnable task."""
    return ["--model_name_or_path", str(model), "--output_dir", str(output_dir),
            "--train_data_path", str(TASK_TRAIN), "--eval_data_path", str(TASK_DEV),
            "--data_cache_dir", str(cache), "--model_max_length", str(MAX_LENGTH),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
            "--learning_rate", "5e-3", "--max_steps", str(steps), "--warmup_steps", "0",
            "--evaluation_strategy", "steps", "--eval_steps", str(steps // 2), "--logging_steps", "2",
            "--save_strategy", "steps", "--save_steps", str(steps // 2), "--seed", "42", "--report_to", "none",
            *extra]


def run_in_process(argv: list[str], callbacks: tuple = (), report=lambda message: None):
    """Parse, decide for this machine and train in this process, as ``minicpm-train run`` does (``report``
    receives the run's messages).

    The run's environment (DeepSpeed's RANK / MASTER_PORT, a script's exports) is undone afterwards,
    so it does not leak into later tests or the processes they start.
    """
    import os

    from minicpm_train.args import parse_run_args
    from minicpm_train.launch import plan_run
    from minicpm_train.recipe import train

    saved = dict(os.environ)
    try:
        run, _ = plan_run(parse_run_args(argv))
        return train(run, callbacks=callbacks, report=report)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def complete_checkpoint(folder: Path, step: int) -> Path:
    """A LoRA checkpoint folder whose files are all there and whole, without training (empty but well-formed)."""
    import json
    import zipfile

    folder.mkdir(parents=True)
    for name in ("optimizer.pt", "scheduler.pt"):
        zipfile.ZipFile(folder / name, "w").close()
    (folder / "adapter_model.safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"{}")  # header length 2: no tensors
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def eval_losses(log_history: list[dict]) -> list[float]:
    return [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]


def reload_trained(output_dir: Path, base: Path, *, adapter: bool, qlora: bool = False):
    """Load what a run saved, fresh from disk: the full model, or the base plus the saved adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    if not adapter:
        return AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval()
    from peft import PeftModel

    kwargs = {"dtype": torch.float32}
    if qlora:
        from transformers import BitsAndBytesConfig

        kwargs.update(device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), output_dir).eval()
    if qlora:  # the same 4-bit kernel as training used (the CPU bf16 repack rounds differently)
        from minicpm_train.model import disable_cpu_bf16_repacking

        disable_cpu_bf16_repacking(model)
    return model


ADAPTER_TARGETS = {"llama": ["q_proj", "v_proj"],
                   "minicpm3": ["q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj"]}


def make_adapter(base: Path, out: Path, targets: list[str]) -> Path:
    """A LoRA adapter with non-zero B (random init), so merging changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(out)
    return out


def dev_batch(tokenizer_dir: Path, count: int = 8):
    """A padded batch of the first dev samples, rendered as training renders them."""
    from minicpm_data.tokenizer import load_tokenizer, pad_token_id
    from minicpm_train.data import PaddingCollator, load_supervised

    tokenizer = load_tokenizer(str(tokenizer_dir))
    dataset, _ = load_supervised(TASK_DEV, tokenizer, max_length=MAX_LENGTH, cache_dir=tokenizer_dir / ".cache")
    return PaddingCollator(pad_token_id(tokenizer))([dataset[i] for i in range(count)])





def logits(model, batch):
    import torch

    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``minicpm-train ARGS`` in this process, through ``main()`` (errors become one line, exit 1)."""
    from minicpm_train import cli

    monkeypatch.setattr(sys, "argv", ["minicpm-train", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err
