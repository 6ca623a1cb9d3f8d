"""Ghost Batch Norm (Hoffer, Hubara & Soudry 2017): each training batch normalized in virtual
batches of ``ghost_size`` consecutive rows, each with its own ``mu`` and biased ``var``; the
running statistics take one update per virtual batch. At test time it is batch norm.

The split, shared by the engine and the torch modules: chunks of ``ghost_size`` rows, the last
may be smaller, a last chunk of ONE row joins the one before it (batch norm cannot train on
one value per channel). :func:`ghost_batch_norm_forward` is the NumPy arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnstats import functional as F


def check_ghost_size(ghost_size: int, where: str = "ghost batch norm") -> int:
    """``ghost_size`` as an int, or a ValueError naming ``where``: at least 2 rows."""
    if isinstance(ghost_size, bool) or int(ghost_size) != ghost_size or ghost_size < 2:
        raise ValueError(f"{where}: ghost_size must be a whole number >= 2, got {ghost_size!r}")
    return int(ghost_size)


def ghost_sizes(rows: int, ghost_size: int) -> list[int]:
    """Rows in each virtual batch of a batch of ``rows``: ``ghost_size`` each, the remainder last,
    a remainder of one row merged into the previous chunk. ``ghost_sizes(10, 4) == [4, 4, 2]``,
    ``ghost_sizes(9, 4) == [4, 5]``, ``ghost_sizes(3, 4) == [3]``."""
    ghost_size = check_ghost_size(ghost_size)
    if rows <= ghost_size:
        return [rows]
    sizes = [ghost_size] * (rows // ghost_size)
    remainder = rows % ghost_size
    if remainder == 1:
        sizes[-1] += 1
    elif remainder:
        sizes.append(remainder)
    return sizes


def ghost_slices(rows: int, ghost_size: int) -> list[slice]:
    """The row slices of :func:`ghost_sizes`, in order."""
    slices, start = [], 0
    for size in ghost_sizes(rows, ghost_size):
        slices.append(slice(start, start + size))
        start += size
    return slices


@dataclass
class GhostCache:
    """Batch norm's cache of each virtual batch, with the rows it covers."""

    parts: list[tuple[slice, F.BatchNormCache]]

    def backward(self, dz_tilde: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch norm's backward per virtual batch; ``dgamma`` and ``dbeta`` sum over them."""
        d = np.asarray(dz_tilde, dtype=np.float64)
        dz = np.empty(d.shape, dtype=np.float64)
        dgamma = dbeta = np.zeros(d.shape[1])
        for rows, cache in self.parts:
            dz[rows], dgamma_s, dbeta_s = cache.backward(d[rows])
            dgamma, dbeta = dgamma + dgamma_s, dbeta + dbeta_s
        return dz, dgamma, dbeta

    def batch_moments(self) -> list[F.Moments]:
        """``(mu_s, var_s, count_s)`` of each virtual batch, in order."""
        return [cache.batch_moments()[0] for _, cache in self.parts]


def ghost_batch_norm_forward(
    z: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    ghost_size: int,
    eps: float = F.DEFAULT_EPS,
) -> tuple[np.ndarray, GhostCache]:
    """Batch norm of each virtual batch ``z[s]`` of :func:`ghost_slices` on its own::

        mu_s, var_s = mean(z[s]), mean((z[s] - mu_s)**2)     biased
        z_tilde[s]  = gamma * (z[s] - mu_s) / sqrt(var_s + eps) + beta

    Returns ``z_tilde`` and the cache."""
    outputs, parts = [], []
    for rows in ghost_slices(len(z), ghost_size):
        out, cache = F.batch_norm_forward(z[rows], gamma, beta, eps=eps)
        outputs.append(out)
        parts.append((rows, cache))
    return np.concatenate(outputs), GhostCache(parts)


__all__ = [
    "GhostCache",
    "check_ghost_size",
    "ghost_batch_norm_forward",
    "ghost_sizes",
    "ghost_slices",
]
