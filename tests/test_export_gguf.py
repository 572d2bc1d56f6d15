"""minicpm-train export: GGUF files that llama.cpp itself (llama-cpp-python) runs as transformers runs the model.

Every kind the toolkit trains is exported and loaded by llama.cpp on CPU: a MiniCPM5-style Llama (GQA), MiniCPM-2B
and MiniCPM4 folders laid out as OpenBMB's downloads (muP scalings, tied / untied head, GQA, LongRoPE with its long
factors and attention scaling), and a MiniCPM3 (latent attention, LongRoPE factors). The last-position logits of a
Chinese + English prompt are compared with transformers' (relative to the largest logit), 16 greedy tokens too; a
GGUF LoRA on the base GGUF gives the merged model's logits; the GGUF's tokenizer encodes strings as the training
tokenizer does; llama-cpp-python's chat formatting from the GGUF's template gives render()'s prompt ids.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from train_helpers import build_tiny_models, make_adapter, run_cli, run_in_process, task_argv

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (pip install -e '.[export]' builds it)", allow_module_level=True)

PROMPT = "MiniCPM 是面壁智能的端侧大模型。The quick brown fox jumps over the lazy dog, 然后回答：天空为什么是蓝色的？"
# max |llama.cpp - transformers| / max |transformers| at the last position, per outtype (measured on these
# random-weight models, whose logits are far from uniform: f32 <= 2.3e-6, f16 <= 3.1e-3, bf16 3.2e-3, q8_0 <= 4e-2).
TOLERANCE = {"f32": 1e-3, "f16": 1e-2, "bf16": 5e-2, "q8_0": 0.1}
GREEDY_TOKENS = 16
MINICPM3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 1.0,
                     "original_max_position_embeddings": 2048,
                     "short_factor": [1.0 + 0.5 * i for i in range(16)], "long_factor": [1.0 + 2.0 * i for i in range(16)]}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """The folders the numbers are checked on, with the small fixture tokenizers (a 1,000-token vocabulary keeps
    each export under a second): MiniCPM-2B and MiniCPM4 laid out as OpenBMB's (hidden 128, 4 heads of 32;
    MiniCPM4 with GQA 4/2 and LongRoPE past its original context), a MiniCPM5-style Llama and a MiniCPM3 wider
    than the shared fixtures (hidden 256, heads of 32 and of 64 + 32), so every row is several q8_0 blocks.
    The real tokenizers are checked on the shared fixtures below."""
    wide = dict(hidden_size=256, intermediate_size=512, initializer_range=0.08)
    build = build_tiny_models.build_tiny_model
    return {
        "llama": build("llama-chatml", tmp_path_factory.mktemp("llama"),
                       config_overrides={**wide, "num_attention_heads": 8, "num_key_value_heads": 4}),
        "minicpm2": build("minicpm2", tmp_path_factory.mktemp("minicpm2"), shared_dir=None),
        "minicpm4": build("minicpm4", tmp_path_factory.mktemp("minicpm4"), shared_dir=None),
        # MiniCPM4-8B's own case: max_position_embeddings = original context, so the short factors apply (256:
        # llama.cpp rounds the context size up to a multiple of 256, and picks the factors by that size)
        "minicpm4-short": build("minicpm4", tmp_path_factory.mktemp("minicpm4-short"), shared_dir=None,
                                config_overrides={"max_position_embeddings": 256, "rope_scaling": {
                                    "rope_type": "longrope", "original_max_position_embeddings": 256,
                                    "long_factor": build_tiny_models.MINICPM4_LONG_FACTOR,
                                    "short_factor": build_tiny_models.MINICPM4_SHORT_FACTOR}}),
        "minicpm3": build("minicpm3", tmp_path_factory.mktemp("minicpm3"), config_overrides={
            **wide, "num_attention_heads": 8, "num_key_value_heads": 8, "scale_emb": 12, "dim_model_base": 256,
            "rope_parameters": MINICPM3_LONGROPE}),
    }


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """export(kind, outtype) -> the GGUF path, exported once per module."""
    from minicpm_train.gguf_export import export_model

    out, done = tmp_path_factory.mktemp("gguf"), {}

    def export(kind: str, outtype: str):
        if (kind, outtype) not in done:
            done[kind, outtype] = export_model(models[kind], out / f"{kind}-{outtype}.gguf", outtype=outtype).path
        return done[kind, outtype]

    return export


def hf_reference(folder, ids: list[int]):
    """transformers' last-position logits and greedy continuation (no early stop) for ``ids``."""
    import torch

    from minicpm_train.model import from_pretrained, read_model_config

    read_model_config(folder, trust_remote_code=False)  # registers the built-in MiniCPM class
    model = from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.tensor([ids])
    with torch.no_grad():
        logits = model(prompt).logits[0, -1].numpy()
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, eos_token_id=None,
                                max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, pad_token_id=0)
    return logits, greedy[0, len(ids):].tolist()


def llama_run(path, ids: list[int], *, lora=None, f32_cache: bool = True):
    """llama.cpp's last-position logits for ``ids``, and its greedy continuation (one token at a time, KV cache)."""
    import llama_cpp

    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=128, n_batch=128,
                          n_threads=2, logits_all=True, verbose=False, **cache)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[llm.n_tokens - 1])
        greedy = []
        for _ in range(GREEDY_TOKENS):
            greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(greedy[-1:])
        return logits, greedy
    finally:
        llm.close()


@cache
def tokenizer_of(folder):
    """The training tokenizer of a folder (loaded once: converting MiniCPM-2B's tokenizer.model takes seconds)."""
    from minicpm_data.tokenizer import load_tokenizer

    return load_tokenizer(str(folder))


def relative_error(got, expected) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def reference(models):
    done = {}

    def of(kind: str):
        if kind not in done:
            ids = tokenizer_of(models[kind])(PROMPT)["input_ids"]
            done[kind] = (ids, *hf_reference(models[kind], ids))
        return done[kind]

    return of


@pytest.mark.parametrize("kind, outtype", [
    ("llama", "f32"), ("minicpm2", "f32"), ("minicpm4", "f32"), ("minicpm4-short", "f32"), ("minicpm3", "f32"),
    ("llama", "f16"), ("minicpm4", "f16"), ("minicpm3", "bf16"), ("minicpm2", "q8_0"), ("llama", "q8_0"),
])
def test_llama_cpp_runs_the_export_as_transformers_runs_the_model(kind, outtype, exported, reference):
    ids, expected, expected_greedy = reference(kind)
    assert np.abs(expected).max() > 3 and np.ptp(expected) > 3  # far from uniform: the comparison means something
    logits, greedy = llama_run(exported(kind, outtype), ids)
    assert relative_error(logits, expected) < TOLERANCE[outtype]
    if outtype in ("f32", "f16"):
        assert greedy == expected_greedy


@pytest.mark.parametrize("drop", ["longrope attention scaling", "logit scale", "Q/K row order"])
def test_the_comparison_fails_without_each_detail_the_exporter_writes(drop, models, reference, tmp_path, monkeypatch):
    """Exported without one MiniCPM4 detail, llama.cpp's logits are far off: the check above tests these details."""
    import gguf

    from minicpm_train.gguf_export import architectures, export_model

    if drop == "Q/K row order":
        monkeypatch.setattr(architectures.Architecture, "row_permutation", lambda self, name: None)
    else:
        method = {"longrope attention scaling": "add_rope_scaling_attn_factors", "logit scale": "add_logit_scale"}
        monkeypatch.setattr(gguf.GGUFWriter, method[drop], lambda self, value: None)
    ids, expected, _ = reference("minicpm4")
    logits, _ = llama_run(export_model(models["minicpm4"], tmp_path / "x.gguf", outtype="f32").path, ids)
    assert relative_error(logits, expected) > 10 * TOLERANCE["f32"]


# --- tokenizer and chat template ------------------------------------------------------------------------------

STRINGS = [
    "你好，世界！今天天气怎么样？", "MiniCPM 是一个端侧大模型，支持中文和 English。", "The quick brown fox jumps over the lazy dog",
    "emoji 🚀😶‍🌫️ 👍🏽 和 🦙🦙", "数字 12345 与 3 个苹果", "mixed中英文text混合", "tabs\tand\nnew lines\n\n二",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n好的<|im_end|>\n", "<s>text</s>", "<用户>你好<AI>好的",
]


@pytest.fixture(scope="module")
def tokenizer_gguf(models, exported, tmp_path_factory, shared_dir_or_none, tiny_minicpm2, tiny_minicpm4):
    """(tokenizer folder, GGUF) for each tokenizer: the fixture ChatML and MiniCPM-2 ones, and with ../shared the
    real MiniCPM-2B (SentencePiece ``tokenizer.model``), MiniCPM4 and MiniCPM3 (``tokenizer.json``) ones."""
    from minicpm_train.gguf_export import export_model

    paths = {"chatml-fixture": (models["llama"], exported("llama", "q8_0")),
             "minicpm2-fixture": (models["minicpm2"], exported("minicpm2", "q8_0"))}
    if shared_dir_or_none is not None:
        out = tmp_path_factory.mktemp("tokenizers")
        minicpm3 = build_tiny_models.build_tiny_model("minicpm3", out / "minicpm3", config_overrides={
            "scale_emb": 12, "dim_model_base": 256}, tokenizer_dir=shared_dir_or_none / "tokenizers" / "minicpm3")
        for name, folder in (("minicpm2b", tiny_minicpm2), ("minicpm4", tiny_minicpm4), ("minicpm3", minicpm3)):
            paths[name] = (folder, export_model(folder, out / f"{name}.gguf", outtype="f16").path)
    return paths


@pytest.fixture(scope="module")
def shared_dir_or_none():
    shared = Path(__file__).resolve().parents[2] / "shared"
    return shared if (shared / "tokenizers").is_dir() else None


TOKENIZERS = ["chatml-fixture", "minicpm2-fixture", "minicpm2b", "minicpm4", "minicpm3"]


def _vocab_only(path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_gguf_tokenizer_encodes_as_the_training_tokenizer(name, tokenizer_gguf):
    if name not in tokenizer_gguf:
        pytest.skip("../shared is not present (the real MiniCPM tokenizers)")
    folder, path = tokenizer_gguf[name]
    tokenizer, llm = tokenizer_of(folder), _vocab_only(path)
    try:
        for text in STRINGS:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
    finally:
        llm.close()


def test_known_differences_of_llama_cpps_sentencepiece_tokenizer(tokenizer_gguf):
    """What llama.cpp cannot reproduce (docs/export.md): the HF tokenizer puts no ``▁`` before a text piece that
    starts with a space (at the start, or after a token split off the text), llama.cpp always adds one. MiniCPM-2B
    splits off CJK punctuation and newlines (and ``.`` ``!`` ``?`` are exported as plain pieces, since in English
    a space follows them); MiniCPM3's tokenizer.json prepends like llama.cpp."""
    if "minicpm2b" not in tokenizer_gguf:
        pytest.skip("../shared is not present (the real MiniCPM tokenizers)")

    cases = {"minicpm2b": ({"你好。 世界": True, " leading space": True, "Fine. Thanks! Bye? Now": False}),
             "minicpm4": {" leading space": True, "你好。 世界": False}, "minicpm3": {" leading space": False}}
    for name, texts in cases.items():
        folder, path = tokenizer_gguf[name]
        tokenizer, llm = tokenizer_of(folder), _vocab_only(path)
        try:
            for text, differs in texts.items():
                ours, theirs = llm.tokenize(text.encode(), add_bos=True, special=True), tokenizer(text)["input_ids"]
                assert (ours != theirs) == differs, (name, text, ours, theirs)
        finally:
            llm.close()


CONVERSATION = [{"role": "system", "content": "你是一个乐于助人的助手"},
                {"role": "user", "content": "你好，请介绍一下你自己"},
                {"role": "assistant", "content": "我是 MiniCPM，一个端侧大模型"},
                {"role": "user", "content": "What can you do for me"}]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_llama_cpp_chat_formatting_equals_render(name, tokenizer_gguf):
    """llama-cpp-python formats a chat with the GGUF's template and tokenizes it; the ids are render_prompt's."""
    import llama_cpp

    from minicpm_data.conversation import Conversation, Message
    from minicpm_data.render import render_prompt

    if name not in tokenizer_gguf:
        pytest.skip("../shared is not present (the real MiniCPM tokenizers)")
    folder, path = tokenizer_gguf[name]
    expected = render_prompt(Conversation([Message(m["role"], m["content"]) for m in CONVERSATION]),
                             tokenizer_of(folder))

    class Prompt(Exception):
        pass

    def capture(prompt, **_):
        raise Prompt(prompt)

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    llm.create_completion = capture
    try:
        with pytest.raises(Prompt) as formatted:
            llm.create_chat_completion(messages=CONVERSATION, max_tokens=1)
    finally:
        llm.close()
    assert formatted.value.args[0] == expected


def test_modelfile_beside_the_gguf(exported, models):
    from minicpm_data.render import IM_END

    text = exported("minicpm4", "q8_0").with_suffix(".Modelfile").read_text()
    assert text.startswith("FROM ./minicpm4-q8_0.gguf\n")
    assert '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""' in text
    assert f'PARAMETER stop "{IM_END}"' in text
    llama = exported("llama", "f32").with_suffix(".Modelfile").read_text()
    assert 'TEMPLATE """<s>{{- range .Messages }}' in llama  # MiniCPM5: the template, not the tokenizer, writes <s>
    assert 'PARAMETER stop "</s>"' in llama
    minicpm2 = exported("minicpm2", "q8_0").with_suffix(".Modelfile").read_text()
    assert '{{- if eq .Role "user" }}<用户>{{ .Content }}<AI>' in minicpm2 and 'PARAMETER stop "</s>"' in minicpm2


# --- LoRA ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, targets", [
    ("minicpm4", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]),  # GQA: Q and K rows permuted by head count
    ("llama", ["q_proj", "k_proj", "down_proj"]),
    ("minicpm3", ["o_proj", "up_proj"]),
])
def test_gguf_lora_on_the_base_gguf_gives_the_merged_models_logits(kind, targets, models, exported, reference,
                                                                  tmp_path):
    from minicpm_train.gguf_export import export_lora
    from minicpm_train.merge import merge_adapter

    ids, base_logits, _ = reference(kind)
    adapter = make_adapter(models[kind], tmp_path / "adapter", targets)
    merged = merge_adapter(models[kind], adapter, tmp_path / "merged").output_dir
    expected, _ = hf_reference(merged, ids)
    base_gguf = exported(kind, "f32")
    lora = export_lora(adapter, base_gguf, tmp_path / "adapter.gguf", outtype="f32").path
    logits, _ = llama_run(base_gguf, ids, lora=lora)
    assert relative_error(logits, expected) < TOLERANCE["f32"]
    assert relative_error(base_logits, expected) > 100 * TOLERANCE["f32"]  # the adapter matters
    # the base folder instead of its GGUF lays the adapter out identically
    from_folder = export_lora(adapter, models[kind], tmp_path / "from-folder.gguf", outtype="f32").path
    assert from_folder.read_bytes() == lora.read_bytes()


def test_run_merge_export_on_an_openbmb_layout_folder(tiny_minicpm2, data_cache, tmp_path, monkeypatch, capsys):
    """The guide's flow on a MiniCPM-2B folder as OpenBMB ships it (auto_map, their .py files, the real
    tokenizer with ../shared): run (LoRA), merge, export with no step between, and llama.cpp runs the file as
    transformers runs the merged folder. The LoRA run exports against the base named on the command line, not the
    one the run recorded."""
    run = tmp_path / "run"
    run_in_process(task_argv(tiny_minicpm2, run, data_cache, "--use_lora", "--max_steps", "1", "--eval_strategy", "no",
                             "--save_strategy", "no"))
    base = shutil.copytree(tiny_minicpm2, tmp_path / "elsewhere" / "MiniCPM-2B-sft-bf16")  # the model moved
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gpu-box/models/2b"}))
    code, _, err = run_cli(monkeypatch, capsys, "merge", "--base", str(base), "--adapter", str(run), "-o",
                           str(tmp_path / "merged"))
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "export", str(tmp_path / "merged"), "--format", "gguf", "-o",
                             str(tmp_path / "merged.gguf"), "--outtype", "f32")
    assert code == 0, err
    assert "merged.gguf (minicpm, f32" in " ".join(out.split())
    ids = tokenizer_of(run)(PROMPT)["input_ids"]
    expected, expected_greedy = hf_reference(tmp_path / "merged", ids)
    logits, greedy = llama_run(tmp_path / "merged.gguf", ids)
    assert relative_error(logits, expected) < TOLERANCE["f32"] and greedy == expected_greedy

    code, out, err = run_cli(monkeypatch, capsys, "export", str(run), "--lora", "--base", str(base),
                             "-o", str(tmp_path / "lora.gguf"))
    assert code == 0, err
    assert "/gpu-box/models/2b" in err and "(minicpm, f16" in " ".join(out.split())  # named, and not used
    modelfile = (tmp_path / "lora.Modelfile").read_text()
    assert modelfile.startswith(f"FROM {base.resolve()}\nADAPTER ./lora.gguf\n")


def test_weights_as_openbmb_and_hf_ship_them_export_the_same(models, exported, tmp_path):
    """pytorch_model.bin (MiniCPM-2B-sft-bf16's download) and sharded safetensors give the same GGUF as
    model.safetensors; bf16 weights make ``auto`` write bf16."""
    import torch
    from safetensors.torch import load_file, save_file

    from minicpm_train.gguf_export import export_model

    source = models["llama"]
    weights = load_file(str(source / "model.safetensors"))
    names = sorted(weights)
    layouts = {"bin": lambda d: torch.save(weights, d / "pytorch_model.bin"),
               "shards": lambda d: _save_shards(weights, names, d)}
    expected = exported("llama", "f16").read_bytes()
    for layout, write in layouts.items():
        folder = shutil.copytree(source, tmp_path / layout / source.name, ignore=shutil.ignore_patterns("model.*"))
        write(folder)
        assert export_model(folder, tmp_path / f"{layout}.gguf", outtype="f16").path.read_bytes() == expected, layout
    bf16 = shutil.copytree(source, tmp_path / "bf16" / source.name, ignore=shutil.ignore_patterns("model.*"))
    save_file({name: tensor.to(torch.bfloat16) for name, tensor in weights.items()}, str(bf16 / "model.safetensors"))
    assert export_model(bf16, tmp_path / "bf16.gguf").outtype == "bf16"


def _save_shards(weights: dict, names: list[str], folder) -> None:
    from safetensors.torch import save_file

    half = len(names) // 2
    weight_map = {}
    for index, part in enumerate((names[:half], names[half:]), start=1):
        file = f"model-0000{index}-of-00002.safetensors"
        save_file({name: weights[name] for name in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# --- refusals -------------------------------------------------------------------------------------------------


def _one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_refusals_are_one_error_line_and_leave_nothing_behind(models, exported, tmp_path, monkeypatch, capsys):
    (tmp_path / "kept").mkdir()
    output = tmp_path / "kept" / "out.gguf"
    output.write_bytes(b"keep")
    line = _one_error_line(*run_cli(monkeypatch, capsys, "export", str(models["llama"]), "-o", str(output))[::2])
    assert "exists: add --force" in line and output.read_bytes() == b"keep"

    qwen = shutil.copytree(models["llama"], tmp_path / "qwen")
    (qwen / "config.json").write_text(json.dumps({**json.loads((qwen / "config.json").read_text()),
                                                  "model_type": "qwen2"}))
    line = _one_error_line(*run_cli(monkeypatch, capsys, "export", str(qwen), "-o", str(tmp_path / "q.gguf"))[::2])
    assert "model type 'qwen2' cannot be exported" in line and "minicpm (MiniCPM-1/2 and MiniCPM4)" in line
    assert "minicpm3 (MiniCPM3)" in line and "llama (MiniCPM5" in line

    other = shutil.copytree(models["minicpm3"], tmp_path / "m3")
    (other / "config.json").write_text(json.dumps({**json.loads((other / "config.json").read_text()),
                                                   "scale_emb": 1}))
    line = _one_error_line(*run_cli(monkeypatch, capsys, "export", str(other), "-o", str(tmp_path / "m.gguf"))[::2])
    assert "llama.cpp's minicpm3 runs MiniCPM3-4B's scalings" in line and "scale_emb 1" in line

    adapter = make_adapter(models["llama"], tmp_path / "adapter", ["q_proj"])
    line = _one_error_line(*run_cli(monkeypatch, capsys, "export", str(adapter), "-o", str(tmp_path / "a.gguf"))[::2])
    assert "LoRA run's output" in line
    line = _one_error_line(*run_cli(monkeypatch, capsys, "export", str(adapter), "--lora", "-o",
                                    str(tmp_path / "a.gguf"))[::2])
    assert "--lora needs --base" in line and str(models["llama"]) in line
    line = _one_error_line(*run_cli(monkeypatch, capsys, "export", str(adapter), "--lora", "--base",
                                    str(exported("minicpm4", "q8_0")), "-o", str(tmp_path / "a.gguf"))[::2])
    assert "trained on another model" in line
    latent = make_adapter(models["minicpm3"], tmp_path / "latent", ["q_a_proj", "kv_b_proj"])
    line = _one_error_line(*run_cli(monkeypatch, capsys, "export", str(latent), "--lora", "--base",
                                    str(models["minicpm3"]), "-o", str(tmp_path / "a.gguf"))[::2])
    assert "applies no LoRA to the latent attention projections" in line
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.partial"))


def test_a_failed_write_leaves_no_file_and_progress_reaches_the_total(models, tmp_path, monkeypatch):
    from minicpm_train.gguf_export import export_model, weights

    seen = []
    export_model(models["llama"], tmp_path / "ok.gguf", outtype="q8_0", on_progress=lambda *p: seen.append(p))
    assert seen and seen[-1][0] == seen[-1][1] and [done for done, _ in seen] == sorted(done for done, _ in seen)

    def broken(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights.PlannedTensor, "encoded", broken)
    with pytest.raises(OSError):
        export_model(models["llama"], tmp_path / "ok.gguf", outtype="q8_0", force=True)
    assert (tmp_path / "ok.gguf").stat().st_size > 0  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.Modelfile", "ok.gguf"]
