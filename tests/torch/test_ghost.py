"""bnstats.torch GhostBatchNorm1d/2d/3d against torch's BatchNorm run over each chunk in turn."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bnstats.torch.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d  # noqa: E402
from tests.torch.models import scramble_batchnorm  # noqa: E402

nn = torch.nn


def _pair(ghost_cls, bn_cls, ghost_size, momentum=0.1, track=True):
    bn = bn_cls(3, momentum=momentum, track_running_stats=track).double()
    scramble_batchnorm(bn, seed=2)
    ghost = ghost_cls(3, momentum=momentum, track_running_stats=track, ghost_size=ghost_size)
    ghost = ghost.double()
    ghost.load_state_dict(bn.state_dict())
    return ghost, bn


def _grads(out, x, module, upstream):
    out.backward(upstream)
    return out.detach(), x.grad, module.weight.grad, module.bias.grad


def _ghost_step(ghost, x, upstream):
    xt = x.clone().requires_grad_(True)
    ghost.zero_grad()
    return _grads(ghost(xt), xt, ghost, upstream)


def _chunked_step(bn, x, upstream, sizes):
    """torch's BatchNorm on each chunk in turn, outputs concatenated."""
    xt = x.clone().requires_grad_(True)
    bn.zero_grad()
    out = torch.cat([bn(chunk) for chunk in xt.split(sizes)])
    return _grads(out, xt, bn, upstream)


CASES = [
    (GhostBatchNorm2d, nn.BatchNorm2d, (10, 3, 2, 2), 4, [4, 4, 2]),
    (GhostBatchNorm2d, nn.BatchNorm2d, (9, 3, 2, 2), 4, [4, 5]),
    (GhostBatchNorm2d, nn.BatchNorm2d, (8, 3, 2, 2), 8, [8]),
    (GhostBatchNorm2d, nn.BatchNorm2d, (6, 3, 2, 2), 32, [6]),
    (GhostBatchNorm1d, nn.BatchNorm1d, (7, 3), 2, [2, 2, 3]),
    (GhostBatchNorm1d, nn.BatchNorm1d, (6, 3, 4), 3, [3, 3]),
    (GhostBatchNorm3d, nn.BatchNorm3d, (5, 3, 2, 2, 2), 2, [2, 3]),
]


@pytest.mark.parametrize(("ghost_cls", "bn_cls", "shape", "ghost_size", "sizes"), CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_equals_batch_norm_over_each_chunk_in_turn(
    ghost_cls, bn_cls, shape, ghost_size, sizes, momentum
):
    ghost, bn = _pair(ghost_cls, bn_cls, ghost_size, momentum)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
        upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
        mine = _ghost_step(ghost, x, upstream)
        theirs = _chunked_step(bn, x, upstream, sizes)
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[key], value, rtol=1e-12, atol=1e-12)
    assert int(ghost.num_batches_tracked) == 10 + 3 * len(sizes)
    ghost.eval()
    bn.eval()
    torch.testing.assert_close(ghost(x), bn(x), rtol=0, atol=0)


def test_whole_batch_ghost_is_exactly_batch_norm():
    ghost, bn = _pair(GhostBatchNorm2d, nn.BatchNorm2d, ghost_size=16)
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(ghost(x), bn(x))
    assert torch.equal(ghost.running_var, bn.running_var)


def test_without_running_statistics_eval_also_uses_ghosts():
    ghost, bn = _pair(GhostBatchNorm1d, nn.BatchNorm1d, ghost_size=3, track=False)
    ghost.eval()
    bn.eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), torch.cat([bn(c) for c in x.split([3, 3])]))


def test_float32_model_and_state_dict_both_ways():
    ghost = GhostBatchNorm2d(4, ghost_size=2)
    ghost(torch.randn(8, 4, 3, 3) * 3 + 1)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(ghost.state_dict())
    ghost.load_state_dict(bn.state_dict())
    assert int(bn.num_batches_tracked) == 4 and isinstance(ghost, nn.BatchNorm2d)
    assert "ghost_size=2" in repr(ghost)


def test_bad_ghost_size_and_input_name_the_module():
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d\(3\): ghost_size must be"):
        GhostBatchNorm2d(3, ghost_size=1)
    with pytest.raises(TypeError, match="ghost_size"):
        GhostBatchNorm2d(3)
    module = GhostBatchNorm1d(3, ghost_size=2)
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d\(3\) expects 3 channels.*\(4, 5\)"):
        module(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d\(3\).*\(1, 3\) in training"):
        module(torch.randn(1, 3))
    assert int(module.num_batches_tracked) == 0  # no virtual batch was normalized


@pytest.mark.parametrize("device_path", [False, True])
def test_bad_virtual_batches_under_skip_leave_the_weights_of_the_others_exact(device_path):
    """Two NaN virtual batches in one step under a step-dependent weight (the cumulative
    average): the host step went back once per step, not per virtual batch, so the later
    virtual batches were weighted wrongly (0.15 off) and the step count stayed ahead."""
    import bnstats

    layer = GhostBatchNorm1d(3, ghost_size=2, estimator=bnstats.CumulativeAverage(nonfinite="skip"))
    layer = layer.double()
    if device_path:
        layer._host_checked_devices = ()  # the GPU code path, on the CPU
    torch.manual_seed(0)
    x, later = torch.randn(8, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    x[0, 0] = x[2, 1] = float("nan")  # virtual batches 0 and 1
    layer(x)
    layer(later)
    good = [x[4:6], x[6:8], later[0:2], later[2:4]]
    assert layer._host_step == int(layer.num_batches_tracked) == 4
    expected_mean = torch.stack([chunk.mean(0) for chunk in good]).mean(0)
    expected_var = torch.stack([chunk.var(0) for chunk in good]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, expected_var, rtol=1e-12, atol=1e-12)
