"""SFT then DPO on converted real preference data, on folders laid out like OpenBMB's downloads, judged on
held-out pairs by ``minicpm-train eval`` against a reference that is not the model itself.

The layouts: a MiniCPM-2B-like folder (OpenBMB's ``modeling_minicpm.py`` and auto_map from ../shared, the real
MiniCPM-2B SentencePiece tokenizer, the ``<用户>``/``<AI>`` chat layout) and a MiniCPM4-like folder (the real
MiniCPM4 tokenizer, ChatML); both random-init, at half the width of the session's tiny models (the real
vocabularies' embeddings and heads take most of the time).

The data: LLaMA-Factory's dpo_zh_demo / dpo_en_demo records in fixtures/realdata (85 pairs, 73 of them
Chinese; PROVENANCE.tsv), converted by ``minicpm-data convert``. A tiny random-init model cannot learn which
Chinese answer is better, so the test keeps the pairs where a preference is learnable in a few steps: the
chosen answer is the shorter one in this layout's tokens (and the longer side fits MAX_TOKENS), 32-33 real
pairs. ``minicpm-data split --dev-ratio 0.7`` holds out 22-23 of them. Then, through the training CLI's entry
points: SFT on the chosen sides of the other 10, full DPO from the SFT model, and ``eval`` of the SFT model
and of the DPO model on the held-out pairs, both against the untrained base folder (``--ref_model``).

The start is a measurement, not 0 by construction: SFT raised both answers' log-probabilities over the base,
the longer (rejected) ones most, so the reward accuracy starts low (0-23% over seeds and layouts) and the
margin below 0. After DPO both must end higher, the accuracy above chance. The numbers per seed and layout,
and the negative control run by hand (chosen and rejected swapped in the train split: the margin falls
instead), are in docs/preference-training.md#eval-on-pairs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from train_helpers import run_cli, run_in_process

REALDATA = Path(__file__).resolve().parents[1] / "fixtures" / "realdata"
SOURCES = ["dpo_en_demo.head.jsonl", "dpo_zh_demo.sample.jsonl", "dpo_zh_demo.short.jsonl", "dpo_en_demo.short.jsonl"]
MAX_TOKENS = 384  # the longer side of a kept pair, in tokens (a few steps on CPU)
DEV_RATIO = 0.7
SFT = {"max_steps": 2, "learning_rate": 1e-3}
DPO = {"max_steps": 4, "learning_rate": 2e-3}
BATCH = 4
# Half the width of the session's tiny models (tests/train_helpers.py); OpenBMB's keys and layout otherwise.
NARROW = {"minicpm2": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2},
          "minicpm4": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}}


@pytest.fixture(scope="module")
def narrow_models(shared_dir, tmp_path_factory):
    """Build on first use: {layout: folder} laid out as OpenBMB's downloads, at half the tiny models' width."""
    import build_tiny_models

    built = {}

    def get(layout: str) -> Path:
        if layout not in built:
            built[layout] = build_tiny_models.build_tiny_model(layout, tmp_path_factory.mktemp(layout),
                                                               config_overrides=NARROW[layout], shared_dir=shared_dir)
        return built[layout]

    return get


def data_cli(capsys, *argv) -> dict:
    """``minicpm-data ARGV --json`` in this process; its printed summary."""
    from minicpm_data.cli import main

    capsys.readouterr()
    saved = sys.argv
    sys.argv = ["minicpm-data", *map(str, argv), "--json"]
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def length_learnable(pairs_file: Path, tokenizer_dir: Path, out: Path) -> int:
    """Write the records of ``pairs_file`` whose chosen answer has fewer trained tokens than the rejected one
    (``tokenizer_dir``'s tokenizer and chat layout) and whose longer side fits MAX_TOKENS; return how many."""
    from minicpm_data.io import read_examples
    from minicpm_data.render import render_pairs
    from minicpm_data.tokenizer import load_tokenizer

    def trained(sample) -> int:
        return sum(label != -100 for label in sample.labels)

    pairs = list(read_examples(pairs_file, "pairs"))
    rendered = render_pairs((pair for _, pair in pairs), load_tokenizer(str(tokenizer_dir)))
    records = pairs_file.read_text(encoding="utf-8").splitlines()
    kept = [records[index] for (index, _), pair in zip(pairs, rendered)
            if trained(pair.chosen) < trained(pair.rejected)
            and max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) <= MAX_TOKENS]
    out.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return len(kept)


def sft_then_dpo(base: Path, work: Path, monkeypatch, capsys, *, seed: int = 0, swap: bool = False) -> dict:
    """Convert, select, split, SFT, DPO and evaluate (module docstring); returns the split sizes and both
    evaluations. ``swap``: DPO on the train split with chosen and rejected exchanged (the negative control)."""
    converted = data_cli(capsys, "convert", *(REALDATA / name for name in SOURCES), "-o", work / "pairs.jsonl")
    assert (converted["kind"], converted["written"], converted["rejected"]) == ("pairs", 85, 0), converted
    kept = length_learnable(work / "pairs.jsonl", base, work / "learnable.jsonl")
    split = data_cli(capsys, "split", work / "learnable.jsonl", "-o", work / "data", "--dev-ratio", DEV_RATIO,
                     "--seed", seed)
    n_train, n_dev = split["train"]["records"], split["dev"]["records"]
    assert n_train + n_dev == kept
    train = [json.loads(line) for line in (work / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    sft_data, dpo_data = work / "sft.json", work / "dpo.json"
    sft_data.write_text(json.dumps([{"messages": [*pair["messages"], pair["chosen"]]} for pair in train],
                                   ensure_ascii=False), encoding="utf-8")
    if swap:
        train = [{**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]} for pair in train]
    dpo_data.write_text(json.dumps(train, ensure_ascii=False), encoding="utf-8")

    common = ["--data_cache_dir", str(work / "cache"), "--model_max_length", str(MAX_TOKENS), "--report_to", "none",
              "--save_strategy", "no", "--warmup_steps", "0", "--logging_steps", "10", "--seed", str(seed),
              "--per_device_train_batch_size", str(BATCH)]
    sft, dpo = work / "sft", work / "dpo"
    run_in_process(["--model_name_or_path", str(base), "--output_dir", str(sft), "--train_data_path", str(sft_data),
                    "--max_steps", str(SFT["max_steps"]), "--learning_rate", str(SFT["learning_rate"]), *common])
    run_in_process(["--model_name_or_path", str(sft), "--output_dir", str(dpo), "--train_data_path", str(dpo_data),
                    "--stage", "dpo", "--max_steps", str(DPO["max_steps"]),
                    "--learning_rate", str(DPO["learning_rate"]), *common])

    def held_out(model: Path) -> dict:
        capsys.readouterr()  # the runs' own printed logs
        code, out, err = run_cli(monkeypatch, capsys, "eval", str(model), "--data", str(work / "data" / "dev.jsonl"),
                                 "--ref_model", str(base), "--json", "--output", str(work / f"eval_{model.name}.jsonl"))
        assert code == 0, err
        return json.loads(out)

    return {"kept": kept, "train": n_train, "dev": n_dev, "before": held_out(sft), "after": held_out(dpo)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["minicpm2", "minicpm4"])
def test_sft_then_dpo_raises_held_out_preference(layout, narrow_models, tmp_path, monkeypatch, capsys):
    base = narrow_models(layout)
    if layout == "minicpm2":  # laid out as OpenBMB's download: their modelling code and auto_map beside the weights
        assert (base / "modeling_minicpm.py").is_file() and "auto_map" in json.loads((base / "config.json").read_text())
    result = sft_then_dpo(base, tmp_path, monkeypatch, capsys)
    before, after = result["before"], result["after"]
    assert result["dev"] >= 22 and result["train"] >= 10, result
    assert before["scored"] == after["scored"] == result["dev"], result
    # MiniCPM-2B's tokenizer merges "<AI>"'s ">" with some answers' first character: scored from the shared prefix.
    assert (before["merged_boundary"] > 0) == (layout == "minicpm2"), before
    assert before["reference"] == after["reference"] == str(base)
    # A measured start: SFT moved both answers above the base, the longer (rejected) one more.
    assert 0 < before["chosen_reward"] < before["rejected_reward"] and before["accuracy"] < 0.5, before
    assert after["accuracy"] > max(before["accuracy"], 0.5), result
    assert after["margin"] > before["margin"], result
