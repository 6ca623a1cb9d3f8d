"""Checkpoints: a round trip keeps every number; a bad file gets an error naming it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import bnstats
from bnstats.engine import CheckpointError, Network


def _trained(rng):
    net = Network.mlp(
        [5, 7, 3],
        seed=0,
        estimators={"ema": bnstats.EMA(0.2, debias=True), "cum": bnstats.CumulativeAverage()},
    )
    X, y = rng.normal(size=(40, 5)), rng.integers(0, 3, size=40)
    net.fit(X, y, epochs=2, batch_size=10)
    return net.recalibrate(X), X


def test_round_trip_keeps_every_number(rng, tmp_path):
    net, X = _trained(rng)
    path = net.save(tmp_path / "net.npz")
    loaded = Network.load(path)
    for stats in ("ema", "cum", "population", "batch"):
        np.testing.assert_array_equal(loaded.logits(X, stats=stats), net.logits(X, stats=stats))
    ema = loaded.batchnorm_layers[0].estimators["ema"]
    assert ema.debias and ema.momentum == 0.2 and ema.num_batches_tracked == 8
    assert [p[0] for p in loaded.parameters()] == [p[0] for p in net.parameters()]


def test_an_estimator_fed_numpy_integer_counts_saves(rng, tmp_path):
    """Counts from NumPy (``np.int64(8)``) went into the JSON state as they were."""
    net, X = _trained(rng)
    layer = net.batchnorm_layers[0]
    layer.estimators["cum"].update(np.zeros(7), np.ones(7), np.int64(8))
    loaded = Network.load(net.save(tmp_path / "net.npz"))
    saved = loaded.batchnorm_layers[0].estimators["cum"]
    assert saved.count == layer.estimators["cum"].count and type(saved.count) is not np.int64


def test_save_is_atomic_and_leaves_no_temporary_file(rng, tmp_path):
    net, _ = _trained(rng)
    target = tmp_path / "net.npz"
    target.write_bytes(b"old")
    net.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["net.npz"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        net.save(tmp_path / "missing-dir" / "net.npz")


def test_truncated_file_names_the_file(rng, tmp_path):
    net, _ = _trained(rng)
    path = net.save(tmp_path / "net.npz")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="net.npz"):
        Network.load(path)


def test_foreign_and_future_files(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    with pytest.raises(CheckpointError, match="foreign.npz.*not a bnstats"):
        Network.load(foreign)
    future = tmp_path / "future.npz"
    np.savez(
        future, __meta__=np.array(json.dumps({"format": "bnstats.engine.Network", "version": 99}))
    )
    with pytest.raises(CheckpointError, match="version 99"):
        Network.load(future)
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="text.npz"):
        Network.load(text)
    with pytest.raises(FileNotFoundError):
        Network.load(tmp_path / "nothing.npz")


def test_every_engine_layer_kind_is_in_the_checkpoint_table():
    from bnstats.engine import Layer
    from bnstats.engine.kinds import LAYER_KINDS

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    engine = {c for c in subclasses(Layer) if c.__module__.startswith("bnstats.engine")}
    assert set(LAYER_KINDS.values()) == engine
    assert all(LAYER_KINDS[c.kind] is c for c in engine)


def _with_header(path, header):
    np.savez(path, __meta__=np.array(json.dumps(header)))
    return path


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ([1, 2], "its header is a list, not a JSON object"),
        (3.5, "its header is a float, not a JSON object"),
        ({"format": "bnstats.engine.Network", "version": "1"}, "version '1'; this bnstats reads"),
        ({"format": "bnstats.engine.Network", "version": 1, "layers": 7}, "damaged checkpoint"),
        ({"format": "bnstats.engine.Network", "version": 1, "layers": [7]}, "damaged checkpoint"),
    ],
)
def test_bad_headers_get_one_error_naming_the_file(tmp_path, header, message):
    path = _with_header(tmp_path / "bad.npz", header)
    with pytest.raises(CheckpointError, match=rf"bad\.npz.*{re.escape(message)}"):
        Network.load(path)


def test_estimator_arrays_of_the_wrong_length_are_refused_on_load(rng, tmp_path):
    net, _ = _trained(rng)
    path = net.save(tmp_path / "net.npz")
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["bn1/estimators/ema/running_mean"] = np.zeros(4)
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=r"net\.npz.*EMA running_mean has shape \(4,\), not"):
        Network.load(path)


def _arrays(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_meta_gets_the_one_line_error(tmp_path):
    path = tmp_path / "deep.npz"
    np.savez(path, __meta__=np.array(_deep_json()))
    with pytest.raises(CheckpointError, match=r"deep\.npz: unreadable header \(JSON nested"):
        Network.load(path)


def _wide_claim(path, width: int):
    """A small file whose config asks for ``width``-wide layers but stores 5x7 arrays."""
    net = Network.mlp([5, 7, 3], seed=0)
    net.save(path)
    arrays = _arrays(path)
    meta = json.loads(str(arrays["__meta__"]))
    for layer in meta["layers"]:
        for key in ("in_features", "out_features", "num_features"):
            if key in layer["config"]:
                layer["config"][key] = width
    arrays["__meta__"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("width", [6000, 10**7, 10**30])
def test_declared_shapes_are_checked_before_any_layer_is_built(tmp_path, width, monkeypatch):
    """A file declaring layers wider than its arrays is refused by its shapes, before a layer
    is built (building a 6000-wide Linear would draw 36 million random weights)."""
    from bnstats.engine import Linear

    path = _wide_claim(tmp_path / "wide.npz", width)
    built = []
    original = Linear.__init__
    monkeypatch.setattr(
        Linear, "__init__", lambda self, *a, **k: built.append(a) or original(self, *a, **k)
    )
    with pytest.raises(CheckpointError, match=r"wide\.npz.*linear1/weight has shape \(7, 5\)"):
        Network.load(path)
    assert built == []


def test_every_layer_kind_knows_its_parameter_shapes_without_being_built():
    from bnstats.engine.kinds import LAYER_KINDS

    net = Network.mlp([5, 7, 3], seed=0)
    examples = {type(layer): layer for layer in net.layers}
    examples.update(
        {cls: cls(4, **extra) for cls, extra in _batchnorm_variants().items()},
    )
    assert set(examples) == set(LAYER_KINDS.values())
    for layer in examples.values():
        shapes = {key: value.shape for key, value in layer.params.items()}
        assert type(layer).param_shapes(layer.config()) == shapes, layer


def _batchnorm_variants():
    from bnstats.engine import BatchRenorm, GhostBatchNorm

    return {BatchRenorm: {}, GhostBatchNorm: {"ghost_size": 2}}


@pytest.mark.parametrize("key", ["linear1/weight", "bn1/bias", "bn1/estimators/ema/running_var"])
def test_complex_arrays_are_refused_not_truncated(rng, tmp_path, key):
    net, _ = _trained(rng)
    path = net.save(tmp_path / "net.npz")
    arrays = _arrays(path)
    arrays[key] = arrays[key] + 1j
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=rf"net\.npz.*{key} holds complex128 values"):
        Network.load(path)


@pytest.mark.parametrize(
    ("content", "start"),
    [(b"loss,batch_size\n1.0,8\n", "b'loss'"), (b"\x80\x04\x95", r"b'\x80\x04\x95'")],
)
def test_a_file_that_is_no_npz_says_what_was_expected(tmp_path, content, start):
    path = tmp_path / "net.csv"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        Network.load(path)
    message = str(caught.value)
    assert "net.csv is not a .npz archive" in message and start in message
    assert "expected a bnstats network checkpoint (from Network.save)" in message
    assert "pickle" not in message
