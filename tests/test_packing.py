"""Packing: several samples per row, and none of them sees another."""

from __future__ import annotations

import pytest

from minicpm_train.data import IGNORE_INDEX, PackingCollator, SupervisedDataset, pack
from train_helpers import MAX_LENGTH, TASK_TRAIN


def _samples(tokenizer_dir, count=6):
    from minicpm_data.tokenizer import load_tokenizer
    from minicpm_train.data import load_supervised

    tokenizer = load_tokenizer(str(tokenizer_dir))
    dataset, _ = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tokenizer_dir / ".cache")
    return tokenizer, SupervisedDataset(dataset.input_ids[:count], dataset.labels[:count])


def test_pack_fills_rows_within_max_length_and_masks_sample_starts():
    source = SupervisedDataset([[1] * 5, [2] * 3, [3] * 4, [4] * 2], [[7] * 5, [8] * 3, [9] * 4, [6] * 2])
    packed = pack(source, max_length=8)
    assert sorted(len(ids) for ids in packed.input_ids) == [6, 8]
    assert sum(map(len, packed.input_ids)) == 14  # nothing lost
    for row in range(len(packed)):
        item = packed[row]
        starts = [i for i, p in enumerate(item["position_ids"]) if p == 0]
        assert all(item["labels"][i] == IGNORE_INDEX for i in starts)
        assert len(item["input_ids"]) <= 8


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_minicpm3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked_logits(kind, attention, request):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(kind)
    tokenizer, samples = _samples(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention).eval()
    packed = pack(samples, max_length=3 * max(map(len, samples.input_ids)))
    assert len(packed) < len(samples)  # several samples really share a row
    batch = PackingCollator(tokenizer.pad_token_id)([packed[i] for i in range(len(packed))])
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        checked = 0
        for row in range(len(packed)):
            positions = batch["position_ids"][row].tolist()
            starts = [i for i, p in enumerate(positions) if p == 0]
            for start, end in zip(starts, starts[1:] + [len(positions)]):
                ids = batch["input_ids"][row, start:end]
                match = [i for i in range(len(samples)) if samples.input_ids[i] == ids.tolist()]
                if not match:
                    continue  # the padding run at the end of a row
                alone = model(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(packed_logits[row, start:end], alone, atol=1e-5, rtol=1e-4)
                checked += 1
    assert checked == len(samples)
