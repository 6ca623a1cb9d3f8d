"""Why a model does worse in eval mode than in training: :func:`diagnose`.

The usual answers (a model left in training mode, stale running statistics, a shift between
training and test data, a model that relies on batch statistics, frozen statistics far from
the data) are each checked by measurement, with bnstats' own tools (``recalibrate``,
``adapt``, the pass of :mod:`bnstats.torch._pass`) on the model's own data, and the model is
left exactly as found.

- ``_evaluate``: one setting's outputs on the test batches against the model as it is;
- ``_findings``: the thresholds and one rule per kind of finding;
- ``_report``: :class:`DiagnoseReport`, :class:`Finding`, :class:`LayerEffect`.
"""

from bnstats.torch.diagnose._diagnose import MAX_LAYERS, diagnose
from bnstats.torch.diagnose._evaluate import Setting
from bnstats.torch.diagnose._findings import MIN_GAIN, MIN_OUTPUT_CHANGE, MIN_PREDICTIONS
from bnstats.torch.diagnose._report import KINDS, DiagnoseReport, Finding, LayerEffect

__all__ = [
    "KINDS",
    "MAX_LAYERS",
    "MIN_GAIN",
    "MIN_OUTPUT_CHANGE",
    "MIN_PREDICTIONS",
    "DiagnoseReport",
    "Finding",
    "LayerEffect",
    "Setting",
    "diagnose",
]
