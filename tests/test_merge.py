"""minicpm-train merge: base + adapter -> one folder plain transformers loads, with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest

from minicpm_train.model import ModelError


TARGETS = {"llama": ["q_proj", "v_proj"], "minicpm3": ["q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj"]}


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


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["llama", "minicpm3"])
def test_merged_logits_equal_base_plus_adapter(kind, request, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minicpm_train.merge import merge_adapter

    base = request.getfixturevalue(f"tiny_{kind}")
    adapter = make_adapter(base, tmp_path / "adapter", TARGETS[kind])
    result = merge_adapter(base, adapter, tmp_path / "merged")

    assert {"model.safetensors", "config.json", "tokenizer_config.json", "generation_config.json"} <= set(result.files)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    assert not hasattr(merged, "peft_config")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                             adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = logits_of(with_adapter, ids)
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=1e-4, atol=1e-4)
    assert (logits_of(plain, ids) - expected).abs().max() > 1e-2  # the adapter matters
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template  # the chat template travels with the merged model
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in text


def test_adapter_folder_as_model_and_errors(tiny_llama, tmp_path):
    from minicpm_train.merge import merge_adapter

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", TARGETS["llama"])
    result = merge_adapter(adapter, None, tmp_path / "merged", dtype="bf16")  # base read from adapter_config.json
    assert result.base == Path(tiny_llama) and result.dtype == "bf16"
    with pytest.raises(ModelError, match="not empty"):
        merge_adapter(tiny_llama, adapter, tmp_path / "merged")
    with pytest.raises(ModelError, match="no adapter_config.json"):
        merge_adapter(tiny_llama, tmp_path, tmp_path / "other")
    with pytest.raises(ModelError, match="not over its inputs"):
        merge_adapter(tiny_llama, adapter, adapter, overwrite=True)


def test_cli_merge(tiny_llama, tmp_path, monkeypatch, capsys):
    from train_helpers import run_cli

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", TARGETS["llama"])
    code, out, err = run_cli(monkeypatch, capsys, "merge", "--base", str(tiny_llama), "--adapter", str(adapter),
                             "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "merged" in out and (tmp_path / "out" / "model.safetensors").is_file()
    code, _, err = run_cli(monkeypatch, capsys, "merge", "--base", str(tmp_path / "missing"), "--adapter",
                           str(adapter), "-o", str(tmp_path / "out2"))
    assert code == 1 and err.count("\n") == 1 and "config.json" in err
