"""ONNX: export a model with its batch norm folded away, and check exported graphs.

Exports lose accuracy to batch norm in ways that no error reveals: a ``BatchNormalization``
node with ``training_mode=1`` (or, before opset 14, extra outputs) normalizes every inference
batch by its own statistics; a node whose ``epsilon`` is not the layer's (an exporter's default
1e-5 for a Keras-trained 1e-3 layer) shifts every output a little; and a graph exported before
a recalibration keeps the old statistics, folded into its convolutions where no node shows
them (torch's default exporter folds BN into the layer before it by itself).

- :func:`export_folded` folds the model (:func:`bnstats.torch.fold`), exports it with
  ``torch.onnx.export`` (quietly), checks the BN nodes left and that onnxruntime computes
  each of the model's eval outputs about as exactly as torch itself does, then writes the file;
- :func:`check_export` runs any exported file in onnxruntime against the model's current eval
  output and names the BN layers whose statistics look stale;
- :func:`check_batchnorm_nodes` reads the ``BatchNormalization`` nodes of any graph (subgraphs
  included; weight-standardisation nodes, which normalize a constant, are left alone).

Needs the ``onnx`` extra (``pip install ".[onnx]"``: onnx, onnxscript, onnxruntime);
torch is imported only by the functions that take a PyTorch model.
"""

from __future__ import annotations

from bnstats.onnx._agreement import Agreement, OnnxExportError, OutputAgreement
from bnstats.onnx.check import ExportCheck, LayerStatus, check_export
from bnstats.onnx.export import OnnxExport, export_folded
from bnstats.onnx.nodes import BatchNormNode, BatchNormNodes, check_batchnorm_nodes

__all__ = [
    "Agreement",
    "BatchNormNode",
    "BatchNormNodes",
    "ExportCheck",
    "LayerStatus",
    "OnnxExport",
    "OnnxExportError",
    "OutputAgreement",
    "check_batchnorm_nodes",
    "check_export",
    "export_folded",
]
