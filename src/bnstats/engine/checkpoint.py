"""Saving and loading engine networks: one ``.npz`` file, versioned, written atomically.

The archive holds every array (parameters and estimator states) under ``<layer>/<key>``
and a JSON description under ``__meta__``: the format name and version, each layer's kind,
name and constructor arguments, and each estimator's settings. Nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnstats._files import atomic_write_bytes, npz_bytes
from bnstats._formats import (
    FileFormatError,
    check_header,
    format_header,
    parse_header,
    read_npz,
)
from bnstats.engine.kinds import LAYER_KINDS
from bnstats.engine.layers import BatchNorm, Layer
from bnstats.stats import estimator_from_state

FORMAT = "bnstats.engine.Network"
VERSION = 1


class CheckpointError(FileFormatError):
    """A file that is not a readable bnstats network checkpoint."""


def save(layers: Sequence[Layer], path: str | Path) -> Path:
    """Write a network's ``layers`` to ``path`` (``.npz``), atomically."""
    arrays: dict[str, np.ndarray] = {}
    layers_meta = []
    for layer in layers:
        for key, value in layer.params.items():
            arrays[f"{layer.name}/{key}"] = value
        meta: dict[str, Any] = {"kind": layer.kind, "name": layer.name, "config": layer.config()}
        if isinstance(layer, BatchNorm):
            meta["estimators"] = {
                key: _split_state(est.state_dict(), f"{layer.name}/estimators/{key}", arrays)
                for key, est in layer.estimators.items()
            }
        layers_meta.append(meta)
    header = {**format_header(FORMAT, VERSION), "layers": layers_meta}
    arrays["__meta__"] = np.array(json.dumps(header))
    return atomic_write_bytes(Path(path), npz_bytes(arrays))


def _split_state(state: dict[str, Any], prefix: str, arrays: dict[str, np.ndarray]) -> dict:
    """Move the arrays of an estimator state into ``arrays``; keep the rest as JSON."""
    plain = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            arrays[f"{prefix}/{key}"] = value
            plain[key] = {"array": f"{prefix}/{key}"}
        else:
            plain[key] = value
    return plain


def load(path: str | Path) -> list[Layer]:
    """Read the layers written by :func:`save`; a foreign or damaged file raises
    :class:`CheckpointError` naming it."""
    path = Path(path)
    arrays = read_npz(path, "a bnstats network checkpoint (from Network.save)", CheckpointError)
    if "__meta__" not in arrays:
        raise CheckpointError(f"{path} is not a bnstats network checkpoint (no __meta__)")
    header = parse_header(str(arrays.pop("__meta__")), path, CheckpointError)
    check_header(header, path, FORMAT, VERSION, CheckpointError)
    try:
        if not isinstance(header.get("layers"), list):
            raise ValueError("no list of layers")
        _check_real(arrays)
        for meta in header["layers"]:
            _check_shapes(meta, arrays)
        return [_build_layer(meta, arrays) for meta in header["layers"]]
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
        raise CheckpointError(f"{path}: damaged checkpoint ({type(err).__name__}: {err})") from None


def _check_real(arrays: dict[str, np.ndarray]) -> None:
    """Every stored array holds real numbers: a complex one would lose its imaginary part."""
    for key, array in arrays.items():
        if array.dtype.kind not in "iuf":
            raise ValueError(f"{key} holds {array.dtype} values, not real numbers")


def _check_shapes(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """The stored parameters have the shapes the layer's declared config gives them, checked
    before any layer is built: a small file cannot make the loader allocate a large layer."""
    cls = LAYER_KINDS[meta["kind"]]
    for key, shape in cls.param_shapes(meta["config"]).items():
        stored = arrays[f"{meta['name']}/{key}"]
        if stored.shape != shape:
            raise ValueError(
                f"{meta['name']}/{key} has shape {stored.shape}, but the layer's config "
                f"declares {shape}"
            )


def _build_layer(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Layer:
    cls = LAYER_KINDS[meta["kind"]]
    layer = cls(**meta["config"], name=meta["name"])
    for key in list(layer.params):
        layer.params[key] = arrays[f"{layer.name}/{key}"].astype(np.float64)
    if isinstance(layer, BatchNorm):
        layer.estimators = {
            key: estimator_from_state(_join_state(state, arrays, layer.num_features))
            for key, state in meta["estimators"].items()
        }
    return layer


def _join_state(
    plain: dict[str, Any], arrays: dict[str, np.ndarray], features: int
) -> dict[str, Any]:
    """An estimator's state with its arrays put back; each must hold one value per feature."""
    state = {}
    for key, value in plain.items():
        if isinstance(value, dict) and "array" in value:
            value = arrays[value["array"]]
            if value.shape != (features,):
                raise ValueError(
                    f"{plain['kind']} {key} has shape {value.shape}, not ({features},)"
                )
        state[key] = value
    return state
