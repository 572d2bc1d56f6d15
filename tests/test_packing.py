"""Packing: several samples per row, the same rows as one-by-one first-fit decreasing, and none of the
samples sees another."""

from __future__ import annotations

import numpy as np
import pytest

from minicpm_train.data import IGNORE_INDEX, PackingCollator, SupervisedDataset, first_fit_decreasing, pack
from train_helpers import MAX_LENGTH, TASK_TRAIN


def _samples(tokenizer_dir, count=6):
    from minicpm_data.tokenizer import load_tokenizer
    from minicpm_train.data import load_supervised

    tokenizer = load_tokenizer(str(tokenizer_dir))
    dataset, _ = load_supervised(TASK_TRAIN, tokenizer, max_length=MAX_LENGTH, cache_dir=tokenizer_dir / ".cache")
    rows = [dataset[i] for i in range(count)]
    return tokenizer, SupervisedDataset.from_samples([r["input_ids"].tolist() for r in rows],
                                                     [r["labels"].tolist() for r in rows])


def _first_fit_one_by_one(lengths: list[int], capacity: int) -> list[list[int]]:
    """The reference: each sample, longest first, into the first row with room (a linear scan each)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            rows.append([index])
            room.append(capacity - lengths[index])
        else:
            rows[slot].append(index)
            room[slot] -= lengths[index]
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_rows_equal_one_by_one_first_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(8, 300))
    # Few distinct lengths (long runs of equal ones) in some cases, many in others.
    lengths = rng.integers(1, capacity + 1, int(rng.integers(1, 2000))) // int(rng.choice([1, 7]))
    lengths = np.maximum(lengths, 1)
    order, sizes = first_fit_decreasing(lengths, capacity)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rows = [order[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
    assert rows == _first_fit_one_by_one(lengths.tolist(), capacity)
    assert all(lengths[row].sum() <= capacity for row in rows)


def test_a_sample_longer_than_a_row_is_refused():
    from minicpm_train.data import DataError

    with pytest.raises(DataError, match="a sample of 9 tokens cannot be packed into rows of 8"):
        first_fit_decreasing(np.array([3, 9]), 8)


def test_pack_fills_rows_within_max_length_and_masks_sample_starts():
    source = SupervisedDataset.from_samples([[1] * 5, [2] * 3, [3] * 4, [4] * 2], [[7] * 5, [8] * 3, [9] * 4, [6] * 2])
    packed = pack(source, max_length=8)
    rows = [packed[row] for row in range(len(packed))]
    assert sorted(len(item["input_ids"]) for item in rows) == [6, 8]
    assert rows[0]["input_ids"].tolist() == [1] * 5 + [2] * 3  # first fit, longest first
    assert rows[0]["labels"].tolist() == [IGNORE_INDEX] + [1] * 4 + [IGNORE_INDEX] + [2] * 2
    assert rows[0]["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    for item in rows:
        starts = [i for i, p in enumerate(item["position_ids"]) if p == 0]
        assert all(item["labels"][i] == IGNORE_INDEX for i in starts)
        assert len(item["input_ids"]) <= 8
    with pytest.raises(IndexError):
        packed[len(packed)]


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_minicpm3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked_logits(kind, attention, request):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(kind)
    tokenizer, samples = _samples(model_dir)
    sample_ids = [samples[i]["input_ids"].tolist() for i in range(len(samples))]
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention).eval()
    packed = pack(samples, max_length=3 * int(samples.lengths.max()))
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
                match = [i for i in range(len(samples)) if sample_ids[i] == ids.tolist()]
                if not match:
                    continue  # the padding run at the end of a row
                alone = model(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(packed_logits[row, start:end], alone, atol=1e-5, rtol=1e-4)
                checked += 1
    assert checked == len(samples)
