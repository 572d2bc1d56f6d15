"""The chunked loss (minicpm_train/loss.py): the model's own loss and gradients, without full logits.

Equality tests run over every tiny-model builder in MODEL_KINDS (tied and untied heads; MiniCPM3 and MiniCPM scale
the hidden states before lm_head), in float32: loss within 1e-6 relative, gradients within 1e-5.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from minicpm_train.args import ArgumentError, parse_run_args
from minicpm_train.loss import (CHUNK_SIZE, LossChoice, LossError, capture_head_input, causal_lm_loss,
                                choose_loss_impl, per_sample_losses, resolve_loss)
from train_helpers import TASK_TRAIN, dev_batch, run_in_process, task_argv

MODEL_KINDS = ["tiny_llama", "tiny_minicpm3", "tiny_minicpm2", "tiny_minicpm4"]  # fixtures (minicpm2/4: the built-in class)
SMALL_CHUNK = 8  # several chunks per batch in the tests (the dev batch trains 24 positions)


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    from minicpm_train.modeling import register_minicpm

    register_minicpm()  # model_type "minicpm" folders load the built-in class
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _chunked_loss(model, batch, **loss_kwargs):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with capture_head_input(model) as captured:
        outputs = model(**inputs)
    assert outputs.logits.shape[1] == 0  # the model built no logits
    return causal_lm_loss(captured.hidden, model.get_output_embeddings(), batch["labels"], chunk_size=SMALL_CHUNK,
                          **loss_kwargs)


def _trainable_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_loss_and_grads(model, batch, **loss_kwargs):
    reference = model(**batch, **loss_kwargs)
    reference.loss.backward()
    expected = _trainable_grads(model)
    loss = _chunked_loss(model, batch, **loss_kwargs)
    loss.backward()
    got = _trainable_grads(model)
    assert loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)
    assert got.keys() == expected.keys() and got
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def _packed_batch(model_dir, rows: int | None = 4):
    """The first ``rows`` packed rows of the fixture task (all of them for None)."""
    from minicpm_data.tokenizer import load_tokenizer, pad_token_id
    from minicpm_train.data import PackingCollator, load_supervised, pack

    tokenizer = load_tokenizer(str(model_dir))
    dataset, _ = load_supervised(TASK_TRAIN, tokenizer, max_length=256, cache_dir=model_dir / ".cache")
    packed = pack(dataset, 512)
    return PackingCollator(pad_token_id(tokenizer))([packed[i] for i in range(rows or len(packed))])


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("rows", ["padded", "packed", "padded, under gradient accumulation"])
def test_full_finetune_loss_and_every_gradient_equal_the_models_own(kind, rows, request):
    model_dir = request.getfixturevalue(kind)
    batch = _packed_batch(model_dir) if rows == "packed" else dev_batch(model_dir)
    # the Trainer's num_items_in_batch: the trained tokens of all the accumulated batches
    accumulated = {"num_items_in_batch": torch.tensor(1234)} if "accumulation" in rows else {}
    _assert_same_loss_and_grads(_load(model_dir), batch, **accumulated)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_lora_adapter_gradients_equal(kind, request):
    from peft import LoraConfig, get_peft_model

    from minicpm_train.model import lora_targets

    model_dir = request.getfixturevalue(kind)
    model = _load(model_dir)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                                             target_modules=lora_targets(model, model.config.model_type, None)))
    _assert_same_loss_and_grads(model, dev_batch(model_dir))


def test_qlora_on_a_4bit_base_equals(tiny_llama):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from minicpm_train.args import RunOptions
    from minicpm_train.model import add_lora, prepare_4bit_for_training

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=BitsAndBytesConfig(
                                                     load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_compute_dtype=torch.float32))
    model = prepare_4bit_for_training(model, device="cpu", gradient_checkpointing=False)
    model = add_lora(model, RunOptions(lora_dropout=0.0), "llama")
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # bitsandbytes leaves lm_head unquantised
    _assert_same_loss_and_grads(model, dev_batch(tiny_llama))


def test_no_logits_tensor_wider_than_a_chunk(tiny_llama):
    """Every [rows, vocab] tensor of forward and backward has at most a chunk of rows, or lm_head's weight's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = _load(tiny_llama)
    vocab, hidden_size = model.config.vocab_size, model.config.hidden_size
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = _packed_batch(tiny_llama, rows=None)
    widest = []

    class Widest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if (isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == vocab
                        and tensor.untyped_storage().data_ptr() not in weights):  # lm_head.weight.t() is no logits
                    widest.append(tensor.numel() // vocab)
            return out

    with Widest():
        _chunked_loss(model, batch).backward()
    trained = int((batch["labels"][:, 1:] != -100).sum())
    bound = max(SMALL_CHUNK, hidden_size)  # [hidden_size, vocab]: lm_head's weight gradient, as any trainer has
    assert trained > 4 * bound  # full logits would be far wider
    assert max(widest) <= bound


def test_per_sample_losses_equal_full_logits(tiny_minicpm3):
    model = _load(tiny_minicpm3).eval()
    batch = dev_batch(tiny_minicpm3)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
        with capture_head_input(model) as captured:
            model(**inputs)
        sums, counts = per_sample_losses(captured.hidden, model.get_output_embeddings(), batch["labels"],
                                         chunk_size=SMALL_CHUNK)
    targets = batch["labels"][:, 1:]
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(sums, token_losses.sum(dim=1), rtol=1e-6, atol=1e-5)
    assert counts.tolist() == (targets != -100).sum(dim=1).tolist()


def test_a_fused_kernel_gets_the_trained_positions(tiny_llama, monkeypatch):
    """The kernel path hands Liger's function the selected hidden states, lm_head's weight and the targets."""
    calls = []

    def fake_liger(hidden, weight, targets, bias=None, reduction="mean"):
        calls.append((hidden.shape, targets.shape, reduction))
        logits = hidden @ weight.t()
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = fake_liger
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    model = _load(tiny_llama)
    batch = dev_batch(tiny_llama)
    _assert_same_loss_and_grads(model, batch)  # reference grads
    loss = _chunked_loss(model, batch, kernel="liger_kernel")
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert calls == [(torch.Size([trained, model.config.hidden_size]), torch.Size([trained]), "sum")]
    assert loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)


@pytest.mark.parametrize(("requested", "device", "installed", "zero_stage", "half", "expected"), [
    ("auto", "cpu", {"liger_kernel", "cut_cross_entropy"}, 0, True, ("chunked", None)),
    ("chunked", "cuda", {"liger_kernel"}, 0, True, ("chunked", None)),
    ("auto", "cuda", set(), 0, True, ("chunked", None)),
    ("auto", "cuda", {"liger_kernel", "cut_cross_entropy"}, 0, True, ("fused", "liger_kernel")),
    ("auto", "cuda", {"cut_cross_entropy"}, 0, True, ("fused", "cut_cross_entropy")),
    ("auto", "cuda", {"liger_kernel", "cut_cross_entropy"}, 3, True, ("chunked", None)),  # partitioned head
    ("auto", "cuda", {"cut_cross_entropy"}, 0, False, ("chunked", None)),  # float32 weights
    ("fused", "cuda", {"liger_kernel"}, 0, False, ("fused", "liger_kernel")),
    ("full", "cuda", {"liger_kernel"}, 0, True, ("full", None)),
])
def test_choose_loss_impl(requested, device, installed, zero_stage, half, expected):
    choice = choose_loss_impl(requested, device_type=device, installed=installed, zero_stage=zero_stage,
                              half_precision=half)
    assert (choice.impl, choice.kernel) == expected
    assert choice.notice.startswith("loss: ") and (choice.kernel or choice.impl) in choice.notice


@pytest.mark.parametrize(("device", "installed", "zero_stage", "why"), [
    ("cpu", {"liger_kernel"}, 0, "fused kernels need a CUDA GPU"),
    ("cuda", set(), 0, "no usable fused kernel is installed"),
    ("cuda", {"liger_kernel"}, 3, "fused kernels cannot update a ZeRO-3 partitioned lm_head"),
])
def test_fused_without_a_usable_kernel_is_one_line_error(device, installed, zero_stage, why):
    with pytest.raises(LossError, match=why) as error:
        choose_loss_impl("fused", device_type=device, installed=installed, zero_stage=zero_stage)
    assert "\n" not in str(error.value)


def test_an_unsupported_head_falls_back_to_full_logits_or_refuses(tiny_llama):
    model = _load(tiny_llama)
    model.config.final_logit_softcapping = 30.0
    assert resolve_loss("auto", model, device_type="cpu") == LossChoice(
        "full", None, "loss: full logits (it soft-caps its logits after lm_head)")
    with pytest.raises(LossError, match="--loss_impl chunked: it soft-caps"):
        resolve_loss("chunked", model, device_type="cpu")
    model.config.final_logit_softcapping = None
    assert resolve_loss("auto", model, device_type="cpu").impl == "chunked"


def test_loss_impl_flag_is_checked_at_parse_time(tiny_llama, tmp_path):
    argv = ["--model_name_or_path", str(tiny_llama), "--train_data_path", str(TASK_TRAIN), "--output_dir",
            str(tmp_path)]
    assert parse_run_args(argv).options.loss_impl == "auto"
    assert parse_run_args(argv + ["--loss_impl", "full"]).options.loss_impl == "full"
    with pytest.raises(ArgumentError, match=r"^--loss_impl must be one of auto, chunked, fused, full, not 'fast'$"):
        parse_run_args(argv + ["--loss_impl", "fast"])


def _train_log(tmp_path, model_dir, cache, loss_impl, *extra):
    argv = task_argv(model_dir, tmp_path / loss_impl, cache, "--loss_impl", loss_impl, "--save_strategy", "no",
                     "--logging_steps", "1", *extra, steps=4)
    result = run_in_process(argv)
    return [{k: v for k, v in entry.items() if k in ("loss", "grad_norm", "eval_loss")}
            for entry in result.log_history if {"loss", "eval_loss"} & entry.keys()], result


def _assert_same_training(chunked, full):
    """Four optimizer steps logged alike: the first to 1e-5 (same loss, same normalisation under gradient
    accumulation); later entries to 1e-2, since Adam's early updates (about lr × the sign of each gradient
    element) turn float32 differences of summation order into visible drift (seen on the tiny MiniCPM4, whose
    weights are sharp: 2e-3 in the gradient norm by step 4). A wrong normalisation is off by far more."""
    assert len(chunked) == len(full) >= 5
    for step, (got, expected) in enumerate(zip(chunked, full)):
        assert got.keys() == expected.keys()
        for key in got:
            assert got[key] == pytest.approx(expected[key], rel=1e-5 if step == 0 else 1e-2), (step, key)


TRAINER_CASES = [(kind, ()) for kind in MODEL_KINDS] + [
    ("tiny_llama", ("--use_lora", "--packing", "--activation_checkpointing")),
    ("tiny_minicpm3", ("--use_lora", "--bf16")),
]


@pytest.mark.parametrize(("kind", "extra"), TRAINER_CASES)
def test_trainer_with_gradient_accumulation_trains_as_with_full_logits(kind, extra, request, tmp_path, data_cache):
    model_dir = request.getfixturevalue(kind)
    extra = ("--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4", *extra)
    chunked, result = _train_log(tmp_path, model_dir, data_cache, "chunked", *extra)
    full, _ = _train_log(tmp_path, model_dir, data_cache, "full", *extra)
    _assert_same_training(chunked, full)
    assert f"loss: chunked, {CHUNK_SIZE:,} positions at a time through lm_head" in (
        result.output_dir / "run_config.json").read_text()


def test_deepspeed_zero2_trains_as_with_full_logits(tmp_path, tiny_llama, data_cache):
    extra = ("--deepspeed", "zero2", "--gradient_accumulation_steps", "2")
    chunked, _ = _train_log(tmp_path, tiny_llama, data_cache, "chunked", *extra, "--master_port", "29651")
    full, _ = _train_log(tmp_path, tiny_llama, data_cache, "full", *extra, "--master_port", "29652")
    _assert_same_training(chunked, full)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny_minicpm2", "tiny_minicpm4"])
def test_deepspeed_zero3_partitioned_head_trains_as_with_full_logits(kind, request, tmp_path, data_cache):
    """ZeRO-3 partitions lm_head, tied (MiniCPM-2B) or not (MiniCPM4); each run in a fresh process, as ZeRO-3
    needs. (Two of MODEL_KINDS: the head's path does not depend on the rest of the model, and each case costs
    two launcher runs.)"""
    import json
    import subprocess
    from pathlib import Path

    cli = str(Path(sys.executable).with_name("minicpm-train"))
    logs = {}
    for loss_impl, port in (("chunked", "29653"), ("full", "29654")):
        argv = task_argv(request.getfixturevalue(kind), tmp_path / loss_impl, data_cache, "--loss_impl", loss_impl,
                         "--deepspeed", "zero3", "--gradient_accumulation_steps", "2", "--save_strategy", "no",
                         "--logging_steps", "1", "--master_port", port, steps=4)
        done = subprocess.run([cli, "run", *argv], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        history = json.loads((tmp_path / loss_impl / "metrics.json").read_text())["log_history"]
        logs[loss_impl] = [{k: v for k, v in entry.items() if k in ("loss", "grad_norm", "eval_loss")}
                           for entry in history if {"loss", "eval_loss"} & entry.keys()]
    _assert_same_training(logs["chunked"], logs["full"])
