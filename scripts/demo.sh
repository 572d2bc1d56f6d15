#!/usr/bin/env bash
# The whole pipeline on the shipped fixtures, on CPU, in about a minute:
# convert raw data -> validate -> token statistics -> inspect -> plan -> train -> eval -> chat.
# Everything is written under demo/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
out=demo
rm -rf "$out" && mkdir -p "$out"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "convert: ShareGPT, Alpaca and CLUE OCNLI raw files into MiniCPM's messages format"
minicpm-data convert fixtures/raw/sharegpt.json --from sharegpt -o "$out/sharegpt.json"
minicpm-data convert fixtures/raw/alpaca.json --from auto -o "$out/alpaca.jsonl"
minicpm-data convert fixtures/raw/ocnli.json --from ocnli -o "$out/ocnli" --dev-ratio 0.25 --seed 42

step "convert: a raw premise/hypothesis/label table into the task the run below learns, split train/dev"
minicpm-data convert fixtures/raw/nli.csv --from csv --assistant-col label \
    --template $'premise: {premise}\nhypothesis: {hypothesis}' \
    --system "Decide how the hypothesis relates to the premise: entailment, neutral or contradiction." \
    -o "$out/nli" --dev-ratio 0.2 --seed 42

step "validate: every output passes the schema and the turn rules"
minicpm-data validate "$out/sharegpt.json" "$out/alpaca.jsonl" "$out"/ocnli/*.json "$out"/nli/*.json

step "stats: what training will see at the length the run below trains at (its --model_max_length 256)"
minicpm-data stats "$out/nli/train.json" "$out/nli/dev.json" "$out/sharegpt.json" \
    --tokenizer fixtures/tokenizers/chatml --model-max-length 256 --plot "$out/lengths.png"

step "inspect: the trained tokens of one sample"
minicpm-data inspect "$out/nli/train.json" --tokenizer fixtures/tokenizers/chatml --index 0

step "a tiny random-init MiniCPM4-architecture model (model_type minicpm, OpenBMB's folder layout) to train"
python fixtures/build_tiny_models.py "$out/tiny-model" --kind minicpm4 --tokenizer-dir fixtures/tokenizers/chatml

step "plan: memory per GPU for this run"
minicpm-train plan --model_name_or_path "$out/tiny-model" --per_device_train_batch_size 8 \
    --model_max_length 256 --gpu_memory 8

step "run: full fine-tuning on CPU, on the converted task"
minicpm-train run --model_name_or_path "$out/tiny-model" --output_dir "$out/run" \
    --train_data_path "$out/nli/train.json" --eval_data_path "$out/nli/dev.json" \
    --learning_rate 5e-3 --per_device_train_batch_size 8 --model_max_length 256 \
    --max_steps 160 --eval_strategy steps --eval_steps 40 --save_steps 80 --logging_steps 20

step "eval: loss, perplexity and label accuracy on the dev set"
minicpm-train eval "$out/run" --data "$out/nli/dev.json"

step "chat: one-shot answer from the trained model"
minicpm-train chat "$out/run" --temperature 0 \
    --system "Decide how the hypothesis relates to the premise: entailment, neutral or contradiction." \
    --prompt "premise: the teacher is running by the river
hypothesis: the teacher is not running by the river"

step "done: where to look next"
cat <<EOF
Written under $out/:
  sharegpt.json alpaca.jsonl ocnli/ nli/   converted data (ocnli/ and nli/ split into train and dev)
  *.rejects.jsonl */rejects.jsonl          every record convert rejected, with its reason
  lengths.png                              the samples' token lengths (stats --plot)
  tiny-model/                              the tiny random-init model trained here
  run/                                     the trained model, run_config.json, data_summary.json,
                                           metrics.json, loss_curve.png, checkpoint-*/
  run/eval_dev.jsonl                       eval's predictions (metrics: run/eval_dev.metrics.json)
Next, on your own data and model:
  README.md                                one recipe per task: convert, check, train, QLoRA, GPUs, eval
  docs/                                    a page per topic; docs/troubleshooting.md for every error
  minicpm-train run --help                 the run's flags, with their defaults
EOF
