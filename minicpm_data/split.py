"""Deterministic train/dev split of a target-format file.

The dev records are a seeded random sample of record indices; both outputs keep the input's
order, are disjoint, and together hold exactly the input's records. Records are streamed twice
(count, then write), so memory stays flat for JSON Lines.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from minicpm_data.errors import InputError
from minicpm_data.io import check_target, iter_raw_records, output_format, record_writer, require_file


@dataclass(frozen=True)
class SplitResult:
    train_path: str
    dev_path: str
    train: int
    dev: int

    def to_dict(self) -> dict[str, object]:
        return {"train": {"path": self.train_path, "records": self.train},
                "dev": {"path": self.dev_path, "records": self.dev}}


def dev_indices(count: int, dev_ratio: float, seed: int) -> set[int]:
    """Which of ``count`` records go to dev: ``round(count * dev_ratio)``, at least one and at most
    ``count - 1`` when there are two or more records."""
    if not 0 < dev_ratio < 1:
        raise InputError(f"--dev-ratio must be between 0 and 1 (exclusive), got {dev_ratio}")
    size = min(max(round(count * dev_ratio), 1), count - 1) if count >= 2 else 0
    return set(random.Random(seed).sample(range(count), size))


def split_paths(out_dir: Path, fmt: str) -> tuple[Path, Path]:
    """``out_dir/train.<fmt>`` and ``out_dir/dev.<fmt>``; refuses, before anything is written, an
    ``out_dir`` that is a file, or targets that cannot be files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file; with --dev-ratio, -o names a folder (it gets train.* and dev.*)")
    paths = out_dir / f"train.{fmt}", out_dir / f"dev.{fmt}"
    for target in paths:
        check_target(target)
    return paths


def split_file(path: str | Path, out_dir: str | Path, *, dev_ratio: float = 0.1, seed: int = 42,
               fmt: str | None = None) -> SplitResult:
    """Write ``out_dir/train.<fmt>`` and ``out_dir/dev.<fmt>`` (format: given, else the input's).

    An input without records is an :class:`InputError`."""
    path, out_dir = Path(path), Path(out_dir)
    require_file(path)
    fmt = fmt or output_format(path)
    train_path, dev_path = split_paths(out_dir, fmt)
    if path.resolve() in (train_path.resolve(), dev_path.resolve()):
        raise InputError(f"{path}: the split would overwrite its own input; choose another -o folder")
    count = sum(1 for _ in iter_raw_records(path))
    if not count:
        raise InputError(f"{path}: no records to split")
    chosen = dev_indices(count, dev_ratio, seed)
    with record_writer(train_path, fmt) as train, record_writer(dev_path, fmt) as dev:
        for record in iter_raw_records(path):
            (dev if record.index in chosen else train).write(record.data)
    return SplitResult(str(train_path), str(dev_path), train.count, dev.count)
