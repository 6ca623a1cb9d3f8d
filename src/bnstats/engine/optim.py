"""Optimizers for the engine, with PyTorch's update rules so that the two can be compared.

Each ``step(parameters)`` takes ``(name, array, gradient)`` triples, as
:meth:`bnstats.engine.Network.parameters` gives them, and updates the arrays in place.
Per-parameter state is keyed by name.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

Parameters = Iterable[tuple[str, np.ndarray, np.ndarray | None]]


class Optimizer:
    """Shared: the learning rate and per-parameter state."""

    def __init__(self, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.lr = float(lr)
        self.state: dict[str, dict[str, np.ndarray]] = {}
        self.steps = 0

    def step(self, parameters: Parameters) -> None:
        self.steps += 1
        for name, param, grad in parameters:
            if grad is None:
                raise ValueError(f"parameter {name!r} has no gradient: run backward first")
            self._update(self.state.setdefault(name, {}), param, grad)

    def _update(self, state: dict[str, np.ndarray], param: np.ndarray, grad: np.ndarray) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """``param -= lr * grad``."""

    def _update(self, state: dict[str, np.ndarray], param: np.ndarray, grad: np.ndarray) -> None:
        param -= self.lr * grad


class Momentum(Optimizer):
    """SGD with momentum, PyTorch's form: ``v = beta * v + grad``; ``param -= lr * v``.

    (The lecture's ``v = beta * v + (1 - beta) * grad`` is the same with ``lr`` scaled by
    ``1 - beta``.) ``v`` starts at the first gradient, as in ``torch.optim.SGD``.
    """

    def __init__(self, lr: float = 0.01, beta: float = 0.9) -> None:
        super().__init__(lr)
        self.beta = float(beta)

    def _update(self, state: dict[str, np.ndarray], param: np.ndarray, grad: np.ndarray) -> None:
        if "v" not in state:
            state["v"] = grad.copy()
        else:
            state["v"] = self.beta * state["v"] + grad
        param -= self.lr * state["v"]


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) as in ``torch.optim.Adam``::

    m = beta1 * m + (1 - beta1) * grad;   v = beta2 * v + (1 - beta2) * grad**2
    param -= lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)

    def _update(self, state: dict[str, np.ndarray], param: np.ndarray, grad: np.ndarray) -> None:
        if "m" not in state:
            state["m"], state["v"] = np.zeros_like(param), np.zeros_like(param)
        state["m"] = self.beta1 * state["m"] + (1 - self.beta1) * grad
        state["v"] = self.beta2 * state["v"] + (1 - self.beta2) * grad * grad
        m_hat = state["m"] / (1 - self.beta1**self.steps)
        v_hat = state["v"] / (1 - self.beta2**self.steps)
        param -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
