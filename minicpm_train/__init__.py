"""minicpm_train: train MiniCPM models on minicpm-data output (full, LoRA, QLoRA, DeepSpeed),
plan memory before a run, and merge, chat with and evaluate the result.

Heavy imports (torch, transformers, peft, bitsandbytes, deepspeed) happen inside functions.
"""

__version__ = "0.1.0"
