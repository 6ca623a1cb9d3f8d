"""The distributed pieces that need no process group: defaults, arguments, restoring
SyncBatchNorm, the pooling formula, the error message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnstats.torch as bt
from bnstats.torch._level import local_batch_statistics
from bnstats.torch._ranks import RankError, resolve_group
from bnstats.torch.distributed import pooled_moments, sync_running_stats
from tests.torch import reference as ref
from tests.torch import zoo
from tests.torch.distributed_compare import assert_bit_identical, concatenated, single_process


def test_without_a_group_every_setting_is_the_single_process_pass():
    assert resolve_group(None) is None and resolve_group(False) is None
    data = concatenated("mlp")
    expected = single_process(zoo.build("mlp"), data)
    assert_bit_identical(single_process(zoo.build("mlp"), data, group=False), expected)
    assert_bit_identical(single_process(zoo.build("mlp"), data, group=None), expected)
    model = zoo.build("mlp")
    before = ref.snapshot(model)
    assert sync_running_stats(model) is model and ref.same_state(model, before)


@pytest.mark.parametrize("group", ["world", 0, True])
def test_a_group_that_is_not_a_process_group_raises_type_error(group):
    with pytest.raises(TypeError, match="group must be None"):
        bt.recalibrate(zoo.build("mlp"), concatenated("mlp"), group=group)


def test_syncbatchnorm_keeps_its_own_forward_through_a_pass_and_an_error():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(zoo.build("resnet"))
    layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    patched = layers[0].forward = lambda x: x  # an instance attribute set by someone else
    with pytest.raises(RuntimeError):  # 5 channels where the first convolution takes 3
        bt.recalibrate(model, [torch.randn(4, 3, 10, 10), torch.randn(4, 5, 10, 10)])
    assert layers[0].__dict__["forward"] is patched
    assert all("forward" not in m.__dict__ for m in layers[1:])
    with local_batch_statistics(model):  # no process group: nothing to make local
        assert all("forward" not in m.__dict__ for m in layers[1:])
        assert all(m.running_mean is not None for m in layers)


def test_pooled_moments_is_the_mixture_mean_and_variance(rng):
    means, variances = rng.normal(size=(3, 4)), rng.uniform(0.5, 2.0, size=(3, 4))
    weights = [2.0, 0.0, 5.0]
    triples = zip(weights, means, variances, strict=True)
    parts = [(w, 0.0, torch.tensor(m), torch.tensor(v)) for w, m, v in triples]
    mean, var = pooled_moments(parts)
    # the mixture of N(mean_k, var_k) with probabilities w_k / sum(w): law of total variance
    p = np.array(weights)[:, None] / sum(weights)
    mixture_mean = (p * means).sum(0)
    np.testing.assert_allclose(mean.numpy(), mixture_mean, rtol=1e-14)
    second_moment = (p * (variances + means**2)).sum(0)
    np.testing.assert_allclose(var.numpy(), second_moment - mixture_mean**2, rtol=1e-12)
    equal_mean, _ = pooled_moments([(0.0, *part[1:]) for part in parts])
    np.testing.assert_allclose(equal_mean.numpy(), means.mean(0), rtol=1e-14)


def test_rank_error_names_every_failed_rank():
    error = RankError.of_ranks({2: "ValueError: bad", 0: "OSError: gone"}, 4, "failed")
    assert str(error).startswith("ranks 0, 2 of 4 failed, so no rank changed its statistics.")
    assert "rank 0: OSError: gone; rank 2: ValueError: bad" in str(error)


def test_packing_and_merging_two_shards_equals_one_pass_over_both():
    """What every rank does with the gathered tensors, simulated in one process: rank 0's and
    rank 1's collections packed, then merged in rank order, equal the collection of one pass
    over the concatenated batches (a rank that reached no layer contributes nothing)."""
    from bnstats.torch._pass import collect_moments, merge_ranks, rank_records
    from bnstats.torch._ranks import pack, unpack
    from bnstats.torch.options import PassOptions
    from tests.torch.distributed_scenarios import rank_batches

    model = zoo.build("resnet")
    shards = [rank_batches("resnet", 0), rank_batches("resnet", 1)]
    options = PassOptions()
    parts = [collect_moments(model, shard, options) for shard in shards]
    empty = collect_moments(model, [], options, check_coverage=False)
    sent = [rank_records(measured) for measured in (parts[0], empty, parts[1])]
    merged = merge_ranks(parts[0], [unpack(pack(records), sizes) for records, sizes in sent])
    whole = collect_moments(model, shards[0] + shards[1], options)
    for name, measured in whole.layers.items():
        got, expected = merged[name].population, measured.population
        assert got.count == expected.count and merged[name].batches == measured.batches
        torch.testing.assert_close(got.mean, expected.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.m2, expected.m2, rtol=1e-10, atol=1e-10)
