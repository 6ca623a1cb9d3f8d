"""The arithmetic of folding batch norm into a neighbouring convolution or linear layer:
:func:`fold_weights` (its docstring holds the formulas), which :func:`bnstats.torch.fold`
calls for every BN it folds, as torch's ``fuse_conv_bn_eval`` calls ``fuse_conv_bn_weights``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Tensor = torch.Tensor
Pair = tuple[Tensor, Tensor]
Bias = Tensor | None
Position = Literal["after", "before", "beside"]
"""Where the BN sits: ``"after"`` the layer (``layer -> BN``), ``"before"`` it
(``BN -> layer``) or ``"beside"`` it (``layer(x) + BN(x)``)."""


class FoldOverflowError(ValueError):
    """A folded weight or bias is not finite in the layer's dtype (e.g. above 65504 in
    float16); the layer and the BN were left as they were."""


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The BN layer as ``z_tilde = scale * z + shift``, in float64 on the CPU (the formula:
    :func:`fold_weights`); ``gamma=None`` means 1 and ``beta=None`` means 0."""
    mu = as_float64(running_mean)
    var = as_float64(running_var)
    if mu.dim() != 1 or var.shape != mu.shape:
        raise ValueError(
            f"running_mean and running_var must be vectors of one length, got shapes "
            f"{tuple(running_mean.shape)} and {tuple(running_var.shape)}"
        )
    gamma64 = torch.ones_like(mu) if gamma is None else as_float64(gamma)
    beta64 = torch.zeros_like(mu) if beta is None else as_float64(beta)
    for name, value in (("gamma", gamma64), ("beta", beta64)):
        if value.shape != mu.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but running_mean has {tuple(mu.shape)}"
            )
    scale = gamma64 / torch.sqrt(var + float(eps))
    return scale, beta64 - mu * scale


def statistics_problem(
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
) -> str | None:
    """Why a BN with these values is no affine map to fold (None if it is one): a value that
    is NaN/Inf, or ``running_var + eps`` not positive (``sqrt`` of it is not a positive real
    number), naming the channels."""
    values = {"running_mean": running_mean, "running_var": running_var, "weight": gamma}
    values["bias"] = beta
    for name, value in values.items():
        if value is not None:
            bad = _channels(~torch.isfinite(as_float64(value)))
            if bad is not None:
                return f"{name} is NaN/Inf in channel(s) {bad}"
    spread = as_float64(running_var) + float(eps)
    bad = _channels(~(spread > 0))
    if bad is not None:
        return (
            f"running_var + eps is not positive in channel(s) {bad} (smallest "
            f"{float(spread.min()):.4g}): the BN divides by its square root"
        )
    return None


def _channels(mask: Tensor) -> str | None:
    """The indices where ``mask`` is true (the first 8), None if nowhere."""
    where = torch.nonzero(mask.reshape(-1)).flatten().tolist()
    if not where:
        return None
    shown = ", ".join(str(i) for i in where[:8])
    return shown + (f", ... ({len(where)} in all)" if len(where) > 8 else "")


def fold_weights(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    position: Position = "after",
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weights of the one layer that computes the layer and its BN together.

    In eval mode a BN layer normalizes with fixed statistics, so it is a per-channel affine
    map (the lecture's notation, PyTorch's names in brackets)::

        z_tilde = gamma * (z - mu) / sqrt(var + eps) + beta
                = scale * z + shift
        scale   = gamma / sqrt(var + eps)         gamma = weight, mu = running_mean,
        shift   = beta - mu * scale               var = running_var, beta = bias

    A convolution or linear layer ``y = W * x + b`` next to it absorbs that map (Ioffe &
    Szegedy 2015, section 3.2; Jacob et al. 2018, section 3.2):

    - ``position="after"``, ``BN(layer(x))``, per OUTPUT channel ``o``::

          W'[o] = W[o] * scale[o]
          b'[o] = (b[o] - mu[o]) * scale[o] + beta[o]  =  b[o] * scale[o] + shift[o]

    - ``position="before"``, ``layer(BN(x))``, per INPUT channel ``c``::

          W'[:, c] = W[:, c] * scale[c]
          b'[o]    = b[o] + sum over c and the kernel of W[o, c, ...] * shift[c]

      for Linear and Conv weights only, and equal to ``layer(BN(x))`` only where every
      output position sums the same, unpadded, inputs (``fold`` checks it);

    - ``position="beside"``, ``layer(x) + BN(x)`` (RepVGG's identity branch), per channel
      ``c``, ``centre`` the middle of the kernel::

          W'[c, c, centre] = W[c, c, centre] + scale[c]
          b'[c]            = b[c] + shift[c]

      for Linear and Conv weights with as many input as output channels, and equal to
      ``layer(x) + BN(x)`` only for stride 1 and centred padding (``fold`` checks it).

    ``bias=None`` means a layer without bias (``b = 0``), ``gamma=None`` / ``beta=None`` a BN
    with ``affine=False`` (``gamma = 1``, ``beta = 0``). Weight layouts (``groups`` as in
    ``nn.Conv*d``): Linear ``(out, in)``; Conv ``(out, in / groups, *kernel)``;
    ConvTranspose (``transposed=True``, ``position="after"`` only) ``(in, out / groups,
    *kernel)``, where input channel ``i`` belongs to group ``g = i // (in / groups)`` and
    ``weight[i, j]`` feeds output channel ``g * out / groups + j``.

    Computed in float64 on the CPU (which every backend can reach) and cast back
    (:func:`cast_back`) to the dtypes of ``weight`` and ``bias`` (``weight``'s if ``bias``
    is None) on ``weight``'s device: float64 weights give the exact float64 result, which
    ``fold`` keeps while a layer absorbs several BNs and rounds once. Raises ``ValueError``
    naming the shapes if the BN's channels are not the layer's output (input) channels, or
    naming the channels where ``running_var + eps`` is not positive or a statistic, ``gamma``
    or ``beta`` is NaN/Inf (:func:`statistics_problem`); :class:`FoldOverflowError` if a
    result is not finite in its dtype.
    """
    if position not in ("after", "before", "beside"):
        raise ValueError(f"position must be 'after', 'before' or 'beside', got {position!r}")
    if position != "after" and transposed:
        raise ValueError(
            f"a BN {position} a transposed conv does not fold: its outputs sum varying "
            "numbers of inputs, so the BN's shift is not a constant bias"
        )
    scale, shift = bn_scale_shift(running_mean, running_var, eps, gamma, beta)
    problem = statistics_problem(running_mean, running_var, eps, gamma, beta)
    if problem is not None:
        raise ValueError(f"the BN is no affine map to fold: {problem}")
    w64 = as_float64(weight)
    b64 = None if bias is None else as_float64(bias)
    if position == "after":
        w_new, b_new = _fold_after(w64, b64, scale, shift, transposed, groups)
    elif position == "before":
        w_new, b_new = _fold_before(w64, b64, scale, shift, groups)
    else:
        w_new, b_new = _fold_beside(w64, b64, scale, shift, groups)
    bias_like = weight if bias is None else bias
    return cast_back(w_new, weight, "weight"), cast_back(b_new, bias_like, "bias")


def weight_layout(layer: nn.Module) -> tuple[bool, int]:
    """``(transposed, groups)`` of a conv or linear layer's weight, as :func:`fold_weights`
    takes them (a linear layer: ``(False, 1)``)."""
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    return transposed, int(getattr(layer, "groups", 1))


def _fold_after(
    weight: Tensor, bias: Bias, scale: Tensor, shift: Tensor, transposed: bool, groups: int
) -> Pair:
    """:func:`fold_weights`' ``position="after"`` in float64."""
    out_channels = _out_channels(weight, transposed, groups)
    _check_channels(scale, out_channels, "output", weight, transposed, groups)
    _check_bias(bias, out_channels, weight)
    if transposed:
        # weight[i, j] feeds output channel (i // in_per_group) * out_per_group + j
        in_per_group = weight.shape[0] // groups
        per_weight = scale.view(groups, -1).repeat_interleave(in_per_group, dim=0)
    else:
        per_weight = scale.view(-1, 1)
    w_new = weight * per_weight.reshape(*per_weight.shape, *([1] * (weight.dim() - 2)))
    b_old = torch.zeros_like(scale) if bias is None else bias
    return w_new, b_old * scale + shift


def _fold_before(weight: Tensor, bias: Bias, scale: Tensor, shift: Tensor, groups: int) -> Pair:
    """:func:`fold_weights`' ``position="before"`` in float64."""
    if weight.dim() < 2 or weight.shape[0] % groups:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} cannot be a layer with groups={groups}"
        )
    in_channels = weight.shape[1] * groups
    _check_channels(scale, in_channels, "input", weight, False, groups)
    out_channels = weight.shape[0]
    _check_bias(bias, out_channels, weight)
    # output channel o reads the input channels of its group o // out_per_group
    out_per_group = out_channels // groups
    spatial = [1] * (weight.dim() - 2)

    def per_weight(v: Tensor) -> Tensor:
        rows = v.view(groups, -1).repeat_interleave(out_per_group, dim=0)
        return rows.reshape(*rows.shape, *spatial)

    w_new = weight * per_weight(scale)
    from_shift = (weight * per_weight(shift)).flatten(1).sum(dim=1)
    b_old = torch.zeros(out_channels, dtype=torch.float64) if bias is None else bias
    return w_new, b_old + from_shift


def _fold_beside(weight: Tensor, bias: Bias, scale: Tensor, shift: Tensor, groups: int) -> Pair:
    """:func:`fold_weights`' ``position="beside"`` in float64."""
    out_channels = _out_channels(weight, False, groups)
    per_group = weight.shape[1]
    if per_group * groups != out_channels:
        raise ValueError(
            f"a BN beside a layer needs as many input as output channels, got weight shape "
            f"{tuple(weight.shape)} with groups={groups}"
        )
    _check_channels(scale, out_channels, "output", weight, False, groups)
    _check_bias(bias, out_channels, weight)
    channel = torch.arange(out_channels)
    centre = tuple(size // 2 for size in weight.shape[2:])
    w_new = weight.clone()
    w_new[(channel, channel % per_group, *centre)] += scale
    b_old = torch.zeros_like(scale) if bias is None else bias
    return w_new, b_old + shift


def _overflow_problem(value: Tensor, dtype: torch.dtype) -> str | None:
    """Why the float64 ``value`` cannot be stored in ``dtype`` (None if it can).

    Checks the cast itself, so rounding up past the largest finite number (65504 in float16)
    counts as an overflow. One pass over ``value`` when every ``|value|`` is at most the
    dtype's largest finite number (which never rounds to ``inf``).
    """
    if value.numel() == 0:
        return None
    low, high = torch.aminmax(value)  # NaN if any value is NaN
    largest = max(-float(low), float(high))
    if not math.isfinite(largest):
        return "is not finite even in float64"
    if largest <= torch.finfo(dtype).max or bool(torch.isfinite(value.to(dtype)).all()):
        return None
    return (
        f"would overflow {_dtype_name(dtype)} (largest |value| {largest:.4g} > "
        f"{torch.finfo(dtype).max:.6g})"
    )


def cast_back(value: Tensor, like: Tensor, what: str) -> Tensor:
    """The float64 ``value`` in ``like``'s dtype and on its device; :class:`FoldOverflowError`
    naming ``what`` (``"weight"``, ``"bias"``) if it is not finite there."""
    problem = _overflow_problem(value, like.dtype)
    if problem is not None:
        raise FoldOverflowError(
            f"the folded {what} of shape {tuple(value.shape)} {problem}: keep the BN layer "
            "or store the layer in a wider dtype"
        )
    return value.to(device=like.device, dtype=like.dtype)


def _out_channels(weight: Tensor, transposed: bool, groups: int) -> int:
    if weight.dim() < 2 or groups < 1 or weight.shape[0] % groups:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} cannot be a layer with groups={groups}"
        )
    return weight.shape[1] * groups if transposed else weight.shape[0]


def _check_channels(
    scale: Tensor, expected: int, side: str, weight: Tensor, transposed: bool, groups: int
) -> None:
    if scale.shape[0] != expected:
        layout = "ConvTranspose (in, out/groups, ...)" if transposed else "(out, in/groups, ...)"
        raise ValueError(
            f"the BN has {scale.shape[0]} channels but the layer has {expected} {side} channels "
            f"(weight shape {tuple(weight.shape)}, layout {layout}, groups={groups})"
        )


def _check_bias(bias: Tensor | None, out_channels: int, weight: Tensor) -> None:
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(
            f"bias has shape {tuple(bias.shape)} but the layer has {out_channels} output "
            f"channels (weight shape {tuple(weight.shape)})"
        )


def as_float64(t: Tensor) -> Tensor:
    """A detached float64 copy on the CPU, where fold computes."""
    return t.detach().to(device="cpu", dtype=torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = [
    "FoldOverflowError",
    "Position",
    "as_float64",
    "bn_scale_shift",
    "cast_back",
    "fold_weights",
    "statistics_problem",
    "weight_layout",
]
