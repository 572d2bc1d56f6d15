"""SFT then DPO on converted real preference data, on a folder laid out like OpenBMB's MiniCPM4 download (the
built-in MiniCPM class, the real tokenizer from ../shared), judged on held-out pairs by `minicpm-train eval`.

The data: LLaMA-Factory's dpo_en_demo / dpo_zh_demo records in fixtures/realdata (12 pairs), converted by
`minicpm-data convert` and split 9 / 3. SFT on the chosen sides of the 9, then full DPO from that model (its
reference log-probabilities computed once). On the 3 held-out pairs, against the SFT model as the reference:
the reward accuracy starts at 0 (the model is its reference: every reward is 0) and must end above it, and the
mean reward margin, which starts at 0 too, must end above 0 (it can end below: the model may move towards the
rejected answers). See docs/preference-training.md#eval-on-pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_helpers import run_cli, run_in_process

REALDATA = Path(__file__).resolve().parents[1] / "fixtures" / "realdata"


@pytest.mark.slow
def test_sft_then_dpo_raises_held_out_preference(shared_dir, tiny_minicpm4, tmp_path, monkeypatch, capsys):
    from minicpm_data.convert import convert_and_split

    data = tmp_path / "pairs"
    summary = convert_and_split([REALDATA / "dpo_en_demo.head.jsonl", REALDATA / "dpo_zh_demo.sample.jsonl"], data,
                                dev_ratio=0.25, seed=0)
    assert summary.kind == "pairs"
    train = json.loads((data / "train.json").read_text())
    assert (len(train), len(json.loads((data / "dev.json").read_text()))) == (9, 3)
    sft_data = tmp_path / "sft.json"
    sft_data.write_text(json.dumps([{"messages": [*pair["messages"], pair["chosen"]]} for pair in train],
                                   ensure_ascii=False))
    common = ["--data_cache_dir", str(tmp_path / "cache"), "--model_max_length", "1024", "--report_to", "none",
              "--save_strategy", "no", "--warmup_steps", "0", "--logging_steps", "5", "--seed", "0"]
    sft = tmp_path / "sft"
    run_in_process(["--model_name_or_path", str(tiny_minicpm4), "--output_dir", str(sft), "--train_data_path",
                    str(sft_data), "--max_steps", "3", "--learning_rate", "1e-3", "--per_device_train_batch_size", "4",
                    *common])
    dpo = tmp_path / "dpo"
    run_in_process(["--model_name_or_path", str(sft), "--output_dir", str(dpo), "--train_data_path",
                    str(data / "train.json"), "--stage", "dpo", "--max_steps", "15", "--learning_rate", "2e-4",
                    "--per_device_train_batch_size", "3", *common])

    def held_out(model: Path, *flags: str) -> dict:
        capsys.readouterr()  # the runs' own printed logs
        code, out, err = run_cli(monkeypatch, capsys, "eval", str(model), "--data", str(data / "dev.json"), "--json",
                                 "--output", str(tmp_path / f"eval_{model.name}.jsonl"), *flags)
        assert code == 0, err
        return json.loads(out)

    start = held_out(sft, "--ref_model", str(sft))
    assert (start["accuracy"], start["margin"], start["scored"]) == (0.0, 0.0, 3)
    end = held_out(dpo)  # the reference: the model the run started from (its run_config.json), the SFT model
    assert end["reference"] == str(sft)
    assert end["accuracy"] > start["accuracy"], end
    assert end["margin"] > 0, end
