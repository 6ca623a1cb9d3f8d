"""Small, faithful copies of layer patterns from timm and torchvision, for tests without them.

CI installs neither library, yet users run bnstats on their models. Each class below is written
here to behave as its namesake does (same base class, same attributes and buffers, same
forward in training and eval mode), so that the tools meet the same cases:

- :class:`BatchNormAct2d` (timm ``layers/norm_act.py``): a subclass of ``nn.BatchNorm2d``
  whose own forward calls ``F.batch_norm`` with torch's momentum rules, then applies its child
  modules ``drop`` (``drop_layer()``, e.g. DropBlock, or ``nn.Identity``) and ``act``;
- :class:`SyncBatchNormAct`: its ``nn.SyncBatchNorm`` twin (``super().forward``, then ``drop``
  and ``act`` if present), produced by :func:`convert_sync_batchnorm` as timm's ``--sync-bn``
  does; without a process group and in eval mode it computes what ``nn.BatchNorm2d`` does;
- :class:`DropBlock2d`: a random block mask that is active only in training mode;
- :class:`FrozenBatchNorm2d` (``torchvision.ops.misc``; timm re-exports it): buffers
  ``weight``, ``bias``, ``running_mean``, ``running_var`` and an ``eps``, no training behaviour;
- :class:`StdConv2d`: a weight-standardised conv (BiT / timm ResNetV2) that overrides
  ``_conv_forward``; :class:`StdConv2dOwnForward` overrides ``forward`` as timm's does;
  :class:`BatchNormStdConv2d` and :class:`ScaledStdConv2d` are timm's own ``StdConv2d`` and
  ``ScaledStdConv2d``: ``F.batch_norm`` on the weights (``BatchNormalization`` nodes in ONNX);
- :class:`AuxHeadNet`: an auxiliary classifier reached only in training mode (googlenet,
  inception_v3);
- :class:`DetectionNet`: a detection-style model taking a list of images (and, in training,
  targets), with a frozen-BN backbone as torchvision's detection models have.

bnstats knows timm's and torchvision's BN classes by where they are defined as well as by
name (``bnstats.torch.kinds``), so :class:`BatchNormAct2d`, :class:`SyncBatchNormAct` and
:class:`FrozenBatchNorm2d` carry their namesakes' module paths (``__module__``), as the
registry meets the real classes. (Not picklable for that reason: pickle would look them up
there.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class DropBlock2d(nn.Module):
    """Zero random ``block_size`` x ``block_size`` squares of each feature map in training
    mode (rescaling the rest), pass the input through unchanged in eval mode."""

    def __init__(self, drop_prob: float = 0.2, block_size: int = 3) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.block_size = block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        seeds = (torch.rand_like(x) < self.drop_prob / self.block_size**2).to(x.dtype)
        dropped = F.max_pool2d(seeds, self.block_size, stride=1, padding=self.block_size // 2)
        keep = 1.0 - dropped[..., : x.shape[-2], : x.shape[-1]]
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))


def _activation(act_layer: Callable[..., nn.Module] | None, apply_act: bool) -> nn.Module:
    return act_layer() if act_layer is not None and apply_act else nn.Identity()


class BatchNormAct2d(nn.BatchNorm2d):
    """``act(drop(BN(x)))`` in one module that IS a BatchNorm2d (its state_dict is a BN's)."""

    def __init__(
        self,
        num_features: int,
        *bn_args: Any,
        apply_act: bool = True,
        act_layer: Callable[..., nn.Module] | None = nn.ReLU,
        drop_layer: Callable[[], nn.Module] | None = None,
        **bn_kwargs: Any,
    ) -> None:
        """``bn_args``/``bn_kwargs``: ``nn.BatchNorm2d``'s (eps, momentum, affine, ...)."""
        super().__init__(num_features, *bn_args, **bn_kwargs)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _activation(act_layer, apply_act)

    def forward(self, x: Tensor) -> Tensor:
        torch._assert(x.dim() == 4, "expected 4D input")  # symbolically traceable, as timm's
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as torch's BN
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            batch_stats,
            factor,
            self.eps,
        )
        return self.act(self.drop(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """SyncBatchNorm followed by the ``drop`` and ``act`` that :func:`convert_sync_batchnorm`
    moves over from a :class:`BatchNormAct2d`."""

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNormAct2d replaced by a SyncBatchNormAct and every other BN
    by an ``nn.SyncBatchNorm``, sharing parameters, buffers, ``drop``, ``act`` and the
    training flag."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        sync_cls = SyncBatchNormAct if isinstance(module, BatchNormAct2d) else nn.SyncBatchNorm
        converted = sync_cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if isinstance(module, BatchNormAct2d):
            converted.drop = module.drop
            converted.act = module.act
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if isinstance(converted, SyncBatchNormAct):
            return converted  # its only children, drop and act, are moved over as they are
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child))
    return converted


class FrozenBatchNorm2d(nn.Module):
    """BN with fixed statistics and affine parameters, all buffers:
    ``x * scale + (bias - running_mean * scale)``, ``scale = weight / sqrt(running_var + eps)``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var + self.eps).rsqrt().reshape(
            1, -1, 1, 1
        )
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


BatchNormAct2d.__module__ = SyncBatchNormAct.__module__ = "timm.layers.norm_act"
FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


def freeze(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.BatchNorm2d`` child replaced by a :class:`FrozenBatchNorm2d`
    holding its statistics and affine parameters (as timm's ``freeze_batch_norm_2d``)."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key))
            setattr(model, name, frozen)
        else:
            freeze(child)
    return model


def _standardized(weight: Tensor, eps: float) -> Tensor:
    """Each output channel's filter with mean 0 and variance 1 (over its own elements)."""
    flat = weight.reshape(weight.shape[0], -1)
    var, mean = torch.var_mean(flat, dim=1, keepdim=True, correction=0)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape_as(weight)


class StdConv2d(nn.Conv2d):
    """Weight Standardization (Qiao et al. 2019) in ``_conv_forward``: ``forward`` is torch's,
    the weight that reaches the convolution is not the stored one."""

    def __init__(self, *args: object, eps: float = 1e-6, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eps = eps

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(input, _standardized(weight, self.eps), bias)


class StdConv2dOwnForward(nn.Conv2d):
    """Weight Standardization in an overridden ``forward``, as timm's ``StdConv2d``."""

    def __init__(self, *args: object, eps: float = 1e-6, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        weight = _standardized(self.weight, self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv_bn_act_net(
    drop_layer: Callable[[], nn.Module] | None = None, act_layer: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """The issue's example and a bit more: conv -> BatchNormAct2d -> conv -> BatchNorm2d ->
    conv -> BatchNormAct2d (no activation) -> pooling, linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        BatchNormAct2d(8, act_layer=act_layer, drop_layer=drop_layer),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 6, 1),
        BatchNormAct2d(6, apply_act=False, drop_layer=drop_layer),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


class AuxHeadNet(nn.Module):
    """A classifier whose auxiliary head (with its own BN) runs only in training mode, where the
    model returns ``(logits, aux_logits)``; in eval mode it returns ``logits``."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = nn.Sequential(
            nn.Conv2d(8, 4, 1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, classes),
        )
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = self.stem(x)
        aux = self.aux(x) if self.training else None
        logits = self.head(self.body(x))
        return logits if aux is None else (logits, aux)


class DetectionNet(nn.Module):
    """Detection-style: ``model(images)`` with a list of (C, H, W) images of any sizes returns
    one ``{"scores": ...}`` per image in eval mode; in training ``model(images, targets)``
    returns a dict of losses. The backbone uses ``norm_layer`` (frozen BN by default, as
    torchvision's detection backbones)."""

    def __init__(self, norm_layer: Callable[[int], nn.Module] = FrozenBatchNorm2d) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            norm_layer(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.score = nn.Conv2d(8, 1, 1)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        if self.training and targets is None:
            raise ValueError("in training mode targets should be passed")
        size = max(max(image.shape[-2] for image in images), max(i.shape[-1] for i in images))
        batch = torch.stack(
            [F.pad(i, (0, size - i.shape[-1], 0, size - i.shape[-2])) for i in images]
        )
        scores = self.score(self.backbone(batch)).flatten(1)
        if self.training:
            wanted = torch.stack([t["labels"].float().mean() for t in targets])
            return {"loss_score": F.mse_loss(scores.mean(dim=1), wanted)}
        return [{"scores": row} for row in scores]


def scramble_frozen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weight, bias, running_mean and positive running_var for every frozen BN."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                n = module.weight.shape[0]
                module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                module.bias.copy_(torch.randn(n, generator=gen) * 0.3)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model


def _timm_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """timm ``layers/padding.py`` ``get_padding``: 'same' padding for odd kernels."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


class BatchNormStdConv2d(nn.Conv2d):
    """timm's ``StdConv2d`` (``layers/std_conv.py``) as it is: ``forward`` standardises the
    weight with ``F.batch_norm`` in training mode over each output channel's filter (no running
    statistics, ``momentum=0``), so exporters write a ``BatchNormalization`` node on weights."""

    def __init__(
        self,
        in_channel: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        if padding is None:
            padding = _timm_padding(kernel_size, stride, dilation)
        super().__init__(
            in_channel, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=bias,
        )  # fmt: skip
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        weight = _normalized_filters(self, None)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ``ScaledStdConv2d`` (NF-ResNets): ``F.batch_norm`` on the weights with a learned
    per-channel gain times ``gamma / sqrt(fan_in)`` as the normalization's weight."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        gamma: float = 1.0,
        eps: float = 1e-6,
        gain_init: float = 1.0,
    ) -> None:
        if padding is None:
            padding = _timm_padding(kernel_size, stride, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=bias,
        )  # fmt: skip
        self.scale = gamma * self.weight[0].numel() ** -0.5  # gamma * 1 / sqrt(fan-in)
        self.eps = eps
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))

    def forward(self, x: Tensor) -> Tensor:
        weight = _normalized_filters(self, (self.gain * self.scale).view(-1))
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _normalized_filters(conv: nn.Conv2d, scale: Tensor | None) -> Tensor:
    """timm's weight standardisation: ``F.batch_norm`` in training mode over each output
    channel's filter (no running statistics, ``momentum=0``), ``scale`` as its weight."""
    return F.batch_norm(
        conv.weight.reshape(1, conv.out_channels, -1),
        None,  # running_mean
        None,  # running_var
        weight=scale,
        training=True,
        momentum=0.0,
        eps=conv.eps,  # type: ignore[arg-type]
    ).reshape_as(conv.weight)
