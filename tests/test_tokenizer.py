"""load_tokenizer: local folders offline (custom auto_map code never run), hub ids fail in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minicpm_data.errors import TokenizerError
from minicpm_data.tokenizer import load_tokenizer


@pytest.mark.parametrize("name, config_file", [("minicpm4", "config.json"), ("minicpm3", "tokenizer_config.json")])
def test_real_folders_with_custom_code_load_offline(shared_dir, monkeypatch, name, config_file):
    folder = shared_dir / "tokenizers" / name
    assert "auto_map" in json.loads((folder / config_file).read_text())  # the trap this guards against
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.is_fast and len(tokenizer) == 73448
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]) == [73440, 73441]
    assert tokenizer("你好")["input_ids"][0] == 1  # the tokenizer adds <s>


def test_no_custom_code_is_imported(shared_dir):
    """Loading must not try to import the absent tokenization_minicpm / modeling code."""
    code = ("import sys; from minicpm_data.tokenizer import load_tokenizer; "
            f"load_tokenizer({str(shared_dir / 'tokenizers' / 'minicpm3')!r}); "
            "print(sorted(m for m in sys.modules if 'transformers_modules' in m or m.endswith('_minicpm')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_fixture_tokenizers_load(fixtures_dir):
    chatml = load_tokenizer(str(fixtures_dir / "tokenizers" / "chatml"))
    minicpm2 = load_tokenizer(str(fixtures_dir / "tokenizers" / "minicpm2"))
    assert chatml.convert_tokens_to_ids(["<s>", "</s>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2, 3]
    assert minicpm2.convert_tokens_to_ids(["<s>", "</s>"]) == [1, 2]
    text = "Hello 你好 😀\n  spaced  "
    for tokenizer in (chatml, minicpm2):
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
        assert 900 < len(tokenizer) < 2000


def test_fixture_tokenizers_rebuild_identically(fixtures_dir, tmp_path):
    sys.path.insert(0, str(fixtures_dir))
    try:
        from build_tokenizers import build_all
    finally:
        sys.path.remove(str(fixtures_dir))
    for name, folder in build_all(tmp_path).items():
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            assert (folder / file).read_text() == (fixtures_dir / "tokenizers" / name / file).read_text(), file


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerError) as caught:
        load_tokenizer("openbmb/no-such-model-here")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("could not fetch openbmb/no-such-model-here from the hub")
    assert message.endswith("pass a local model folder with --tokenizer DIR")


def test_missing_folder_and_empty_folder(tmp_path, monkeypatch):
    from minicpm_data.model_files import ModelFolderError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    # a mistyped local path is no such folder, never a hub look-up, even when it reads like org/name
    for name in (str(tmp_path / "absent"), "MiniCPM4-8b", "models/MiniCPM4-8B"):
        with pytest.raises(ModelFolderError, match=f"^{name}: no such folder; check the path$"):
            load_tokenizer(name)
    with pytest.raises(ModelFolderError, match="no tokenizer vocabulary: none of tokenizer.json, tokenizer.model"):
        load_tokenizer(str(tmp_path))
