"""What each rank does in the distributed tests, and the data each rank holds.

Every scenario is ``scenario(rank) -> dict`` run by both ranks of a 2-process gloo group
(:mod:`tests.torch.distributed_worker`); the dicts are saved for the test process, which
rebuilds the same data (:func:`rank_batches`, ...) to compute single-process references.
Expected errors are caught here, with a check that the model's state did not change.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bnstats.torch as bt
from bnstats.torch.distributed import sync_running_stats
from tests.torch import eval_models, zoo
from tests.torch import reference as ref
from tests.torch import timm_patterns as timm
from tests.torch.eval_models import Unsized
from tests.torch.extra_models import AuxiliaryHead
from tests.torch.models import mlp

RANK_SIZES = ([5, 2, 8], [3, 6, 2, 4, 7, 3, 5])
"""Rank 0 holds 3 batches, rank 1 holds 7, of uneven sizes; rank 1 has the largest."""

ADAPT_SIZES = ([4, 5], [9, 3, 6])
SYNC_STEPS = (3, 5)
SYNC_SHIFT = 3.0
GROUP_TIMEOUT_SECONDS = 2.0


def rank_batches(model_name: str, rank: int, sizes: list[int] | None = None) -> list[torch.Tensor]:
    """Rank ``rank``'s batches for a zoo model (different data on each rank)."""
    return zoo.batches(model_name, sizes=sizes or RANK_SIZES[rank], seed=20 + rank)


def aux_batches(rank: int) -> list[tuple[torch.Tensor, bool]]:
    """``(x, call_aux)``: rank 1's forward also calls the auxiliary head, rank 0's does not."""
    gen = torch.Generator().manual_seed(40 + rank)
    return [(torch.randn(n, 5, generator=gen) + rank, rank == 1) for n in RANK_SIZES[rank]]


def aux_forward(model: nn.Module, batch: tuple[torch.Tensor, bool]) -> Any:
    x, call_aux = batch
    out = model(x)
    return model.aux(out) if call_aux else out


def sync_data(rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s training batches for sync_running_stats: means shifted by rank."""
    gen = torch.Generator().manual_seed(60 + rank)
    return [torch.randn(8, 16, generator=gen) + SYNC_SHIFT * rank for _ in range(SYNC_STEPS[rank])]


def sync_model() -> nn.Module:
    torch.manual_seed(7)
    model = mlp()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.momentum = None  # cumulative average: num_batches_tracked batches
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return ref.snapshot(model)


def _expect_error(model: nn.Module, call: Callable[[], Any]) -> dict[str, Any]:
    """Run ``call``, which must raise; report the error and whether the state is unchanged."""
    before = ref.snapshot(model)
    start = time.perf_counter()
    try:
        call()
    except Exception as error:
        return {
            "type": type(error).__name__,
            "message": str(error),
            "failures": getattr(error, "failures", None),
            "unchanged": ref.same_state(model, before),
            "seconds": time.perf_counter() - start,
        }
    return {"type": None, "message": "no error", "unchanged": ref.same_state(model, before)}


def uneven(model_name: str) -> Callable[[int], dict[str, Any]]:
    def scenario(rank: int) -> dict[str, Any]:
        model = zoo.build(model_name)
        assert bt.recalibrate(model, rank_batches(model_name, rank)) is model
        return {"state": _state(model)}

    return scenario


def eval_mode_resnet(rank: int) -> dict[str, Any]:
    model = zoo.build("resnet")
    assert bt.recalibrate(model, rank_batches("resnet", rank), mode="eval") is model
    return {"state": _state(model)}


def eval_mode_subset_resnet(unsized_rank: int | None) -> Callable[[int], dict[str, Any]]:
    """mode="eval" through the subset iteration: subsets of 1 sample, so that the 45 samples
    hold more than 32 (each rank's first batch is its part of the subset). With
    ``unsized_rank``, that rank's batches have no length, so no rank can solve the subset
    before a whole pass. Says which path each rank took."""

    def scenario(rank: int) -> dict[str, Any]:
        from bnstats.torch import _measure, _subset_choice

        model, samples = zoo.build("resnet"), _subset_choice.SUBSET_SAMPLES
        batches: Any = rank_batches("resnet", rank)
        if rank == unsized_rank:
            batches = Unsized(batches)
        taken: list[str] = []
        paths = {p: getattr(_measure, p) for p in ("iterate_from_subset", "iterate_with_subset")}
        for path, original in paths.items():
            setattr(_measure, path, _recorded(original, path, taken))
        _subset_choice.SUBSET_SAMPLES = 1
        try:
            with _without_one_batch():
                result = bt.recalibrate_report(model, batches, mode="eval")
        finally:  # the worker runs the other scenarios after this one
            _subset_choice.SUBSET_SAMPLES = samples
            for path, original in paths.items():
                setattr(_measure, path, original)
        return {
            "state": _state(model),
            "passes": result.passes,
            "subset": (result.subset_passes, result.subset_batches),
            "taken": taken,
        }

    return scenario


def eval_mode_late_subset(rank: int) -> dict[str, Any]:
    """mode="eval" on the 30-deep conv chain, 64 batches of 16 split in halves (rank 0 the
    first), as on data too large for one batch: four whole passes do not converge, and the
    rounds go on with a late subset of 64 samples, each rank's first 2 batches."""
    model = eval_models.build("convchain")
    batches = eval_models.batches("convchain", 64, 16)[32 * rank : 32 * (rank + 1)]
    with _without_one_batch():
        result = bt.recalibrate_report(model, batches, mode="eval")
    return _eval_result(model, result)


def eval_mode_late_subset_joined(rank: int) -> dict[str, Any]:
    """mode="eval" on the 30-deep conv chain, 64 batches of 16 split in halves, with a
    budget of 1 MiB (the data's 2 MiB are over it): four whole passes, then the late subset
    (each rank's first 2 batches, 128 KiB over both) joins and every rank solves both
    ranks' subsets in one forward each round."""
    model = eval_models.build("convchain")
    batches = eval_models.batches("convchain", 64, 16)[32 * rank : 32 * (rank + 1)]
    result = bt.recalibrate_report(model, batches, mode="eval", one_batch_bytes=2**20)
    return _eval_result(model, result)


def eval_mode_subset_sized(budget: int) -> Callable[[int], dict[str, Any]]:
    """mode="eval" on the 30-deep conv chain, 64 batches of 16 split in halves, over a
    ``budget`` under the data's 2 MiB, with subsets of 64 samples (each rank's first 2
    batches, 128 KiB) and a floor of 16 samples for a shrunk subset: at 1 MiB the subset
    grows to an eighth of the data; at 64 KiB it does not join and shrinks to each rank's
    first batch. Every rank gathers both ranks' subsets and solves them in one forward each
    round."""

    def scenario(rank: int) -> dict[str, Any]:
        from bnstats.torch import _subset_choice as subset

        model = eval_models.build("convchain")
        batches = eval_models.batches("convchain", 64, 16)[32 * rank : 32 * (rank + 1)]
        settings = subset.SUBSET_SAMPLES, subset.SUBSET_SHARE, subset.SHRUNK_LEAST
        subset.SUBSET_SAMPLES, subset.SUBSET_SHARE, subset.SHRUNK_LEAST = 64, 16, 16
        try:
            result = bt.recalibrate_report(model, batches, mode="eval", one_batch_bytes=budget)
        finally:  # the worker runs the other scenarios after this one
            subset.SUBSET_SAMPLES, subset.SUBSET_SHARE, subset.SHRUNK_LEAST = settings
        return _eval_result(model, result)

    return scenario


def eval_mode_one_batch(unjoinable_rank: int | None) -> Callable[[int], dict[str, Any]]:
    """mode="eval" on the 30-deep conv chain, 64 batches of 16 split in halves: all ranks'
    data gathered and run as one batch on every rank. With ``unjoinable_rank``, that rank's
    second batch is 7x7 images where the others are 8x8: its batches do not join, and every
    rank takes the passes of data over the budget instead."""

    def scenario(rank: int) -> dict[str, Any]:
        model = eval_models.build("convchain")
        batches = eval_models.batches("convchain", 64, 16)[32 * rank : 32 * (rank + 1)]
        if rank == unjoinable_rank:
            batches[1] = batches[1][:, :, :7, :7]
        result = bt.recalibrate_report(model, batches, mode="eval")
        return _eval_result(model, result)

    return scenario


def _eval_result(model: nn.Module, result: bt.Recalibration) -> dict[str, Any]:
    return {
        "state": _state(model),
        "passes": result.passes,
        "subset": (result.subset_passes, result.subset_batches),
    }


@contextlib.contextmanager
def _without_one_batch() -> Iterator[None]:
    """mode="eval" as on data too large to run as one batch (the worker runs other
    scenarios after this one: the budget is put back)."""
    from bnstats import _one_batch

    budget, _one_batch.ONE_BATCH_BYTES = _one_batch.ONE_BATCH_BYTES, 0
    try:
        yield
    finally:
        _one_batch.ONE_BATCH_BYTES = budget


def _recorded(function: Callable[..., Any], name: str, taken: list[str]) -> Callable[..., Any]:
    def recorded(*args: Any, **kwargs: Any) -> Any:
        taken.append(name)
        return function(*args, **kwargs)

    return recorded


def empty_rank(empty: int) -> Callable[[int], dict[str, Any]]:
    def scenario(rank: int) -> dict[str, Any]:
        model = zoo.build("resnet")
        bt.recalibrate(model, [] if rank == empty else rank_batches("resnet", rank))
        return {"state": _state(model)}

    return scenario


def all_empty(rank: int) -> dict[str, Any]:
    model = zoo.build("resnet")
    return _expect_error(model, lambda: bt.recalibrate(model, iter([])))


def unreached_on_one_rank(rank: int) -> dict[str, Any]:
    torch.manual_seed(3)
    model = AuxiliaryHead()
    bt.recalibrate(model, aux_batches(rank), forward=aux_forward)
    return {"state": _state(model)}


def unreached_everywhere(rank: int) -> dict[str, Any]:
    torch.manual_seed(3)
    model = AuxiliaryHead()
    return _expect_error(model, lambda: bt.recalibrate(model, [x for x, _ in aux_batches(rank)]))


def nonfinite_on_one_rank(rank: int) -> dict[str, Any]:
    model = zoo.build("mlp")
    batches = rank_batches("mlp", rank)
    if rank == 1:
        batches[1][0, 0] = float("nan")
    return _expect_error(model, lambda: bt.recalibrate(model, batches))


def subgroup_of_one(rank: int) -> dict[str, Any]:
    """A group holding rank 0 only: rank 0 works alone, rank 1 is told it is no member."""
    only_first = dist.new_group([0])
    model = zoo.build("resnet")
    if rank == 1:
        call = lambda: bt.recalibrate(model, rank_batches("resnet", 1), group=only_first)  # noqa: E731
        return _expect_error(model, call)
    bt.recalibrate(model, rank_batches("resnet", 0), group=only_first)
    return {"state": _state(model)}


def ddp_wrapped(rank: int) -> dict[str, Any]:
    """Uneven batches, then rank 1 empty: DDP's forward would broadcast buffers (at least on
    the first call), a collective that an empty rank never joins."""
    wrapped = DistributedDataParallel(zoo.build("resnet"))
    returned = bt.recalibrate(wrapped, rank_batches("resnet", rank))
    uneven_state = _state(wrapped.module)
    empty_one = DistributedDataParallel(zoo.build("resnet"))
    bt.recalibrate(empty_one, [] if rank == 1 else rank_batches("resnet", 0))
    return {
        "state": uneven_state,
        "empty_rank1": _state(empty_one.module),
        "returned_wrapper": returned is wrapped,
    }


def sync_batchnorm(rank: int) -> dict[str, Any]:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(zoo.build("resnet"))
    model.train()
    bt.recalibrate(model, rank_batches("resnet", rank))
    layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    return {
        "state": _state(model),
        "sync_layers": len(layers),
        "forward_restored": all("forward" not in m.__dict__ for m in layers),
        "modes_kept": all(m.training for m in model.modules()),
    }


def act_batches(rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s images for the conv-BN-activation model (2 on rank 0, 3 on rank 1)."""
    gen = torch.Generator().manual_seed(70 + rank)
    return [torch.randn(4, 3, 10, 10, generator=gen) for _ in range(2 + rank)]


def sync_batchnorm_act(rank: int) -> dict[str, Any]:
    """timm's SyncBatchNormAct under a real group: its own forward (activation) runs, locally."""
    torch.manual_seed(0)
    model = timm.convert_sync_batchnorm(timm.conv_bn_act_net())
    bt.recalibrate(model, act_batches(rank))
    return {"state": _state(model), "modes_kept": all(m.training for m in model.modules())}


def mixed_tools(rank: int) -> dict[str, Any]:
    """Rank 0 recalibrates while rank 1 audits: both must refuse, neither writes."""
    model = zoo.build("resnet")
    batches = rank_batches("resnet", rank)
    if rank == 0:
        return _expect_error(model, lambda: bt.recalibrate(model, batches))
    return _expect_error(model, lambda: bt.audit(model, batches))


def recalibrate_and_sync(rank: int) -> dict[str, Any]:
    """Rank 0 recalibrates while rank 1 pools running statistics: a RankError, not a raw one."""
    model = zoo.build("resnet")
    if rank == 0:
        return _expect_error(model, lambda: bt.recalibrate(model, rank_batches("resnet", 0)))
    return _expect_error(model, lambda: sync_running_stats(model))


class _Unprintable(RuntimeError):
    def __str__(self) -> str:
        raise ValueError("this message cannot be read")


def unprintable_error(rank: int) -> dict[str, Any]:
    """Rank 1's forward raises an exception whose __str__ raises: the exchange still runs."""
    model = zoo.build("resnet")

    def forward(m: nn.Module, batch: torch.Tensor) -> Any:
        if rank == 1:
            raise _Unprintable()
        return m(batch)

    return _expect_error(
        model, lambda: bt.recalibrate(model, rank_batches("resnet", rank), forward=forward)
    )


def _broken_loader(rank: int) -> Iterator[torch.Tensor]:
    for index, batch in enumerate(rank_batches("resnet", rank)):
        if rank == 1 and index == 2:
            raise RuntimeError("the loader of rank one broke")
        yield batch


def failing_rank(rank: int) -> dict[str, Any]:
    model = zoo.build("resnet")
    return _expect_error(model, lambda: bt.recalibrate(model, _broken_loader(rank)))


def different_models(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = mlp((16, 32 if rank == 0 else 30, 24, 5))
    batches = [torch.randn(6, 16) for _ in range(2)]
    return _expect_error(model, lambda: bt.recalibrate(model, batches))


def audit_in_group(rank: int) -> dict[str, Any]:
    model = zoo.build("resnet")
    before = ref.snapshot(model)
    report = bt.audit(model, rank_batches("resnet", rank))
    return {"report": report.to_dict(per_channel=True), "unchanged": ref.same_state(model, before)}


def diagnose_in_group(rank: int) -> dict[str, Any]:
    """Both ranks diagnose on their own batches: one report over all ranks' data."""
    model = zoo.build("resnet").eval()
    before = ref.snapshot(model)
    report = bt.diagnose(model, rank_batches("resnet", rank), progress=False)
    return {"report": report.to_dict(), "unchanged": ref.same_state(model, before)}


TEST_SIZES = ([3, 3], [5, 4, 5])
"""Test batches of diagnose_with_uneven_test_batches: the largest batch is rank 1's."""


def test_batches(rank: int) -> list[torch.Tensor]:
    return zoo.batches("resnet", sizes=TEST_SIZES[rank], seed=40 + rank)


def diagnose_with_uneven_test_batches(rank: int) -> dict[str, Any]:
    """Test batches of other sizes on each rank: the adapt priors come from the largest test
    batch of all ranks (each rank's own made the ranks call adapt differently)."""
    model = zoo.build("resnet").eval()
    report = bt.diagnose(model, rank_batches("resnet", rank), test_batches(rank), progress=False)
    return {"report": report.to_dict()}


def diagnose_with_no_test_batch_on_one_rank(rank: int) -> dict[str, Any]:
    """Rank 0 has no test batch: every rank gets a RankError naming it (rank 1 hung on the
    evaluation's sums, then got the group's raw error)."""
    model = zoo.build("resnet").eval()
    tests = [] if rank == 0 else test_batches(rank)
    return _expect_error(
        model, lambda: bt.diagnose(model, rank_batches("resnet", rank), tests, progress=False)
    )


def adapt_in_group(rank: int) -> dict[str, Any]:
    model = zoo.build("resnet")
    bt.adapt(model, rank_batches("resnet", rank, ADAPT_SIZES[rank]), prior=16)
    return {"state": _state(model)}


def explicit_group(rank: int) -> dict[str, Any]:
    both = dist.new_group([0, 1])
    grouped, alone = zoo.build("resnet"), zoo.build("resnet")
    bt.recalibrate(grouped, rank_batches("resnet", rank), group=both)
    bt.recalibrate(alone, rank_batches("resnet", rank), group=False)
    return {"grouped": _state(grouped), "alone": _state(alone)}


def _train_running_stats(model: nn.Module, rank: int) -> None:
    model.train()
    with torch.no_grad():
        for batch in sync_data(rank):
            model(batch)


def sync_stats(rank: int) -> dict[str, Any]:
    model = sync_model()
    wrapped = DistributedDataParallel(model)  # broadcasts rank 0's buffers: train after
    _train_running_stats(model, rank)
    before = _state(model)
    assert sync_running_stats(wrapped) is wrapped
    return {"before": before, "after": _state(model)}


def sync_stats_weighted(rank: int) -> dict[str, Any]:
    model = sync_model()
    _train_running_stats(model, rank)
    before = _state(model)
    sync_running_stats(model, weight=100.0 * (1 + 2 * rank))
    return {"before": before, "after": _state(model)}


def stalled_rank(rank: int) -> dict[str, Any]:
    """Rank 1 never calls; rank 0 must end with an error from the group's timeout."""
    short = dist.new_group([0, 1], timeout=timedelta(seconds=GROUP_TIMEOUT_SECONDS))
    model = zoo.build("resnet")
    if rank == 1:
        time.sleep(GROUP_TIMEOUT_SECONDS + 1.5)
        return {"stalled": True}
    return _expect_error(
        model, lambda: bt.recalibrate(model, rank_batches("resnet", 0), group=short)
    )


def _same_case(name: str) -> None:
    """Both ranks at case ``name`` (a case left early by one rank shows here, not later)."""
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, name)
    if len(set(names)) != 1:
        raise RuntimeError(f"ranks are at different cases: {names}")


def _per_rank(first: Callable[..., Any], second: Callable[..., Any]) -> Callable[..., Any]:
    """A call that is ``first`` on rank 0 and ``second`` on rank 1."""

    def call(rank: int, model: nn.Module, batches: list[torch.Tensor]) -> Any:
        return (first if rank == 0 else second)(model, batches)

    return call


MISMATCHES: dict[str, Callable[..., Any]] = {
    "eval_against_train_skip_keep": _per_rank(
        lambda m, b: bt.recalibrate(m, b, mode="eval"),
        lambda m, b: bt.recalibrate(m, b, nonfinite="skip", unreached="keep"),
    ),
    "eval_nonfinite": _per_rank(
        lambda m, b: bt.recalibrate(m, b, mode="eval"),
        lambda m, b: bt.recalibrate(m, b, mode="eval", nonfinite="skip"),
    ),
    "eval_unreached": _per_rank(
        lambda m, b: bt.audit(m, b, mode="eval"),
        lambda m, b: bt.audit(m, b, mode="eval", unreached="keep"),
    ),
    "adapt_prior": _per_rank(
        lambda m, b: bt.adapt(m, b, prior=4), lambda m, b: bt.adapt(m, b, prior=8)
    ),
    "adapt_batch_size": _per_rank(
        lambda m, b: bt.adapt(m, b), lambda m, b: bt.adapt(m, b, batch_size=8)
    ),
    "adapt_never_updated": _per_rank(
        lambda m, b: bt.adapt(m, b, never_updated="raise"), lambda m, b: bt.adapt(m, b)
    ),
    "max_samples": _per_rank(
        lambda m, b: bt.recalibrate(m, b, max_samples=5), lambda m, b: bt.recalibrate(m, b)
    ),
    "tolerance_on_one_rank": _per_rank(
        lambda m, b: bt.recalibrate(m, b, tolerance=0.1), lambda m, b: bt.recalibrate(m, b)
    ),
    "report_eval_on_one_rank": _per_rank(
        lambda m, b: bt.recalibrate_report(m, b, mode="eval"),
        lambda m, b: bt.recalibrate_report(m, b),
    ),
    "tolerance_on_both": _per_rank(
        lambda m, b: bt.recalibrate(m, b, tolerance=0.1),
        lambda m, b: bt.recalibrate(m, b, tolerance=0.1),
    ),
    "eval_one_shot_iterator_on_one_rank": _per_rank(
        lambda m, b: bt.recalibrate(m, iter(b), mode="eval"),
        lambda m, b: bt.recalibrate(m, b, mode="eval"),
    ),
    "never_updated_refused_on_one_rank": _per_rank(
        lambda m, b: bt.adapt(m, b, never_updated="maybe"), lambda m, b: bt.adapt(m, b)
    ),
}
"""Calls that differ between the ranks in an option that changes the result, or that one
rank refuses: every rank must raise the same RankError at once, nothing written."""


def mismatched_calls(rank: int) -> dict[str, Any]:
    results = {}
    for name, call in MISMATCHES.items():
        _same_case(name)
        model = zoo.build("mlp")
        batches = rank_batches("mlp", rank)
        results[name] = _expect_error(model, lambda: call(rank, model, batches))  # noqa: B023
    return results


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    **{f"uneven_{name}": uneven(name) for name in zoo.NAMES},
    "eval_mode_resnet": eval_mode_resnet,
    "eval_mode_subset_resnet": eval_mode_subset_resnet(None),
    "eval_mode_subset_unsized_rank1": eval_mode_subset_resnet(1),
    "eval_mode_late_subset": eval_mode_late_subset,
    "eval_mode_late_subset_joined": eval_mode_late_subset_joined,
    "eval_mode_subset_grown": eval_mode_subset_sized(2**20),
    "eval_mode_subset_shrunk": eval_mode_subset_sized(2**16),
    "eval_mode_one_batch": eval_mode_one_batch(None),
    "eval_mode_one_batch_unjoinable_rank1": eval_mode_one_batch(1),
    "empty_rank0": empty_rank(0),
    "empty_rank1": empty_rank(1),
    "all_empty": all_empty,
    "unreached_on_one_rank": unreached_on_one_rank,
    "unreached_everywhere": unreached_everywhere,
    "nonfinite_on_one_rank": nonfinite_on_one_rank,
    "subgroup_of_one": subgroup_of_one,
    "ddp_wrapped": ddp_wrapped,
    "sync_batchnorm": sync_batchnorm,
    "failing_rank": failing_rank,
    "different_models": different_models,
    "audit_in_group": audit_in_group,
    "adapt_in_group": adapt_in_group,
    "diagnose_in_group": diagnose_in_group,
    "diagnose_with_uneven_test_batches": diagnose_with_uneven_test_batches,
    "diagnose_with_no_test_batch_on_one_rank": diagnose_with_no_test_batch_on_one_rank,
    "explicit_group": explicit_group,
    "sync_stats": sync_stats,
    "sync_stats_weighted": sync_stats_weighted,
    "sync_batchnorm_act": sync_batchnorm_act,
    "mixed_tools": mixed_tools,
    "recalibrate_and_sync": recalibrate_and_sync,
    "unprintable_error": unprintable_error,
    "stalled_rank": stalled_rank,
    "mismatched_calls": mismatched_calls,
}
"""Run in this order; the worker then runs ``dead_rank`` last (rank 1 exits outright)."""
