"""The built-in MiniCPM class (model_type "minicpm"): parity with OpenBMB's code, and transformers 5's features.

Parity: ``fixtures/minicpm_reference/*.safetensors`` hold the outputs of OpenBMB's unchanged v2 / v4 files
under transformers 4.36 / 4.46 (``make_reference.py``) with the exact config and seed of each tiny folder; the
folders are rebuilt here (weights depend only on config and seed, not on ../shared) and loaded through
``AutoModelForCausalLM.from_pretrained`` as a user's run loads them.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import build_tiny_models
from minicpm_train.modeling import (
    MiniCPMConfig,
    MiniCPMForCausalLM,
    SparseAttentionNotice,
    register_minicpm,
    sparse_attention_notice,
)
from minicpm_train.modeling import configuration_minicpm

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "minicpm_reference"
REFERENCES = sorted(REFERENCE_DIR.glob("*.safetensors"))
ATTENTION = ("sdpa", "eager")

register_minicpm()
# the notice is checked by test_sparse_config_gives_one_notice; elsewhere it is noise
pytestmark = pytest.mark.filterwarnings("ignore::minicpm_train.modeling.SparseAttentionNotice")


def load(folder: Path, attn: str = "sdpa", **kwargs) -> MiniCPMForCausalLM:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn, **kwargs)
    assert model.config._attn_implementation == attn
    return model.eval()


def read_reference(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        case = json.loads(handle.metadata()["case"])
        return case, {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.fixture(scope="module")
def reference_folders(tmp_path_factory):
    """Each reference case's folder, rebuilt from its recorded config.json and seed (fixture tokenizers)."""
    folders = {}
    for path in REFERENCES:
        case, _ = read_reference(path)
        folders[path.stem] = build_tiny_models.build_tiny_model(
            case["kind"], tmp_path_factory.mktemp(path.stem), seed=case["seed"],
            config_overrides=case["config"], shared_dir=None)
    return folders


def test_reference_files_cover_the_issue_cases():
    cases = {path.stem: read_reference(path)[0] for path in REFERENCES}
    assert {case["code"] for case in cases.values()} == {"v2", "v4"}
    configs = [case["config"] for case in cases.values()]
    assert any(c.get("tie_word_embeddings", True) for c in configs)
    assert any(c.get("tie_word_embeddings") is False for c in configs)
    assert any(c["num_key_value_heads"] < c["num_attention_heads"] for c in configs)
    longrope = [c for c in configs if (c.get("rope_scaling") or {}).get("rope_type") == "longrope"]
    assert longrope and all(c["rope_scaling"]["original_max_position_embeddings"] < 160 for c in longrope)
    assert sum(path.stat().st_size for path in REFERENCES) < 2 * 1024 * 1024


# every case with sdpa (transformers' default), one per code version with eager as well
PARITY_RUNS = [(path, "sdpa") for path in REFERENCES] + [
    (path, "eager") for path in REFERENCES if path.stem in ("v2_minicpm2", "v4_minicpm4")]


@pytest.mark.parametrize(("reference", "attn"), PARITY_RUNS, ids=lambda value: getattr(value, "stem", value))
def test_logits_match_openbmb_code(reference, attn, reference_folders):
    case, expected = read_reference(reference)
    model = load(reference_folders[reference.stem], attn)
    subset = expected["vocab_subset"]
    for run in range(case["runs"]):
        key = f"run{run}."
        input_ids, mask = expected[key + "input_ids"], expected[key + "attention_mask"]
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        tolerance = 1e-4 * expected[key + "max_abs_logit"].item()
        real = mask.bool()  # padding positions carry no prediction
        checks = {
            "subset": (logits[..., subset], expected[key + "logits_subset"]),
            "max": (logits.max(-1).values, expected[key + "max_logit"]),
            "at reference argmax": (logits.gather(-1, expected[key + "argmax"][..., None])[..., 0],
                                    expected[key + "max_logit"]),
            "logsumexp": (logits.logsumexp(-1), expected[key + "logsumexp"]),
        }
        for name, (ours, theirs) in checks.items():
            delta = (ours - theirs)[real].abs().max().item()
            assert delta <= tolerance, f"{reference.stem} run {run} {name}: max |Δlogit| {delta:.2e} > {tolerance:.2e}"
        if key + "generated" in expected:
            with torch.no_grad():
                generated = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                           max_new_tokens=8, min_new_tokens=8, use_cache=True)
            assert generated.tolist() == expected[key + "generated"].tolist()


def test_longrope_switches_factors_at_original_length(reference_folders):
    """With max_position == original, short factors up to it and long beyond (OpenBMB's table rebuild rule)."""
    model = load(reference_folders["v4_minicpm4_switch"])
    rotary = model.model.rotary_emb
    x = torch.zeros(1)
    short_cos, _ = rotary(x, torch.arange(64)[None])
    long_cos, _ = rotary(x, torch.arange(65)[None])
    assert not torch.allclose(short_cos[0, :64], long_cos[0, :64])
    assert rotary.attention_scaling == 1.0


def test_rope_buffers_initialised_by_from_pretrained(tiny_minicpm4, monkeypatch):
    """transformers 5 builds on the meta device; the rotary buffers must still hold their real values."""
    from transformers import PreTrainedModel

    config = MiniCPMConfig.from_pretrained(tiny_minicpm4)
    expected = build_rotary_buffers(config)
    model = load(tiny_minicpm4)
    loaded = model.model.rotary_emb
    for name, value in expected.items():
        assert torch.equal(getattr(loaded, name), value), name
    model.to(torch.bfloat16)  # DeepSpeed's bf16 casts the whole module: the frequencies must stay exact
    for name, value in expected.items():
        assert torch.equal(getattr(loaded, name), value), name
    assert model.lm_head.weight.dtype == torch.bfloat16
    # the check can fail: without the model's own _init_weights the buffers are left as meta-device garbage
    from minicpm_train.modeling.modeling_minicpm import MiniCPMPreTrainedModel

    monkeypatch.setattr(MiniCPMPreTrainedModel, "_init_weights", PreTrainedModel._init_weights)
    broken = load(tiny_minicpm4).model.rotary_emb
    assert not all(torch.equal(getattr(broken, name), value) for name, value in expected.items())


def build_rotary_buffers(config: MiniCPMConfig) -> dict[str, torch.Tensor]:
    """The buffers as OpenBMB's rotary classes compute them."""
    dim = config.head_dim
    buffers = {"inv_freq": 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2).float() / dim))}
    if config.rope_type == "longrope":
        buffers["short_factor"] = torch.tensor(config.rope_scaling["short_factor"], dtype=torch.float32)
        buffers["long_factor"] = torch.tensor(config.rope_scaling["long_factor"], dtype=torch.float32)
    return buffers


def test_loads_builtin_class_from_openbmb_folder_even_with_trust_remote_code(tiny_minicpm2):
    from transformers import AutoConfig

    if not (tiny_minicpm2 / "modeling_minicpm.py").is_file():
        pytest.skip("../shared/minicpm_code is not present: the folder has no OpenBMB code")
    assert "auto_map" in json.loads((tiny_minicpm2 / "config.json").read_text())
    for trust in (False, True):
        assert type(AutoConfig.from_pretrained(tiny_minicpm2, trust_remote_code=trust)) is MiniCPMConfig
        assert type(load(tiny_minicpm2, trust_remote_code=trust)) is MiniCPMForCausalLM


def test_generate_with_and_without_cache_gives_the_same_tokens(tiny_minicpm4):
    model = load(tiny_minicpm4)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 20), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :7] = 0  # left padding, as batched generation pads
    settings = dict(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    with torch.no_grad():
        cached = model.generate(**settings, use_cache=True)
        uncached = model.generate(**settings, use_cache=False)
        alone = model.generate(**{**settings, "input_ids": input_ids[1:, 7:], "attention_mask": mask[1:, 7:]})
    assert cached.shape == (2, 28)
    assert cached.tolist() == uncached.tolist()
    assert cached[1, 20:].tolist() == alone[0, 13:].tolist()  # left padding changes no position


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("kind", ["tiny_minicpm2", "tiny_minicpm4"])
def test_packed_samples_equal_separate_samples(kind, attn, request):
    model = load(request.getfixturevalue(kind), attn)
    generator = torch.Generator().manual_seed(4)
    samples = [torch.randint(3, model.config.vocab_size, (length,), generator=generator) for length in (20, 31)]
    packed_ids = torch.cat(samples)[None]
    position_ids = torch.cat([torch.arange(len(sample)) for sample in samples])[None]
    with torch.no_grad():
        packed = model(input_ids=packed_ids, position_ids=position_ids, use_cache=False).logits[0]
        separate = torch.cat([model(input_ids=sample[None], use_cache=False).logits[0] for sample in samples])
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["tiny_minicpm2", "tiny_minicpm4"])
def test_sdpa_equals_eager_on_a_padded_batch(kind, request):
    folder = request.getfixturevalue(kind)
    input_ids = torch.randint(3, 1000, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(input_ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        sdpa, eager = (load(folder, attn)(input_ids=input_ids, attention_mask=mask).logits for attn in ATTENTION)
    torch.testing.assert_close(sdpa[mask.bool()], eager[mask.bool()], rtol=0, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_minicpm4):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = load(tiny_minicpm4).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        input_ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(6))
        model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
        return {name: param.grad for name, param in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert all(grad is not None and grad.abs().sum() > 0 for grad in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_mup_scalings_and_logits_to_keep(tiny_minicpm4):
    model = load(tiny_minicpm4)
    config = model.config
    head_inputs = []
    model.lm_head.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0]))
    input_ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
        hidden = model.model(input_ids=input_ids).last_hidden_state
        last = model(input_ids=input_ids, logits_to_keep=1).logits
        embeds = model.model.embed_tokens(input_ids) * config.scale_emb
        from_embeds = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(head_inputs[0], hidden / (config.hidden_size / config.dim_model_base))
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], full[:, -1])
    torch.testing.assert_close(from_embeds, full)
    layer = model.model.layers[0]
    assert layer.residual_scale == pytest.approx(config.scale_depth / math.sqrt(config.num_hidden_layers))


def test_save_and_reload_keep_openbmb_config_and_parameter_names(tiny_minicpm2, tiny_minicpm4, tmp_path):
    from safetensors import safe_open

    for folder in (tiny_minicpm2, tiny_minicpm4):
        model = load(folder)
        out = tmp_path / folder.name
        model.save_pretrained(out)
        original = json.loads((folder / "config.json").read_text())
        saved = json.loads((out / "config.json").read_text())
        for key, value in original.items():
            if key not in ("transformers_version", "_name_or_path"):
                assert saved[key] == value, key
        with safe_open(str(folder / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
        input_ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            torch.testing.assert_close(load(out)(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    assert json.loads((tmp_path / tiny_minicpm2.name / "config.json").read_text())["rope_scaling"] is None


def test_tied_and_untied_heads(tiny_minicpm2, tiny_minicpm4):
    tied, untied = load(tiny_minicpm2), load(tiny_minicpm4)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_sparse_config_gives_one_notice(tiny_minicpm2, tiny_minicpm4, monkeypatch):
    config = MiniCPMConfig.from_pretrained(tiny_minicpm4)
    notice = sparse_attention_notice(config)
    assert "InfLLM-v2" in notice and "dense attention" in notice and "8192" in notice
    assert sparse_attention_notice(MiniCPMConfig.from_pretrained(tiny_minicpm2)) is None
    monkeypatch.setattr(configuration_minicpm, "_warned_sparse", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(tiny_minicpm4)
        load(tiny_minicpm4)
    assert [str(w.message) for w in caught if w.category is SparseAttentionNotice] == [notice]


@pytest.mark.parametrize("shape", [
    dict(num_attention_heads=6, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),  # 3 groups, head 64
    dict(num_attention_heads=12, num_key_value_heads=1, rope_scaling={  # MQA, head 32, LongRoPE switching at 32
        "rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [4.0] * 16,
        "original_max_position_embeddings": 32}, max_position_embeddings=32, tie_word_embeddings=False),
], ids=["gqa3-tied", "mqa-longrope"])
def test_other_minicpm_shapes(shape):
    """Configurations beyond the fixtures' (MiniCPM-1B's grouping, MQA): kernels and cache agree."""
    torch.manual_seed(0)
    config = MiniCPMConfig(vocab_size=512, hidden_size=384, intermediate_size=512, num_hidden_layers=2,
                           scale_emb=12, scale_depth=1.4, dim_model_base=64, initializer_range=0.1, **shape)
    models = {attn: MiniCPMForCausalLM._from_config(copy.deepcopy(config), attn_implementation=attn).eval()
              for attn in ATTENTION}
    assert models["sdpa"].config._attn_implementation == "sdpa"
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    input_ids = torch.randint(3, 512, (2, 24))
    mask = torch.ones_like(input_ids)
    mask[1, 17:] = 0
    with torch.no_grad():
        sdpa, eager = (models[attn](input_ids=input_ids, attention_mask=mask).logits for attn in ATTENTION)
        settings = dict(input_ids=input_ids[:1], do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
        cached = models["sdpa"].generate(**settings, use_cache=True)
        uncached = models["sdpa"].generate(**settings, use_cache=False)
    torch.testing.assert_close(sdpa[mask.bool()], eager[mask.bool()], rtol=0, atol=1e-4)
    assert cached.tolist() == uncached.tolist()


def test_moe_config_is_refused_not_loaded_with_missing_experts():
    with pytest.raises(ValueError, match="MiniCPM-MoE"):
        MiniCPMForCausalLM(MiniCPMConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_experts=8, num_experts_per_tok=2))


def test_config_reads_openbmb_rope_variants():
    assert MiniCPMConfig(rope_scaling=None).rope_type == "default"
    assert MiniCPMConfig(rope_scaling={"type": "linear", "factor": 2.0}).rope_type == "linear"
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        MiniCPMConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="lacks original_max_position_embeddings"):
        MiniCPMConfig(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.0] * 64})
    with pytest.raises(ValueError, match="short_factor has 3 values; this model's head size 128 needs 64"):
        MiniCPMConfig(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 64,
                                    "original_max_position_embeddings": 4096})
