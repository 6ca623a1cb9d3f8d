"""bnstats.conventions against real Keras 3 (NumPy backend) and PyTorch layers."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from bnstats import EMA, momentum_from_decay
from bnstats.conventions import (
    CONVENTIONS,
    convert_momentum,
    debiased_average,
    port,
    zero_debiased_hidden,
)
from tests.optional import optional_import

os.environ.setdefault("KERAS_BACKEND", "numpy")
DOC = Path(__file__).resolve().parents[1] / "docs" / "conventions.md"
C = 6


def _keras():
    keras = optional_import("keras")
    if keras.backend.backend() != "numpy":
        pytest.fail("these checks run Keras on its NumPy backend: set KERAS_BACKEND=numpy")
    return keras


def _stats(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": rng.uniform(0.5, 2.0, C),
        "beta": rng.normal(size=C),
        "moving_mean": rng.normal(size=C),
        "moving_variance": rng.uniform(0.2, 3.0, C),
    }


def _keras_layer(keras, stats: dict, **kwargs):
    layer = keras.layers.BatchNormalization(**kwargs)
    layer.build((None, 4, 4, C))
    layer.set_weights([stats[k].astype(np.float32) for k in _keras_keys()])
    return layer


def _keras_keys() -> tuple[str, ...]:
    return CONVENTIONS["keras"].keys


def _torch_layer(state: dict):
    torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm2d(C, eps=state["eps"], momentum=state["momentum"])
    bn.load_state_dict(
        {k: torch.as_tensor(state[k], dtype=torch.float32) for k in CONVENTIONS["torch"].keys},
        strict=False,
    )
    return bn.eval()


def _torch_output(bn, x_nhwc: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        y = bn(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).numpy()


def _images(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(8, 4, 4, C)) * 2 + 1).astype(np.float32)


def test_a_keras_layer_ported_to_torch_gives_keras_outputs():
    keras = _keras()
    stats = _stats()
    layer = _keras_layer(keras, stats)  # Keras defaults: momentum 0.99, epsilon 1e-3
    x = _images()
    expected = np.asarray(layer(x, training=False))
    ported = port(stats, source="keras", target="torch")
    assert ported.state["eps"] == pytest.approx(1e-3)
    assert ported.state["momentum"] == pytest.approx(0.01)
    got = _torch_output(_torch_layer(ported.state), x)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # With torch's default eps instead, the outputs differ: the eps note matters.
    wrong = _torch_layer({**ported.state, "eps": 1e-5})
    assert np.abs(_torch_output(wrong, x) - expected).max() > 1e-4
    assert any("eps 0.001" in note and "eps=0.001" in note for note in ported.notes)


def test_a_torch_layer_ported_to_keras_gives_torch_outputs():
    keras = _keras()
    torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm2d(C, eps=2e-4, momentum=0.05).eval()
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for key in CONVENTIONS["torch"].keys:
            getattr(bn, key).copy_(torch.as_tensor(rng.uniform(0.3, 2.0, C)))
    x = _images(4)
    expected = _torch_output(bn, x)
    state = {k: v.detach().numpy() for k, v in bn.state_dict().items()}
    ported = port({**state, "eps": bn.eps, "momentum": bn.momentum}, source="torch", target="keras")
    assert ported.state["momentum"] == pytest.approx(0.95)
    layer = _keras_layer(
        keras, ported.state, momentum=ported.state["momentum"], epsilon=ported.state["epsilon"]
    )
    got = np.asarray(layer(x, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_with_count_training_on_in_torch_continues_what_keras_would_store():
    """Keras averages biased batch variances with momentum weighing the old value; torch
    averages unbiased ones with momentum weighing the new batch. Ported with ``count``, one
    training step in each framework on the same batch ends at the same ported statistics."""
    keras = _keras()
    torch = pytest.importorskip("torch")
    stats = _stats(5)
    layer = _keras_layer(keras, stats, momentum=0.9)
    x = _images(6)
    count = x.shape[0] * x.shape[1] * x.shape[2]  # values per channel in the batch
    before = port({**stats, "momentum": 0.9}, source="keras", target="torch", count=count)
    bn = _torch_layer(before.state).train()
    with torch.no_grad():
        bn(torch.from_numpy(x).permute(0, 3, 1, 2))
    layer(x, training=True)
    after_keras = dict(
        zip(_keras_keys(), (np.asarray(w) for w in layer.get_weights()), strict=True)
    )
    after = port({**after_keras, "momentum": 0.9}, source="keras", target="torch", count=count)
    np.testing.assert_allclose(bn.running_mean.numpy(), after.state["running_mean"], rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), after.state["running_var"], rtol=1e-5)
    # Without the factor, torch's running variance would not match Keras' continuation.
    plain = port({**after_keras, "momentum": 0.9}, source="keras", target="torch")
    assert not np.allclose(bn.running_var.numpy(), plain.state["running_var"], rtol=1e-4)


def test_variance_is_kept_by_default_and_converted_with_count():
    stats = _stats()
    kept = port(stats, source="keras", target="torch")
    np.testing.assert_array_equal(kept.state["running_var"], stats["moving_variance"])
    assert any("count=" in note and "biased" in note for note in kept.notes)
    count = 32
    unbiased = port(stats, source="keras", target="torch", count=count)
    np.testing.assert_allclose(
        unbiased.state["running_var"], stats["moving_variance"] * count / (count - 1)
    )
    back = port(
        {**unbiased.state, "momentum": 0.01, "eps": 1e-3},
        source="torch",
        target="flax",
        count=count,
    )
    np.testing.assert_allclose(back.state["var"], stats["moving_variance"])
    assert back.state["momentum"] == pytest.approx(0.99)
    assert set(back.state) == {"scale", "bias", "mean", "var", "momentum", "epsilon"}
    same_kind = port(stats, source="keras", target="onnx", count=count)
    np.testing.assert_array_equal(same_kind.state["input_var"], stats["moving_variance"])


def test_momentum_meanings():
    assert convert_momentum(0.1, source="torch", target="onnx") == pytest.approx(0.9)
    assert convert_momentum(0.99, source="flax", target="torch") == pytest.approx(0.01)
    assert convert_momentum(0.9, source="keras", target="haiku") == 0.9
    assert convert_momentum(None, source="torch", target="torch") is None
    with pytest.raises(ValueError, match="cumulative average.*onnx has no equivalent"):
        convert_momentum(None, source="torch", target="onnx")
    with pytest.raises(ValueError, match="momentum must lie in"):
        convert_momentum(1.5, source="keras", target="torch")
    with pytest.raises(ValueError, match="momentum=None .* is PyTorch's alone; keras has no"):
        convert_momentum(None, source="keras", target="torch")
    assert EMA.from_decay(0.99).momentum == 0.01
    with pytest.raises(ValueError, match="decay 0.9999999999999996 is 1 to 15 decimals"):
        EMA.from_decay(0.9999999999999996)


def test_bad_input_is_named():
    stats = _stats()
    with pytest.raises(ValueError, match="unknown convention 'jax'; known: equinox"):
        port(stats, source="jax", target="torch")
    with pytest.raises(ValueError, match="keras state has no 'moving_variance'"):
        port({"moving_mean": stats["moving_mean"]}, source="keras", target="torch")
    with pytest.raises(ValueError, match="moving_mean has 6, moving_variance has 5"):
        port({**stats, "moving_variance": np.ones(5)}, source="keras", target="torch")
    with pytest.raises(ValueError, match="gamma must be one value per channel"):
        port({**stats, "gamma": np.ones((2, C))}, source="keras", target="torch")
    with pytest.raises(ValueError, match="count must be"):
        port(stats, source="keras", target="torch", count=1)
    with pytest.raises(ValueError, match="haiku state has no 'decay_rate'"):
        port({"mean_ema": np.zeros(C), "var_ema": np.ones(C)}, source="haiku", target="torch")


_REFUSED = [
    # (changed keys, what the error says): each would otherwise port a wrong number.
    (
        {"moving_variance": [1.0, np.nan, 1, 1, 1, 1]},
        r"moving_variance is NaN or infinite in channel\(s\) \[1\]",
    ),
    (
        {"moving_variance": [1.0, 1, 1, 1, 1, np.inf]},
        r"moving_variance is NaN or infinite in channel\(s\) \[5\]",
    ),
    (
        {"moving_mean": [-np.inf, 0, 0, 0, 0, 0]},
        r"moving_mean is NaN or infinite in channel\(s\) \[0\]",
    ),
    ({"gamma": [np.nan] * C}, "gamma is NaN or infinite"),
    (
        {"moving_variance": [1.0, 1, -0.5, 1, 1, 1]},
        r"moving_variance is negative in channel\(s\) \[2\]",
    ),
    ({"gamma": np.ones(C + 1)}, "gamma has 7, beta has 6, moving_mean has 6"),
    ({"beta": np.ones(C - 2)}, "beta has 4"),
    ({"epsilon": np.nan}, "epsilon must be a finite number >= 0, got nan"),
    ({"epsilon": -1e-3}, "epsilon must be a finite number >= 0, got -0.001"),
    ({"epsilon": np.inf}, "epsilon must be a finite number >= 0, got inf"),
    ({"epsilon": None}, "epsilon must be a finite number >= 0, got None"),
    ({"epsilon": "1e-3"}, "keras epsilon must hold real numbers, got dtype <U4"),
    ({"momentum": "abc"}, "keras momentum must hold real numbers, got dtype <U3"),
    ({"momentum": [0.9, 0.9]}, "keras momentum must be one number"),
    ({"momentum": np.nan}, "keras momentum must lie in"),
    (
        {"moving_mean": np.array(["0.1"] * C)},
        "keras moving_mean must hold real numbers, got dtype <U3",
    ),
    ({"beta": ["a"] * C}, "keras beta must hold real numbers"),
    (
        {"moving_mean": [0.0, None, 0, 0, 0, 0]},
        "keras moving_mean must hold real numbers, got dtype object",
    ),
    (
        {"moving_mean": np.ones(C) * (1 + 2j)},
        r"keras moving_mean is complex \(complex128\): give real",
    ),
    ({"gamma": np.ones(C, dtype=bool)}, "keras gamma must hold real numbers, got dtype bool"),
]


@pytest.mark.parametrize(("changes", "message"), _REFUSED)
def test_a_wrong_number_is_refused_with_its_key_named(changes, message):
    with pytest.raises(ValueError, match=message):
        port({**_stats(), **changes}, source="keras", target="torch")


def test_a_state_that_is_not_a_mapping_is_a_type_error():
    for state in (None, [1, 2], np.ones(3)):
        with pytest.raises(TypeError, match="state must be a mapping of keras's names"):
            port(state, source="keras", target="torch")


def test_valid_edge_values_still_port():
    """A zero variance, eps=0 and integer arrays are real numbers: ported as given."""
    ported = port(
        {**_stats(), "moving_variance": np.zeros(C), "epsilon": 0, "moving_mean": np.arange(C)},
        source="keras",
        target="torch",
    )
    np.testing.assert_array_equal(ported.state["running_var"], np.zeros(C))
    np.testing.assert_array_equal(ported.state["running_mean"], np.arange(C, dtype=float))
    assert ported.state["eps"] == 0.0


def test_missing_parameters_stay_missing_and_defaults_are_noted():
    ported = port({"mean": np.zeros(3), "var": np.ones(3)}, source="flax", target="torch")
    assert "weight" not in ported.state and "bias" not in ported.state
    assert ported.state["momentum"] == pytest.approx(0.01)
    assert any("momentum not given: its default 0.99" in note for note in ported.notes)


def test_haiku_zero_debiased_average_matches_an_ema_kept_by_hand():
    rng = np.random.default_rng(7)
    decay, steps = 0.9, 5
    hidden = np.zeros(C)
    ema = EMA(momentum_from_decay(decay), debias=True)
    for _ in range(steps):
        batch = rng.normal(size=C)
        hidden = decay * hidden + (1 - decay) * batch  # Haiku's update, started at zero
        ema.update(batch, np.ones(C), count=2)
    average = debiased_average(hidden, decay=decay, steps=steps)
    np.testing.assert_allclose(average, ema.mean, rtol=1e-12)
    np.testing.assert_allclose(zero_debiased_hidden(average, decay=decay, steps=steps), hidden)
    state = {
        "mean_ema": {"hidden": hidden, "counter": steps},
        "var_ema": {"average": np.ones(C)},
        "decay_rate": decay,
    }
    ported = port(state, source="haiku", target="torch")
    np.testing.assert_allclose(ported.state["running_mean"], average)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        debiased_average(hidden, decay=decay, steps=0)


def test_the_python_examples_in_docs_conventions_md_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    assert "eps=0.001" in capsys.readouterr().out
