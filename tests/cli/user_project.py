"""A user's project for the PyTorch commands' tests: ``usermodels.py`` (models and batch
sources, some failing on purpose) and ``data.npz`` (30 inputs of shape (2, 6, 6))."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import numpy as np
import torch

USER_MODULE = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    return model

def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 2, 6, 6, generator=gen) * 2 + 1, torch.zeros(n)) for n in (5, 9, 4)]

def lazy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d(), nn.Linear(4, 4), nn.BatchNorm1d(4))

def failing_batches():
    return [torch.ones(4, 2, 6, 6)] + [1 / 0]

class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(x).no_such_method()

def odd():
    return Odd()

def broken():
    return nn.Sequential(nn.Linear(7, 2), nn.BatchNorm1d(2))

instance = make()
"""


def make_project(tmp_path: Path) -> Path:
    """``tmp_path`` with ``usermodels.py`` and ``data.npz`` in it."""
    (tmp_path / "usermodels.py").write_text(textwrap.dedent(USER_MODULE))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", X=(rng.normal(size=(30, 2, 6, 6)) * 2 + 1).astype(np.float32))
    return tmp_path


def user_module(project: Path):
    """The test's usermodels.py, imported here without touching sys.path or sys.modules."""
    spec = importlib.util.spec_from_file_location("usermodels_here", project / "usermodels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stale_weights(project: Path):
    """A checkpoint whose running statistics are wrong: still at their start, 0 and 1."""
    model = user_module(project).make()
    with torch.no_grad():
        model[1].weight.mul_(1.5)
    torch.save(model.state_dict(), project / "weights.pt")
    return model
