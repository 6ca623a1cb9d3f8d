"""How data reaches a Keras model in a pass: what ``model.fit`` accepts, batch by batch.

- an iterable (a list, a generator) of ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``
  (Keras' own rule, ``keras.utils.unpack_x_y_sample_weight``: a tuple is always unpacked, so
  a model with several inputs takes ``((a, b), y)`` or a dict);
- a ``keras.utils.PyDataset`` (its batches by index, ``num_batches`` of them);
- a ``tf.data.Dataset`` (through ``as_numpy_iterator``, where TensorFlow is installed);
- a NumPy array (or a tuple ``(x, y)`` of arrays) with ``batch_size=``, cut in order.

Only ``x`` is used: targets and sample weights are ignored, as training BN ignores them
(each sample weighs the same in a batch's statistics).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import keras
import numpy as np


def input_batches(data: Any, batch_size: int | None) -> Iterable[Any]:
    """The model inputs ``x`` of every batch in ``data``, re-iterable where ``data`` is."""
    if batch_size is not None:
        return _ArrayBatches(data, batch_size)
    if _is_array(data):
        raise TypeError(
            f"data is a {type(data).__name__} of shape {tuple(data.shape)}: pass batch_size= "
            "to cut it into batches"
        )
    if isinstance(data, keras.utils.PyDataset):
        return _PyDatasetBatches(data)
    if type(data).__module__.startswith("tensorflow") and hasattr(data, "as_numpy_iterator"):
        return _Unpacked(_NumpyDataset(data))
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an iterable of batches, a PyDataset, a tf.data.Dataset or an array "
            f"with batch_size=, got {type(data).__name__}"
        )
    return _Unpacked(data)


def source_of(batches: Iterable[Any]) -> Iterable[Any]:
    """What :func:`input_batches` goes over underneath: the user's iterable for an iterable
    of batches (one-shot if that is), else ``batches`` itself (re-iterable)."""
    return batches.data if isinstance(batches, _Unpacked) else batches


def batch_size_of(x: Any) -> int:
    """Samples in the input ``x`` (the first dimension of its first array)."""
    leaves = keras.tree.flatten(x)
    shapes = [getattr(leaf, "shape", None) for leaf in leaves]
    shapes = [shape for shape in shapes if shape is not None and len(shape) > 0]
    if not shapes:
        raise TypeError(f"a batch holds no array with a batch dimension: {type(x).__name__}")
    return int(shapes[0][0])


def first_samples(x: Any, keep: int) -> Any:
    """The first ``keep`` samples of every array in ``x``."""
    return keras.tree.map_structure(lambda leaf: leaf[:keep], x)


def _is_array(data: Any) -> bool:
    return hasattr(data, "shape") and hasattr(data, "dtype") and not isinstance(data, type)


class _Unpacked:
    """``x`` of each element of ``data`` (Keras' unpacking rule)."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[Any]:
        for batch in self.data:
            yield keras.utils.unpack_x_y_sample_weight(batch)[0]


class _ArrayBatches:
    """Consecutive slices of ``batch_size`` samples of an array (or of the ``x`` of a tuple
    ``(x, y[, sample_weight])`` of arrays); the last one may be shorter."""

    def __init__(self, data: Any, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        x = keras.utils.unpack_x_y_sample_weight(data)[0]
        if not all(_is_array(leaf) for leaf in keras.tree.flatten(x)):
            raise TypeError(
                f"batch_size= cuts arrays into batches; data is a {type(data).__name__}: pass "
                "an array (or (x, y) of arrays), or an iterable of batches without batch_size"
            )
        self.x, self.batch_size = x, batch_size
        self.samples = batch_size_of(x)

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, self.samples, self.batch_size):
            stop = start + self.batch_size
            yield keras.tree.map_structure(lambda leaf, a=start, b=stop: leaf[a:b], self.x)


class _PyDatasetBatches:
    """A PyDataset's ``x`` by index: ``num_batches`` of them (forever if it has no end)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[Any]:
        total = self.dataset.num_batches
        index = 0
        while total is None or index < total:
            yield keras.utils.unpack_x_y_sample_weight(self.dataset[index])[0]
            index += 1


class _NumpyDataset:
    """A ``tf.data.Dataset`` as NumPy, re-iterable."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[Any]:
        for batch in self.dataset.as_numpy_iterator():
            yield keras.tree.map_structure(np.asarray, batch)
