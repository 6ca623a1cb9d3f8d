"""bnstats.torch BatchRenorm1d/2d/3d against torch's own BatchNorm and autograd."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bnstats.renorm import RenormSchedule  # noqa: E402
from bnstats.torch.renorm import (  # noqa: E402
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    batch_renorm,
)
from tests.torch.models import scramble_batchnorm  # noqa: E402

BN_LIKE = RenormSchedule(rmax=1.0, dmax=0.0)
TIGHT = RenormSchedule.constant(1.5, 0.4)


def _pair(renorm_cls, bn_cls, dtype, momentum=0.1, schedule=BN_LIKE, features=3):
    bn = bn_cls(features, momentum=momentum).to(dtype)
    scramble_batchnorm(bn, seed=1)
    renorm = renorm_cls(features, momentum=momentum, schedule=schedule).to(dtype)
    renorm.load_state_dict(bn.state_dict())
    return renorm, bn


def _step(module, x, upstream):
    xt = x.clone().requires_grad_(True)
    module.zero_grad()
    out = module(xt)
    out.backward(upstream)
    return out.detach(), xt.grad, module.weight.grad.clone(), module.bias.grad.clone()


@pytest.mark.parametrize(
    ("renorm_cls", "bn_cls", "shape"),
    [
        (BatchRenorm2d, nn.BatchNorm2d, (4, 3, 5, 5)),
        (BatchRenorm1d, nn.BatchNorm1d, (6, 3)),
        (BatchRenorm1d, nn.BatchNorm1d, (4, 3, 7)),
        (BatchRenorm3d, nn.BatchNorm3d, (2, 3, 2, 3, 3)),
    ],
)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_rmax_1_dmax_0_equals_torch_batch_norm(renorm_cls, bn_cls, shape, dtype, tol, momentum):
    renorm, bn = _pair(renorm_cls, bn_cls, dtype, momentum)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype)
        upstream = torch.randn(shape, generator=gen).to(dtype)  # sum() has zero grad through BN
        for mine, theirs in zip(_step(renorm, x, upstream), _step(bn, x, upstream), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(renorm.state_dict()[key], value, rtol=tol, atol=tol)
    assert torch.equal(renorm.last_r, torch.ones(3, dtype=dtype))
    renorm.eval()
    bn.eval()
    torch.testing.assert_close(renorm(x), bn(x), rtol=0, atol=0)


def test_the_paper_schedule_is_batch_norm_during_warmup():
    renorm, bn = _pair(BatchRenorm2d, nn.BatchNorm2d, torch.float64, schedule=None)
    assert renorm.schedule == RenormSchedule()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64) * 3 + 2
    torch.testing.assert_close(renorm(x), bn(x), rtol=1e-12, atol=1e-12)


def _frozen(schedule: RenormSchedule = TIGHT):
    """A BatchRenorm2d whose buffers cannot move (momentum 0) and whose limits are constant, so
    r and d stay fixed whatever the input: what gradcheck needs."""
    module = BatchRenorm2d(3, momentum=0.0, schedule=schedule).double()
    scramble_batchnorm(module, seed=3)
    return module


def test_gradcheck_with_r_and_d_held_constant():
    """gradcheck perturbs the input, which would move r and d inside the module, so the check
    runs on the functional form with r and d given (the module's own, for a real batch)."""
    module = _frozen()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 2, 2, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    r, d = module.correction(x)
    assert ((r > 1 / 1.5) & (r < 1.5)).any() and (d.abs() == 0.4).any(), "clipped and not"
    weight = module.weight.detach().clone().requires_grad_()
    bias = module.bias.detach().clone().requires_grad_()

    def forward(x, weight, bias):
        return batch_renorm(x, r, d, weight, bias, eps=module.eps)

    inputs = (x.requires_grad_(), weight, bias)
    assert torch.autograd.gradcheck(forward, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    module.train()
    torch.testing.assert_close(module(x), forward(*inputs), rtol=1e-12, atol=1e-12)


def test_no_gradient_flows_through_r_and_d():
    """With r, d constants, the input gradient is batch norm's for the upstream gradient scaled
    by r (torch's own BatchNorm2d computes it), and weight's is sum(upstream * (r x_hat + d))."""
    module = _frozen(RenormSchedule.constant(1e6, 1e6))  # never clips
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    r, d = (t.view(1, -1, 1, 1) for t in module.correction(x))
    out, dx, dweight, dbias = _step(module, x, upstream)
    reference = nn.BatchNorm2d(3, track_running_stats=False).double()
    reference.load_state_dict(
        {k: v for k, v in module.state_dict().items() if k in ("weight", "bias")}
    )
    xt = x.clone().requires_grad_(True)
    bn_out = reference(xt)
    bn_out.backward(upstream * r)
    torch.testing.assert_close(dx, xt.grad, rtol=1e-10, atol=1e-12)
    x_hat = (bn_out.detach() - reference.bias.view(1, -1, 1, 1)) / reference.weight.view(
        1, -1, 1, 1
    )
    torch.testing.assert_close(dweight, (upstream * (r * x_hat + d)).sum((0, 2, 3)))
    torch.testing.assert_close(dbias, upstream.sum((0, 2, 3)))
    # Unclipped, the output is the inference output, whose gradient is weight / sigma:
    # had r and d carried gradient, the input gradient would be exactly that.
    module.eval()
    torch.testing.assert_close(out, module(x).detach(), rtol=1e-10, atol=1e-12)
    sigma = (module.running_var + module.eps).sqrt().view(1, -1, 1, 1)
    inference_grad = upstream * module.weight.detach().view(1, -1, 1, 1) / sigma
    assert not torch.allclose(dx, inference_grad, rtol=1e-3)


def test_schedule_step_is_num_batches_tracked():
    schedule = RenormSchedule(rmax=2.0, dmax=1.0, warmup_steps=2, rmax_full_at=4, dmax_full_at=3)
    module = BatchRenorm1d(4, schedule=schedule).double()
    gen = torch.Generator().manual_seed(4)
    for step in range(6):
        module(torch.randn(5, 4, generator=gen, dtype=torch.float64) * 3 + 5)
        rmax, dmax = schedule.limits(step)
        assert bool((module.last_r <= rmax).all() and (module.last_r >= 1 / rmax).all())
        assert bool((module.last_d.abs() <= dmax).all())
        if step < 3:
            assert torch.equal(module.last_d, torch.zeros(4, dtype=torch.float64))
    assert int(module.num_batches_tracked) == 6
    assert bool((module.last_d.abs() > 0).all()), "the correction was active at the end"


def test_state_dict_loads_both_ways_and_eval_is_batch_norm():
    renorm = BatchRenorm2d(5, schedule=RenormSchedule.constant(3, 5))
    for _ in range(3):
        renorm(torch.randn(2, 5, 3, 3) * 2 + 1)
    bn = nn.BatchNorm2d(5)
    bn.load_state_dict(renorm.state_dict())
    assert list(bn.state_dict()) == list(renorm.state_dict())
    renorm.eval(), bn.eval()
    x = torch.randn(1, 5, 3, 3)
    torch.testing.assert_close(renorm(x), bn(x), rtol=0, atol=0)
    assert isinstance(renorm, nn.BatchNorm2d)


def test_bad_input_names_the_module_and_the_shape():
    module = BatchRenorm2d(3)
    with pytest.raises(ValueError, match=r"BatchRenorm2d\(3\).*4D.*\(2, 3, 5\)"):
        module(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"BatchRenorm2d\(3\) expects 3 channels.*\(2, 4, 2, 2\)"):
        module(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match=r"BatchRenorm1d\(3\).*\(1, 3\) in training"):
        BatchRenorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        BatchRenorm2d(3, track_running_stats=False)
    assert int(module.num_batches_tracked) == 0
