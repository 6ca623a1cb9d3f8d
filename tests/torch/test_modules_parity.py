"""bnstats' BatchNorm1d/2d/3d against torch's own, on torch's own test samples.

torch ships the samples its module tests run (``torch.testing._internal.common_modules``:
for each of ``nn.BatchNorm1d/2d/3d`` the constructor arguments and inputs, affine or not,
tracking or not, cumulative average, an empty batch). Each sample runs on torch's module and
on bnstats' with the same parameters and buffers, in training and eval mode, and the outputs
and buffers must agree bit for bit. Empty batches get their own test in every dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnstats.torch as bt
from tests.optional import optional_import

OURS = {
    nn.BatchNorm1d: bt.BatchNorm1d,
    nn.BatchNorm2d: bt.BatchNorm2d,
    nn.BatchNorm3d: bt.BatchNorm3d,
}


def _samples() -> list:
    optional_import("expecttest")  # torch's test helpers import it
    from torch.testing._internal.common_modules import module_db

    cases = []
    for info in module_db:
        if info.module_cls not in OURS:
            continue
        for dtype in (torch.float32, torch.float64):
            for training in (True, False):
                inputs = info.module_inputs_func(
                    info, device="cpu", dtype=dtype, requires_grad=False, training=training
                )
                for sample in inputs:
                    name = f"{info.name}-{sample.desc or 'default'}-{dtype}-train={training}"
                    cases.append(pytest.param(info.module_cls, sample, dtype, training, id=name))
    return cases


def _twins(cls: type, sample, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """torch's module with random parameters and statistics, and bnstats' with the same."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    theirs = cls(*args, **kwargs).to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, value in theirs.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=gen, dtype=dtype) + 0.5)
            elif key.endswith("num_batches_tracked"):
                value.fill_(3)
    ours = OURS[cls](*args, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize(("cls", "sample", "dtype", "training"), _samples())
def test_torchs_own_samples_give_torchs_outputs_and_buffers(cls, sample, dtype, training):
    theirs, ours = _twins(cls, sample, dtype)
    theirs.train(training)
    ours.train(training)
    for _ in range(2):  # the second step starts from the updated buffers
        args = [copy.deepcopy(a) for a in sample.forward_input.args]
        expected = theirs(*args, **sample.forward_input.kwargs)
        got = ours(*args, **sample.forward_input.kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (0, 3, 2, 2), (2, 3, 0, 2), (0, 3, 1, 2, 2)])
def test_an_empty_training_batch_does_what_torch_does(dtype, momentum, shape):
    """Empty output of the input's shape and dtype, statistics unchanged, the batch counted;
    the next batch then weighs as in torch (the cumulative average counts the empty one)."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    theirs = cls(3, momentum=momentum)
    with torch.no_grad():
        theirs.running_mean.uniform_(-1, 1)
        theirs.running_var.uniform_(0.5, 2)
    ours = OURS[cls](3, momentum=momentum)
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(dtype).train(), ours.to(dtype).train()
    before = ours.running_mean.clone(), ours.running_var.clone()
    x = torch.randn(shape).to(dtype)
    expected, got = theirs(x), ours(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    full = torch.randn(4, *shape[1:2], *(2 for _ in shape[2:])).to(dtype)
    theirs(full), ours(full)
    exact = dtype in (torch.float32, torch.float64)  # narrow: torch rounds its statistics
    rounding = 0.0 if exact else 2 * torch.finfo(dtype).eps
    tolerance = {"rtol": rounding, "atol": rounding}
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(
            getattr(ours, key), getattr(theirs, key).to(getattr(ours, key).dtype), **tolerance
        )


def test_a_batch_of_one_value_per_channel_is_refused_as_torch_refuses_it():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3).train()(torch.randn(1, 3))
    with pytest.raises(ValueError, match="fewer than 2 values per channel"):
        bt.BatchNorm1d(3).train()(torch.randn(1, 3))


def _refusal(module, x):
    """The exception type ``module(x)`` raises (None if it runs)."""
    try:
        module(x)
    except (ValueError, RuntimeError) as error:
        return type(error)
    return None


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    ("cls", "refused"),
    [
        (nn.BatchNorm1d, (1, 3)),  # one value per channel
        (nn.BatchNorm2d, (1, 3, 1, 1)),
        (nn.BatchNorm1d, (4, 5)),  # wrong channels
        (nn.BatchNorm2d, (4, 5, 2, 2)),
    ],
)
def test_a_refused_training_batch_is_counted_as_torch_counts_it(cls, refused, momentum):
    """torch's forward counts a training batch before its kernel refuses it: the count, and
    the cumulative average's next weight, move on as in torch; an eval batch is not counted."""
    theirs = cls(3, momentum=momentum)
    ours = OURS[cls](3, momentum=momentum)
    shape = (4, 3, *refused[2:])
    for mode in ("train", "train", "eval"):
        theirs.train(mode == "train"), ours.train(mode == "train")
        batch = torch.randn(refused)  # in eval mode one value per channel is fine
        expected = None if _refusal(theirs, batch) is None else ValueError
        assert _refusal(ours, batch) is expected and (mode == "eval" or expected)
        x = torch.randn(*shape[:2], *(2 for _ in shape[2:]))
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    assert int(ours.num_batches_tracked) == 4


@pytest.mark.parametrize("cls", list(OURS))
@pytest.mark.parametrize("training", [True, False])
def test_without_per_channel_tensors_any_channel_count_runs_as_in_torch(cls, training):
    theirs = cls(3, affine=False, track_running_stats=False).train(training)
    ours = OURS[cls](3, affine=False, track_running_stats=False).train(training)
    rank = {nn.BatchNorm1d: 3, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}[cls]
    x = torch.randn(4, 7, *(3 for _ in range(rank - 2)))
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"BatchNorm\dd\(3\) expects 3 channels"):
        OURS[cls](3, track_running_stats=False).train(training)(x)


@pytest.mark.parametrize("how", ["compile", "fx"])
def test_an_empty_batch_changes_no_statistics_when_traced(how):
    eager = bt.BatchNorm2d(3, momentum=None).train()
    with torch.no_grad():
        eager.running_mean.uniform_(-1, 1)
    twin = copy.deepcopy(eager)
    run = (
        torch.compile(twin, fullgraph=True, backend="eager")
        if how == "compile"
        else torch.fx.symbolic_trace(twin)
    )
    for x in (torch.randn(4, 3, 2, 2), torch.randn(0, 3, 2, 2), torch.randn(4, 3, 2, 2)):
        assert run(x).shape == eager(x).shape
    state = twin.state_dict() if how == "compile" else run.state_dict()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
    assert int(state["num_batches_tracked"]) == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("assign", [False, True])
def test_loading_narrow_statistics_keeps_them_in_float32(dtype, assign):
    theirs = nn.BatchNorm2d(3)
    with torch.no_grad():
        theirs.running_var.uniform_(0.5, 2)
    state = theirs.to(dtype).state_dict()
    ours = bt.BatchNorm2d(3).to(dtype)
    ours.load_state_dict(state, assign=assign)
    for key in ("running_mean", "running_var"):
        assert getattr(ours, key).dtype == torch.float32
        assert torch.equal(getattr(ours, key), state[key].float())
    assert ours.weight.dtype == dtype
    assert ours(torch.randn(4, 3, 2, 2).to(dtype)).dtype == dtype
