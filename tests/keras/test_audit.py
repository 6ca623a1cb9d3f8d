"""bnstats.keras.audit: the torch audit's report, the corrupted layer first."""

from __future__ import annotations

import json

import numpy as np

from tests.optional import optional_import

optional_import("keras")  # skipped without it (fails under BNSTATS_REQUIRE_EXTRAS=1)

from bnstats.keras import audit, recalibrate  # noqa: E402
from tests.keras.models import CASES, data_for, keras, snapshot  # noqa: E402


def test_audit_ranks_a_corrupted_layer_first_and_writes_nothing(rng):
    case = CASES["nested"](rng)
    batches = data_for(case, rng, [12, 7, 12])
    recalibrate(case.model, batches)
    corrupted = case.bns[1]
    std = np.sqrt(keras.ops.convert_to_numpy(corrupted.moving_variance))
    corrupted.moving_mean.assign(keras.ops.convert_to_numpy(corrupted.moving_mean) + 2 * std)
    before = snapshot(case.model)
    report = audit(case.model, batches, progress=False)
    for variable, old in zip(case.model.weights, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), old)
    worst = report.worst_first()
    assert worst[0].name.endswith(corrupted.name)
    assert worst[0].mean_shift.mean > 1.9
    assert all(layer.mean_shift.worst < 1e-4 for layer in worst[1:])
    assert len(report.layers) == 3 and report.samples == 31 and report.batches == 3
    record = json.loads(json.dumps(report.to_dict(per_channel=True)))
    assert record["layers"][0]["name"] == report.layers[0].name
    assert record["layers"][0]["num_batches_tracked"] is None
    text = str(report)
    assert text.splitlines()[0].startswith("bnstats audit: 3 BN layers, 31 samples in 3 batches")
    assert text.index(corrupted.name) < text.index(case.bns[0].name + " ")


def test_audit_in_eval_mode_measures_stale_statistics(rng):
    case = CASES["mlp"](rng)
    report = audit(case.model, data_for(case, rng, [30, 30]), mode="eval")
    assert all(layer.kl.mean > 0.01 for layer in report.layers)
    assert all(np.isfinite(layer.relative_error) for layer in report.layers)


def test_a_frozen_layer_is_listed_not_audited(rng):
    case = CASES["mlp"](rng)
    case.bns[0].trainable = False
    report = audit(case.model, data_for(case, rng, [10, 10]))
    assert [layer.name for layer in report.layers] == [case.bns[1].name]
    assert report.fixed == [case.bns[0].name]
