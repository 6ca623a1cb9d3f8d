"""Training on the digits once per seed, shared by comparisons e) and f).

Both the engine's MLP and a small torch CNN are trained with every test-time estimator fed
side by side from the same batches, so that the estimators differ and nothing else:

- engine: ``Network.mlp([64, 128, 64, 10])`` with the estimators as the BatchNorm layers'
  own (the engine keeps any number per layer);
- torch: ``DigitsCNN`` with torch's ``nn.BatchNorm2d`` (its running buffers are torch's
  EMA(0.1)); a forward hook on each BN layer takes the batch's mean and biased variance
  (``torch.var_mean``, float64) and feeds the same bnstats estimators.

Adam(1e-3), batch 64, shuffled per epoch, ``config.epochs`` epochs; results are cached per
(seed, epochs) so that e) and f) in one run train once. Callers must not change the cached
models (they deep-copy before writing statistics).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.models import DigitsCNN

BATCH = 64
HIDDEN = (128, 64)


def estimator_templates() -> dict[str, Any]:
    """The running estimators compared, by display name."""
    import bnstats

    return {
        "EMA(0.1)": bnstats.EMA(0.1),
        "EMA(0.01)": bnstats.EMA(0.01),
        "EMA(0.1, debias)": bnstats.EMA(0.1, debias=True),
        "EMA(0.01, debias)": bnstats.EMA(0.01, debias=True),
        "cumulative": bnstats.CumulativeAverage(),
    }


@dataclass
class TrainedCNN:
    """The trained torch model (running buffers: torch's EMA(0.1)) and, per BN layer name,
    the estimators fed during training."""

    model: nn.Module
    estimators: dict[str, dict[str, Any]]


@functools.lru_cache(maxsize=16)
def digits(seed: int) -> Any:
    """The digits split for ``seed`` (stratified, a quarter for testing)."""
    from bnstats.data import load_digits

    return load_digits(seed=seed)


@functools.lru_cache(maxsize=16)
def train_engine(seed: int, epochs: int) -> Any:
    """The engine's MLP trained on ``digits(seed)``, every estimator side by side, then
    recalibrated (estimator ``"population"``)."""
    from bnstats.engine import Adam, Network

    data = digits(seed)
    net = Network.mlp(
        [data.features, *HIDDEN, data.classes], seed=seed, estimators=estimator_templates()
    )
    drop_last = len(data.X_train) % BATCH == 1
    net.fit(
        data.X_train,
        data.y_train,
        epochs=epochs,
        batch_size=BATCH,
        optimizer=Adam(1e-3),
        seed=seed,
        drop_last=drop_last,
        record=False,
    )
    net.recalibrate(data.X_train, batch_size=BATCH)
    return net


def _feeding_hook(estimators: dict[str, Any]) -> Any:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not module.training:
            return
        x = args[0].detach().double()
        axes = (0, *range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=axes, correction=0)
        for estimator in estimators.values():
            estimator.update(mean, var, x.numel() // x.shape[1])

    return hook


@functools.lru_cache(maxsize=16)
def train_cnn(seed: int, epochs: int) -> TrainedCNN:
    """``DigitsCNN`` trained on ``digits(seed)``, every estimator fed side by side."""
    import copy

    data = digits(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    estimators = {name: copy.deepcopy(estimator_templates()) for name in layers}
    handles = [
        layer.register_forward_pre_hook(_feeding_hook(estimators[name]))
        for name, layer in layers.items()
    ]
    X = torch.as_tensor(data.X_train, dtype=torch.float32)
    y = torch.as_tensor(data.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    try:
        for _ in range(epochs):
            for rows in torch.randperm(len(X), generator=gen).split(BATCH):
                if len(rows) < 2:
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(X[rows]), y[rows]).backward()
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    model.eval()
    return TrainedCNN(model, estimators)


def torch_accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    """Eval-mode accuracy of ``model`` on ``(X, y)``, in percent."""
    model.eval()
    with torch.inference_mode():
        logits = model(torch.as_tensor(X, dtype=torch.float32))
    return 100.0 * float((logits.argmax(1).numpy() == y).mean())


def train_batches(X: np.ndarray, batch: int = BATCH) -> list[torch.Tensor]:
    """``X`` as float32 tensors of ``batch`` rows (the last may be shorter, never 1 row)."""
    tensors = list(torch.as_tensor(X, dtype=torch.float32).split(batch))
    if len(tensors) > 1 and len(tensors[-1]) == 1:
        tensors[-2] = torch.cat(tensors[-2:])
        tensors.pop()
    return tensors
