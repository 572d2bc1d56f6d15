"""Reading guide-style scripts: comments after backslashes, variables, substitutions, launchers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from minicpm_train.args import PRESET_DIR, ArgumentError
from minicpm_train.guide_script import read_guide_script, resolve_script

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GUIDE_SCRIPT = FIXTURES / "scripts" / "lora_finetune_ocnli.sh"


def test_guide_script_with_comments_after_backslashes():
    before = time.strftime("%Y%m%d%H%M%S")
    script = read_guide_script(GUIDE_SCRIPT, known_flags={"use_lora", "qlora"})
    assert script.launcher == "deepspeed" and script.program == "finetune.py"
    assert script.launcher_argv == ["--include", "localhost:1", "--master_port", "19888"]
    assert script.env == {"NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"}
    flags = script.argv
    output_dir = flags[flags.index("--output_dir") + 1]
    stamp = output_dir.split("/")[2]
    assert output_dir.startswith("output/OCNLILoRA/") and len(stamp) == 14 and before <= stamp
    assert "--use_lora" in flags and "--qlora" in flags
    assert flags[-2:] == ["--deepspeed", "configs/ds_config_zero2_offload.json"]  # the last line survived
    assert not any(token.startswith("#") for token in flags)
    assert any("comment after '\\' ends the command in bash" in n for n in script.notices)


def test_script_resolves_like_flags_and_extra_flags_override():
    script, run = resolve_script(GUIDE_SCRIPT, ["--max_steps", "5"])
    assert run.launch.include == "localhost:1" and run.launch.master_port == 19888
    assert run.env["NCCL_P2P_DISABLE"] == "1"
    assert run.training["max_steps"] == 5 and run.training["eval_strategy"] == "steps"
    assert run.options.use_lora and run.options.qlora and run.options.model_max_length == 128
    assert run.training["deepspeed"] == str(PRESET_DIR / "zero2_offload.json")
    assert any("'use_lora' has no leading '--'" in n for n in run.notices)


def test_script_variables_and_plain_python(tmp_path):
    script = tmp_path / "sft.sh"
    script.write_text('MODEL=/models/MiniCPM4-0.5B\nOUT="runs/$(date +%Y)"\n'
                      'python finetune.py --model_name_or_path $MODEL --output_dir ${OUT}/a '
                      '--train_data_path t.json --bf16\n')
    parsed = read_guide_script(script)
    assert parsed.launcher == "python" and parsed.launcher_argv == []
    assert parsed.argv[:4] == ["--model_name_or_path", "/models/MiniCPM4-0.5B", "--output_dir",
                               f"runs/{time.strftime('%Y')}/a"]
    empty = tmp_path / "empty.sh"
    empty.write_text("echo hi\n")
    with pytest.raises(ArgumentError, match="no training command"):
        read_guide_script(empty)


EDITED_SCRIPT = FIXTURES / "scripts" / "torchrun_finetune_edited.sh"


def _script(tmp_path, text: str) -> Path:
    path = tmp_path / "finetune.sh"
    path.write_text(text)
    return path


def test_commented_out_line_inside_the_command_keeps_the_flags_after_it(tmp_path):
    script = read_guide_script(EDITED_SCRIPT)
    flags = script.argv
    assert "--bf16" not in flags and "--use_lora" in flags
    assert flags[flags.index("--learning_rate") + 1] == "5e-5" and flags[flags.index("--max_steps") + 1] == "1000"
    assert flags[-2:] == ["--deepspeed", "configs/ds_config_zero2_offload.json"]
    assert any(n.startswith("line 12 '# --bf16 \\' inside a continued command: skipped, and the flags after "
                            "it read") and "bash would have ended the command there" in n for n in script.notices)
    # A blank line too; but a comment before a line that does not go on with the command ends it, as in bash.
    blank = read_guide_script(_script(tmp_path, "python finetune.py --a 1 \\\n\n    --b 2\n# done \\\necho --c\n"))
    assert blank.argv == ["--a", "1", "--b", "2"]
    assert any(n.startswith("line 2 (blank) inside a continued command") for n in blank.notices)
    ended = read_guide_script(_script(tmp_path, "python finetune.py --a 1 \\\n# the end\necho --b 2\n"))
    assert ended.argv == ["--a", "1"] and not any("skipped" in n for n in ended.notices)
    # A comment before the "\" takes it along in bash; read on, with a notice.
    before = read_guide_script(_script(tmp_path, "python finetune.py --a 1 # rate \\\n    --b 2\n"))
    assert before.argv == ["--a", "1", "--b", "2"]
    assert any("a comment before '\\' takes the '\\' with it" in n and "(line 1)" in n for n in before.notices)


def test_backticks_work_like_date_substitution_and_others_are_refused(tmp_path):
    script = read_guide_script(EDITED_SCRIPT)
    output_dir = script.argv[script.argv.index("--output_dir") + 1]
    assert output_dir == f"output/OCNLILoRA/{time.strftime('%Y%m%d')}/"
    for text, line, substitution in (
            ("python finetune.py \\\n  --output_dir out/$(whoami) \\\n  --bf16\n", 2, "$(whoami)"),
            ("HOST=`hostname`\npython finetune.py --output_dir out/$HOST\n", 1, "`hostname`"),
            ("export RANK=$(( 1 + 1 ))\npython finetune.py\n", 1, "$(( 1 + 1 ))")):
        with pytest.raises(ArgumentError) as error:
            read_guide_script(_script(tmp_path, text))
        message = str(error.value)
        assert f"line {line}: cannot run the command substitution {substitution}" in message
        assert "pass the flag on the command line" in message and "\n" not in message
    # Substitutions whose value no flag or export uses are never run.
    unused = read_guide_script(_script(tmp_path, 'cd "$(dirname "$0")"\nHOST=$(hostname)\npython finetune.py --a\n'))
    assert unused.argv == ["--a"]


def test_variables_the_script_does_not_set(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/data")
    monkeypatch.delenv("RUN_NAME", raising=False)
    monkeypatch.delenv("MODEL_DIR", raising=False)
    script = read_guide_script(_script(tmp_path, "MODEL=${MODEL_DIR:-/models/m}\npython finetune.py \\\n"
                                                 "  --train_data_path $DATA_ROOT/t.json \\\n"
                                                 "  --output_dir out/${RUN_NAME}/ --model_name_or_path $MODEL\n"))
    assert script.argv == ["--train_data_path", "/data/t.json", "--output_dir", "out//",
                           "--model_name_or_path", "/models/m"]
    assert "$DATA_ROOT (line 3) is not set by the script: taken from this environment" in script.notices
    assert any(n.startswith("$RUN_NAME (line 4) is set neither by the script nor in this environment: read as "
                            "empty") for n in script.notices)
    assert not any("MODEL_DIR" in n for n in script.notices)  # the script gave its default


def test_environment_prefix_of_the_command_is_exported(tmp_path):
    script = read_guide_script(EDITED_SCRIPT)
    assert script.launcher == "torchrun" and script.program == "finetune.py"
    assert script.env == {"NCCL_P2P_DISABLE": "1"}
    assert "CUDA_VISIBLE_DEVICES=0,1 read as --include localhost:0,1" in script.notices
    prefixed = read_guide_script(_script(tmp_path, "A=1 deepspeed --include localhost:1 finetune.py --bf16\n"
                                                   "export B=2 C\nC=3\npython eval.py\n"))
    assert prefixed.env == {"A": "1", "B": "2"} and prefixed.argv == ["--bf16"]
    assert "line 4: a second training command (python ...) is not run; only the first is read" in prefixed.notices


def test_launcher_flags_become_launch_options_never_training_flags(tmp_path):
    _, run = resolve_script(EDITED_SCRIPT, ["--train_data_path", "t.json"])
    launch = run.launch
    assert (launch.num_gpus, launch.master_port, launch.include) == (2, 29600, "localhost:0,1")
    assert any(n == "torchrun's own --standalone: no meaning here (minicpm-train starts the processes itself); "
                    "ignored" for n in run.notices)
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text("distributed_type: MULTI_GPU\ngpu_ids: 0,1,2\nnum_processes: 3\n"
                                 "mixed_precision: bf16\n")
    script = read_guide_script(_script(tmp_path, f"accelerate launch --config_file {accelerate_config} "
                                                 "--num_processes 2 --main_process_port 29700 --mixed_precision "
                                                 "bf16 finetune.py --bf16\n"))
    assert script.launcher == "accelerate" and script.argv == ["--bf16"]
    assert script.launch_flags == ["--include", "localhost:0,1,2", "--num_gpus", "2", "--master_port", "29700"]
    assert any("read gpu_ids: 0,1,2, num_processes: 3; its other settings are not used" in n for n in script.notices)
    assert "accelerate's own --mixed_precision bf16: no meaning here" in " ".join(script.notices)
    module = read_guide_script(_script(tmp_path, "python -m torch.distributed.run --nproc-per-node=4 --nnodes 1:2 "
                                                 "finetune.py --bf16\n"))
    assert module.launcher == "torchrun" and module.launch_flags == ["--num_gpus", "4"]
    assert any(n.startswith("torchrun's own --nnodes 1:2: no meaning here") for n in module.notices)
    deepspeed = read_guide_script(_script(tmp_path, "CUDA_VISIBLE_DEVICES=3 deepspeed -i localhost:1 --no_local_rank "
                                                    "finetune.py --bf16\n"))
    assert deepspeed.launch_flags == ["--include", "localhost:1"] and deepspeed.env == {}
    assert any(n.startswith("deepspeed's own --no_local_rank: no meaning here") for n in deepspeed.notices)
    assert any(n.startswith("CUDA_VISIBLE_DEVICES=3 ignored: the launcher's --include") for n in deepspeed.notices)
