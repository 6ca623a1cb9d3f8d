"""Optimizers against torch.optim on one parameter, several steps."""

from __future__ import annotations

import numpy as np
import pytest

from bnstats.engine import SGD, Adam, Momentum

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: SGD(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (lambda: Momentum(0.1, 0.8), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8)),
        (
            lambda: Adam(0.01, (0.8, 0.95), 1e-6),
            lambda p: torch.optim.Adam(p, 0.01, (0.8, 0.95), 1e-6),
        ),
    ],
)
def test_updates_equal_torch(rng, ours, theirs):
    param = rng.normal(size=(3, 4))
    tparam = torch.tensor(param.copy(), requires_grad=True)
    opt, topt = ours(), theirs([tparam])
    for _ in range(6):
        grad = rng.normal(size=(3, 4))
        tparam.grad = torch.tensor(grad.copy())
        opt.step([("w", param, grad)])
        topt.step()
    np.testing.assert_allclose(param, tparam.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_missing_gradient_and_bad_learning_rate():
    with pytest.raises(ValueError, match="no gradient"):
        SGD(0.1).step([("w", np.zeros(2), None)])
    with pytest.raises(ValueError, match="positive"):
        Adam(0.0)
