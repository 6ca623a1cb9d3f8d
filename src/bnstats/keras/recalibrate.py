"""Exact population statistics for every BN layer of a Keras 3 model."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from bnstats.keras._layers import write_statistics
from bnstats.keras._pass import KerasPassOptions, measure


def recalibrate(
    model: Any,
    data: Any,
    *,
    mode: Literal["train", "eval"] = "train",
    max_samples: int | None = None,
    progress: bool | None = None,
    batch_size: int | None = None,
    nonfinite: Literal["raise", "skip"] = "raise",
    unreached: Literal["raise", "keep"] = "raise",
    one_batch_bytes: int | None = None,
) -> Any:
    """Write every ``keras.layers.BatchNormalization``'s ``moving_mean`` and
    ``moving_variance`` as the exact population statistics of its input over ``data``;
    returns ``model``.

    The Keras counterpart of :func:`bnstats.torch.recalibrate`, on any Keras 3 backend
    (functional, Sequential and subclassed models, nested ones included). Per layer, over
    all N values per channel of its input (every sample, every position)::

        moving_mean     = mu  = sum(z) / N
        moving_variance = var = sum((z - mu)**2) / N

    merged batch by batch in float64 (:class:`bnstats.Population`, Chan et al. 1979) and
    cast to the variables' dtype. The variance is over all N values, not ``N - 1``: Keras 3
    normalizes with ``moving_variance`` as stored and trains on BIASED batch variances
    (``bnstats.conventions.CONVENTIONS["keras"].variance == "biased"``; PyTorch stores
    unbiased ones).

    - ``data``: what ``model.fit`` takes from a generator (an iterable of ``x``, ``(x, y)``
      or ``(x, y, sample_weight)``; targets and weights are ignored), a
      ``keras.utils.PyDataset``, a ``tf.data.Dataset``, or an array with ``batch_size=``.
    - ``mode="train"`` (one pass): each layer's input in a forward where every BN layer
      normalizes with its batch's statistics and every other layer is in inference
      behaviour (dropout off). ``mode="eval"``: each layer's input as inference sees it,
      every BN layer before it normalizing with its own final statistics (``data`` must be
      re-iterable; batches of one sample are fine): where the data fit, all of them as one
      batch and one pass to check (3 passes, :mod:`bnstats._host_one_batch`); over the
      budget, the first batches that fit solved as one batch and corrected by whole passes
      (:mod:`bnstats._host_subset`); else one pass per depth level.
    - ``max_samples``: stop after this many samples (the batch crossing it is cut).
    - ``nonfinite``: ``"raise"`` (a batch bringing NaN or Inf fails, naming it) or ``"skip"``.
    - ``unreached``: ``"raise"`` (a BN layer no forward reached fails) or ``"keep"``.
    - ``progress``: a rich progress bar on stderr (``None``: when stderr is a terminal).
    - ``one_batch_bytes``: in ``mode="eval"``, the memory the data may take to run as one
      batch: their largest BN input (at 4 bytes a value) and their inputs each at most this
      many bytes (``None``: 256 MiB; 0: never, level by level;
      :class:`bnstats.torch.PassOptions`); over it, the subset is the first batches within it.

    Nothing else changes: ``momentum``, ``gamma``, ``beta``, every other weight and
    ``trainable``. Nothing is written unless the whole pass succeeds (the data source or the
    model raising leaves every variable as it was). Layers with ``trainable=False`` normalize
    with their moving statistics in training too (Keras' frozen BN): they are left alone,
    with a warning naming them. ``ValueError`` for ``renorm=True`` layers, a model whose BN
    layers are all frozen, a training batch with one value per channel,
    an empty ``data`` or a layer never reached.
    """
    options = KerasPassOptions(
        mode=mode,
        max_samples=max_samples,
        batch_size=batch_size,
        nonfinite=nonfinite,
        unreached=unreached,
        progress=progress,
        one_batch_bytes=one_batch_bytes,
    )
    result = measure(model, data, options)
    values = {}
    for host in result.measured.reached():
        mean, var = host.statistics()
        values[host.name] = (result.layers[host.name], mean, var)
    write_statistics(values)
    if result.fixed:
        names = ", ".join(repr(path) for path in result.fixed)
        warnings.warn(
            f"bnstats: layers with fixed statistics (trainable=False) left as they are: {names}",
            stacklevel=2,
        )
    return model
