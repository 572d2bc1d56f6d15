"""minicpm-train merge: base + adapter -> one folder plain transformers loads, with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest

from minicpm_train.model import ModelError
from train_helpers import ADAPTER_TARGETS, make_adapter


def other_base(base: Path, out: Path, **changes) -> Path:
    """A copy of ``base`` (tokenizer included), re-initialised with ``changes`` to its config (wider, deeper)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(base, out)
    config = AutoConfig.from_pretrained(base)
    for name, value in changes.items():
        setattr(config, name, value)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
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
    adapter = make_adapter(base, tmp_path / "adapter", ADAPTER_TARGETS[kind])
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

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", ADAPTER_TARGETS["llama"])
    result = merge_adapter(adapter, None, tmp_path / "merged", dtype="bf16")  # base read from adapter_config.json
    assert result.base == Path(tiny_llama) and result.dtype == "bf16"
    with pytest.raises(ModelError, match="not empty"):
        merge_adapter(tiny_llama, adapter, tmp_path / "merged")
    with pytest.raises(ModelError, match="no adapter_config.json"):
        merge_adapter(tiny_llama, tmp_path, tmp_path / "other")
    with pytest.raises(ModelError, match="not over its inputs"):
        merge_adapter(tiny_llama, adapter, adapter, overwrite=True)


def test_adapter_of_another_base_is_refused(tiny_llama, tiny_minicpm3, tmp_path):
    """Merge, chat and eval (all through load_model) refuse an adapter whose layers do not fit the base."""
    from minicpm_train.inference import load_model
    from minicpm_train.merge import merge_adapter

    llama_adapter = make_adapter(tiny_llama, tmp_path / "llama_adapter", ADAPTER_TARGETS["llama"])
    m3_adapter = make_adapter(tiny_minicpm3, tmp_path / "m3_adapter", ADAPTER_TARGETS["minicpm3"])
    wider = other_base(tiny_llama, tmp_path / "wider", hidden_size=96)
    deeper = other_base(tiny_llama, tmp_path / "deeper", num_hidden_layers=3)
    for base, adapter, message in (
            (tiny_minicpm3, llama_adapter, r"adapts model\.layers\.0\.self_attn\.q_proj, which .* does not have"),
            (tiny_llama, m3_adapter, r"adapts model\.layers\.0\.self_attn\.\w+_proj\w*, which .* does not have"),
            (wider, llama_adapter, "q_proj as 64 -> 64 features, but it is 96 -> 64 in"),
            (deeper, llama_adapter, "has model.layers.2.self_attn.q_proj, which the adapter .* has no weights for")):
        with pytest.raises(ModelError, match=message + ".*trained on another model"):
            load_model(base, adapter, device="cpu")
    with pytest.raises(ModelError, match="does not have"):
        merge_adapter(tiny_minicpm3, llama_adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    same_shapes = other_base(tiny_llama, tmp_path / "same_shapes")
    result = merge_adapter(same_shapes, llama_adapter, tmp_path / "merged")
    assert result.notices == [f"the adapter {llama_adapter} was trained on {tiny_llama}; applying it to "
                              f"{same_shapes} (its adapted layers fit)"]
    assert load_model(tiny_llama, llama_adapter, device="cpu").notices == []


def test_cli_merge(tiny_llama, tmp_path, monkeypatch, capsys):
    from train_helpers import run_cli

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", ADAPTER_TARGETS["llama"])
    code, out, err = run_cli(monkeypatch, capsys, "merge", "--base", str(tiny_llama), "--adapter", str(adapter),
                             "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "merged" in out and (tmp_path / "out" / "model.safetensors").is_file()
    code, _, err = run_cli(monkeypatch, capsys, "merge", "--base", str(tmp_path / "missing"), "--adapter",
                           str(adapter), "-o", str(tmp_path / "out2"))
    assert code == 1 and err.count("\n") == 1 and f"{tmp_path / 'missing'}: no such folder" in err
    a_file = tmp_path / "out" / "model.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "merge", "--base", str(tiny_llama), "--adapter", str(adapter),
                           "-o", str(a_file))
    assert code == 1 and err.count("\n") == 1 and f"-o {a_file} is a file" in err
    wider = other_base(tiny_llama, tmp_path / "wider", hidden_size=96)
    code, _, err = run_cli(monkeypatch, capsys, "merge", "--base", str(wider), "--adapter", str(adapter),
                           "-o", str(tmp_path / "out3"))
    assert code == 1 and err.count("\n") == 1 and "features" in err
