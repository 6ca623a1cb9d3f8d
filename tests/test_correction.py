"""bnstats._correction: the subset iteration's map from the subset's populations to the whole
data's, in NumPy and in torch's tensors (the same numbers)."""

from __future__ import annotations

import numpy as np

from bnstats._correction import Correction, LayerMap
from bnstats._host_subset import NUMPY_MATH
from tests.optional import optional_import


def statistics(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    mean_s, var_s = rng.normal(size=5), rng.uniform(0.5, 1.5, size=5)
    mean_w, var_w = rng.normal(size=5), rng.uniform(0.5, 1.5, size=5)
    var_s[2] = 0.0  # a channel constant over the subset: shifted
    return mean_s, var_s, mean_w, var_w


def test_the_correction_maps_the_subsets_statistics_onto_the_whole_datas(rng):
    mean_s, var_s, mean_w, var_w = statistics(rng)
    correct = Correction(
        {"bn": (mean_s, var_s)}, {"bn": (mean_w, var_w), "other": (mean_w, var_w)}, NUMPY_MATH
    )
    mean, var = correct({"bn": (mean_s, var_s)})["bn"]
    np.testing.assert_allclose(mean, mean_w)
    np.testing.assert_allclose(var, var_w)
    # an affine change of the subset's input (scale 3, shift 1) moves the whole data's alike
    mean, var = correct({"bn": (3 * mean_s + 1, 9 * var_s)})["bn"]
    keep = np.arange(5) != 2
    a = np.sqrt(var_w / np.where(keep, var_s, 1.0))
    np.testing.assert_allclose(mean[keep], (mean_w + a * (2 * mean_s + 1))[keep])
    np.testing.assert_allclose(var[keep], (9 * var_w)[keep])
    assert var[2] == var_w[2]  # 9 * 0 + var_w
    untouched = (np.zeros(5), np.ones(5))
    assert correct({"unseen": untouched})["unseen"] is untouched
    assert set(correct.maps) == {"bn"}  # no map where the subset has no population


def test_a_layer_map_converted_maps_alike(rng):
    """The host frameworks apply a layer's map inside their forward, converted to their
    arrays: float32 here, the same numbers to float32 rounding."""
    mean_s, var_s, mean_w, var_w = statistics(rng)
    layer_map = Correction({"bn": (mean_s, var_s)}, {"bn": (mean_w, var_w)}, NUMPY_MATH).maps["bn"]
    as_float32 = layer_map.converted(lambda value: np.asarray(value, np.float32))
    assert isinstance(as_float32, LayerMap) and as_float32.scale.dtype == np.float32
    mean, var = rng.normal(size=5), rng.uniform(0.5, 1.5, size=5)
    expected = layer_map(mean, var)
    got = as_float32(mean.astype(np.float32), var.astype(np.float32))
    for value, reference in zip(got, expected, strict=True):
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, reference, rtol=1e-6, atol=1e-6)


def test_torch_tensors_are_mapped_to_the_same_numbers(rng):
    torch = optional_import("torch")
    from bnstats.torch._subset_iteration import TORCH_MATH

    mean_s, var_s, mean_w, var_w = statistics(rng)
    given = ({"bn": (mean_s, var_s)}, {"bn": (mean_w, var_w)})
    tensors = [{k: tuple(map(torch.from_numpy, pair)) for k, pair in d.items()} for d in given]
    mean, var = rng.normal(size=5), rng.uniform(0.5, 1.5, size=5)
    expected = Correction(*given, NUMPY_MATH).layer("bn", (mean, var))
    got = Correction(*tensors, TORCH_MATH).layer(
        "bn", (torch.from_numpy(mean).float(), torch.from_numpy(var).float())
    )
    for value, reference in zip(got, expected, strict=True):
        assert value.dtype == torch.float64  # aligned to the map's float64
        np.testing.assert_allclose(value.numpy(), reference, rtol=1e-7)
