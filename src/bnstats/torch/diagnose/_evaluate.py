"""The evaluation passes of :func:`bnstats.torch.diagnose`: one setting's outputs on the test
batches, against the outputs of the model as it is.

The first run is the reference (``as_is``): its outputs stay on the device, one tensor per
batch. Every later run compares its outputs with them batch by batch, on the device, and
keeps three sums, read once at the end (never per batch)::

    correct       = sum(argmax(output) == label)            (only with labels)
    squared_diff  = sum((output - reference)**2)
    squared_ref   = sum(reference**2)
    output_change = sqrt(squared_diff / squared_ref)        (relative RMS change)

Labels come from ``(x, y, ...)`` batches whose ``y`` is a 1-D integer tensor with one entry
per row of the output, and accuracy is measured when the output is ``(rows, classes)`` with at
least 2 classes. In a torch.distributed group the sums are added over the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnstats._progress import pass_progress
from bnstats.torch._batches import (
    Forward,
    default_forward,
    first_tensor,
    iterate_batches,
    move_to_device,
)
from bnstats.torch._layers import batchnorm_train_mode, model_device, write_buffers
from bnstats.torch._ranks import run_and_exchange

Buffers = dict[str, dict[str, torch.Tensor]]
"""Per BN layer (qualified name): its ``running_mean``, ``running_var`` and
``num_batches_tracked``, cloned."""

_KEYS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Setting:
    """One way of running the model, measured on the test batches: ``accuracy`` (a fraction;
    None without labels or class scores), ``correct`` predictions of ``samples``, and
    ``output_change``, the relative RMS change of the outputs against ``as_is``."""

    name: str
    accuracy: float | None
    correct: int | None
    samples: int
    output_change: float
    hits: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """Per test sample on this rank, whether the prediction is right (None without labels)."""

    def to_dict(self) -> dict[str, Any]:
        change = self.output_change
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "samples": self.samples,
            "output_change": change if math.isfinite(change) else None,
        }


def read_buffers(layers: Mapping[str, nn.Module]) -> Buffers:
    """Every layer's running buffers, cloned (what the layer holds now)."""
    return {
        name: {
            key: getattr(layer, key).detach().clone()
            for key in _KEYS
            if getattr(layer, key, None) is not None
        }
        for name, layer in layers.items()
    }


def load_buffers(layers: Mapping[str, nn.Module], buffers: Buffers) -> None:
    """Copy ``buffers`` (some or all layers) into the layers, in place."""
    write_buffers({layers[name]: values for name, values in buffers.items()})


class Evaluator:
    """Runs the model over the test batches in one setting and measures it (see the module).

    ``model`` is the unwrapped model; ``layers`` its BN layers; ``forward(model, batch)``
    must return the output (a tensor, or a structure whose first tensor is the output).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        test_batches: Any,
        *,
        forward: Forward | None,
        max_samples: int | None,
        group: Any,
        progress: bool | None,
    ) -> None:
        self.model = model
        self.layers = layers
        self.test_batches = test_batches
        self.forward = forward or default_forward
        self.max_samples = max_samples
        self.group = group
        self.progress = progress
        self.reference: list[torch.Tensor] | None = None
        self.labelled = True
        self.largest_batch = 0
        self.passes = 0

    def run(self, name: str, *, batch_statistics: bool = False) -> Setting:
        """The model in eval mode (``batch_statistics``: its BN layers in training mode,
        normalizing each test batch by itself) over the test batches. In a group every rank
        evaluates its own batches, and the ranks exchange their sums and outcomes
        (:func:`bnstats.torch._ranks.run_and_exchange`): a rank failing fails every rank with
        :class:`~bnstats.torch.RankError`, and the largest test batch is the largest of all."""

        def local() -> tuple[torch.Tensor | None, tuple[list[float], int]]:
            return self._local_run(name, batch_statistics)

        if self.group is None:
            right, summary = local()
            summaries = [summary]
        else:
            call = {"tool": "diagnose", "evaluation": name}
            right, summaries = run_and_exchange(self.group, local, call)
        totals = [math.fsum(parts) for parts in zip(*(s[0] for s in summaries), strict=True)]
        self.largest_batch = max(s[1] for s in summaries)
        self.passes += 1
        return self._setting(name, totals, right)

    def _local_run(
        self, name: str, batch_statistics: bool
    ) -> tuple[torch.Tensor | None, tuple[list[float], int]]:
        """This rank's pass: its hits, and ``([correct, squared_diff, squared_ref, samples],
        largest batch)``."""
        self.model.eval()
        if batch_statistics:
            batchnorm_train_mode(self.model, self.layers)
        first = self.reference is None
        outputs: list[torch.Tensor] = []
        hits: list[torch.Tensor] = []
        sums: torch.Tensor | None = None
        device = model_device(self.model)
        with torch.no_grad(), pass_progress(self.progress, f"bnstats diagnose: {name}") as bar:
            seen, largest = 0, 0
            for index, (batch, size) in enumerate(
                iterate_batches(self.test_batches, self.max_samples)
            ):
                batch = move_to_device(batch, device)
                output = self._output(batch, size)
                labels = _labels(batch, output)
                if first:
                    outputs.append(output)
                    self.labelled = self.labelled and labels is not None
                reference = outputs[index] if first else self._reference(index, output)
                hit = _hits(output, labels if self.labelled else None)
                if hit is not None:
                    hits.append(hit)
                part = _sums(output, reference, hit)
                sums = part if sums is None else sums + part
                seen += output.shape[0]
                largest = max(largest, output.shape[0])
                bar(seen, math.inf)
        if sums is None:
            raise ValueError("test_batches yielded no batch; there is nothing to evaluate")
        if first:
            self.reference = outputs
        elif self.reference is not None and len(self.reference) != index + 1:
            raise ValueError(_different_batches())
        right = torch.cat(hits).cpu() if self.labelled and hits else None
        return right, ([*sums.double().cpu().tolist(), float(seen)], largest)

    def _output(self, batch: Any, size: int | None) -> torch.Tensor:
        result = first_tensor(self.forward(self.model, batch))
        if result is None or result.dim() == 0:
            raise TypeError(
                "diagnose needs the model's output: forward(model, batch) returned no tensor "
                "with one row per sample; pass forward=lambda model, batch: model(...) that "
                "returns it"
            )
        return result.detach().reshape(result.shape[0], -1).float()

    def _reference(self, index: int, output: torch.Tensor) -> torch.Tensor:
        if self.reference is None or index >= len(self.reference):
            raise ValueError(_different_batches())
        reference = self.reference[index]
        if reference.shape != output.shape:
            raise ValueError(
                f"test batch {index} gave an output of shape {tuple(output.shape)} in one "
                f"pass and {tuple(reference.shape)} in another; " + _different_batches()
            )
        return reference

    def discordant(self, better: Setting, base: Setting) -> tuple[int, int]:
        """The test predictions ``better`` gets right and ``base`` wrong, and the reverse
        (over all ranks in a group)."""
        if better.hits is None or base.hits is None:
            raise ValueError("discordant predictions need labels")
        counts = torch.tensor(
            [float((better.hits & ~base.hits).sum()), float((~better.hits & base.hits).sum())],
            dtype=torch.float64,
        )
        if self.group is not None:
            device = model_device(self.model) or torch.device("cpu")
            counts = counts.to(device)
            torch.distributed.all_reduce(counts, group=self.group)
        fixed, broken = counts.cpu().tolist()
        return int(fixed), int(broken)

    def _setting(self, name: str, totals: list[float], hits: torch.Tensor | None) -> Setting:
        """The setting from ``[correct, squared_diff, squared_ref, samples]`` over all ranks."""
        correct, squared_diff, squared_ref, samples = totals
        change = math.sqrt(squared_diff / squared_ref) if squared_ref > 0 else math.inf
        if squared_diff == 0:
            change = 0.0
        accuracy = correct / samples if self.labelled else None
        return Setting(
            name=name,
            accuracy=accuracy,
            correct=int(round(correct)) if self.labelled else None,
            samples=int(round(samples)),
            output_change=change,
            hits=hits,
        )


def _labels(batch: Any, output: torch.Tensor) -> torch.Tensor | None:
    """The integer class labels of an ``(x, y, ...)`` batch, if ``output`` is class scores."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return None
    labels = batch[1]
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dim() != 1
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
        or labels.shape[0] != output.shape[0]
        or output.shape[1] < 2
    ):
        return None
    return labels


def _hits(output: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Per row, whether ``argmax(output)`` is the label (None without labels)."""
    if labels is None:
        return None
    return output.argmax(dim=1) == labels.to(output.device)


def _sums(output: torch.Tensor, reference: torch.Tensor, hits: torch.Tensor | None) -> torch.Tensor:
    """``[correct, squared_diff, squared_ref]`` of one batch, on the device."""
    diff = output - reference
    correct = hits.sum().to(output.dtype) if hits is not None else output.new_zeros(())
    parts = (correct, (diff * diff).sum(), (reference * reference).sum())
    return torch.stack(parts).double()


def _different_batches() -> str:
    return (
        "test_batches must yield the same batches on every pass (a list, or a DataLoader "
        "without shuffling); diagnose goes over them once per setting"
    )
