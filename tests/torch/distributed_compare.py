"""Comparing the ranks' results with each other and with one process on all the batches."""

from __future__ import annotations

import torch
from torch import nn

import bnstats.torch as bt
from tests.torch import distributed_scenarios as sc
from tests.torch import reference as ref

RTOL = 1e-6
"""Running means within 1e-6 standard deviations, variances within 1e-6 relative."""


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(ref.bits(a[key]), ref.bits(b[key])), key


def max_relative_difference(got: dict, expected: dict, integers: bool = True) -> float:
    """The largest difference between two states' running statistics, relative to their
    scale: ``|running_mean - expected| / sqrt(expected_var)`` (in standard deviations: a
    relative error of a mean near 0 says nothing) and ``|running_var - expected| /
    expected``. Every other tensor must be equal, ``num_batches_tracked`` too unless
    ``integers=False``."""
    assert got.keys() == expected.keys()
    worst = 0.0
    for key, value in expected.items():
        if key.endswith("running_mean"):
            scale = expected[key.replace("running_mean", "running_var")].double().sqrt()
        elif key.endswith("running_var"):
            scale = value.double()
        elif not value.is_floating_point() and not integers:
            continue
        else:
            assert torch.equal(got[key], value), key
            continue
        worst = max(worst, float(((got[key].double() - value.double()).abs() / scale).max()))
    return worst


def single_process(model: nn.Module, batches, **kwargs) -> dict[str, torch.Tensor]:
    bt.recalibrate(model, batches, **kwargs)
    return ref.snapshot(model)


def concatenated(name: str) -> list[torch.Tensor]:
    return sc.rank_batches(name, 0) + sc.rank_batches(name, 1)


def assert_both_equal_reference(results: tuple[dict, dict], expected: dict) -> None:
    first, second = (r["state"] for r in results)
    assert_bit_identical(first, second)
    assert max_relative_difference(first, expected) <= RTOL
