"""The process-group plumbing of bnstats' tools: which group, agreeing first, gathering float64.

Every tool that works across ``torch.distributed`` ranks follows one protocol:

1. each rank does its local work (the pass over its own batches) inside
   :func:`run_and_exchange`, which catches any ``Exception``;
2. every rank, failed or not, reaches ONE status exchange (``all_gather_object`` of a small
   record: the error message or a summary of the local result);
3. if any rank failed, every rank raises the same :class:`RankError`, naming the failed
   ranks and their messages, before any data collective: nothing is written anywhere;
4. otherwise the data goes in a single ``all_gather`` of one flat float64 tensor per rank
   (:func:`exchange`: each rank's records, :func:`pack`-ed and :func:`unpack`-ed by one
   layout), and every rank merges the same numbers in rank order.

A rank that dies outright (killed, out of memory) never reaches step 2: the others learn of
it from the process group, either at once (gloo reports a closed connection) or when the
group's ``timeout`` (``init_process_group(timeout=...)``) expires.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

Group = Any
"""``group=`` of the tools: ``None`` (the default process group when torch.distributed is
initialized and has more than one rank, else no group), ``False`` (no group: this process's
data only), or a ``torch.distributed.ProcessGroup``."""

T = TypeVar("T")

_MAX_MESSAGE = 2000


class RankError(RuntimeError):
    """A rank of the process group failed, the ranks disagree, or the group itself failed.

    ``failures`` maps each failed rank (global rank) to its message (empty when the process
    group failed: a rank died or did not arrive within the group's timeout); ``world_size``
    is the size of the group. When a rank failed or the ranks disagree, every rank raises
    this error with the same message, and no rank wrote anything.
    """

    def __init__(self, message: str, failures: dict[int, str], world_size: int) -> None:
        super().__init__(message)
        self.failures = dict(failures)
        self.world_size = world_size

    @classmethod
    def of_ranks(cls, failures: dict[int, str], world_size: int, what: str) -> RankError:
        """The error for ranks that failed (or disagree): ``what`` they did, and why."""
        ranks = ", ".join(str(rank) for rank in sorted(failures))
        label = "rank" if len(failures) == 1 else "ranks"
        details = "; ".join(f"rank {rank}: {failures[rank]}" for rank in sorted(failures))
        message = (
            f"{label} {ranks} of {world_size} {what}, so no rank changed its statistics. {details}"
        )
        return cls(message, failures, world_size)


def resolve_group(group: Group) -> Any:
    """The process group to merge over, or None to work on this process's data alone.

    ``None``: the default group if torch.distributed is available, initialized and has more
    than one rank; ``False``: no group; a ``ProcessGroup``: that group (None if it has one
    rank). Raises ``TypeError`` for anything else and ``ValueError`` for a group this process
    is not a member of, or a group given while torch.distributed is not initialized.
    """
    if group is False:
        return None
    available = torch.distributed.is_available()
    if group is None:
        if not (available and torch.distributed.is_initialized()):
            return None
        group = torch.distributed.group.WORLD
    elif available and _left_out(group):
        raise ValueError(
            "this process is not a member of the process group given as group= (on the "
            "ranks it leaves out, torch.distributed.new_group returns a placeholder)"
        )
    elif not available or not isinstance(group, torch.distributed.ProcessGroup):
        raise TypeError(
            "group must be None (the default process group, if initialized), False (no "
            f"group) or a torch.distributed.ProcessGroup, got {type(group).__name__}"
        )
    elif not torch.distributed.is_initialized():
        raise ValueError("group= was given but torch.distributed is not initialized")
    if torch.distributed.get_rank(group) < 0:
        raise ValueError("this process is not a member of the process group given as group=")
    return group if torch.distributed.get_world_size(group) > 1 else None


def rank_count(group: Group) -> int:
    """The ranks whose batches together are the data under ``group``
    (:func:`resolve_group`): 1 without one."""
    chosen = resolve_group(group)
    return 1 if chosen is None else torch.distributed.get_world_size(chosen)


def _left_out(group: Any) -> bool:
    """True for what ``new_group`` returns on a rank outside the group (an int marker)."""
    marker = torch.distributed.GroupMember.NON_GROUP_MEMBER
    return type(group) is type(marker) and group == marker


def global_rank(group: Any, group_rank: int) -> int:
    """The global rank of ``group``'s rank ``group_rank`` (the same for the default group)."""
    return torch.distributed.get_global_rank(group, group_rank)


def _describe(error: BaseException) -> str:
    try:
        text = f"{type(error).__name__}: {error}"
    except Exception:  # an exception whose __str__ raises still reaches the exchange
        text = f"{type(error).__name__} (its message could not be read)"
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def run_and_exchange(
    group: Any, local: Callable[[], tuple[T, Any]], call: dict[str, Any]
) -> tuple[T, list[Any]]:
    """Run ``local()`` on this rank, then exchange every rank's outcome; raise if any failed.

    ``call`` names the tool and its options (``{"tool": "recalibrate", ...}``); ``local()``
    returns ``(result, summary)``, ``summary`` a small picklable object every rank receives.
    One ``all_gather_object`` carries ``(call, error message or None, summary)`` from every
    rank. If the ranks made different calls (rank 0 recalibrating while rank 1 audits), or
    any rank failed, every rank raises :class:`RankError` (chained to the local exception on
    the rank that raised it); otherwise this returns this rank's ``result`` and every rank's
    ``summary``, in rank order. ``BaseException``s that are not ``Exception``s
    (``KeyboardInterrupt``) propagate at once; the others then see the group fail or time out.
    """
    error: Exception | None = None
    result: Any = None
    summary: Any = None
    try:
        result, summary = local()
    except Exception as caught:
        error = caught
    mine = (call, None if error is None else _describe(error), summary)
    outcomes: list[Any] = [None] * torch.distributed.get_world_size(group)
    with _collective(group, "status exchange", error):
        torch.distributed.all_gather_object(outcomes, mine, group=group)
    differing = {
        global_rank(group, rank): f"called {_describe_call(other)}"
        for rank, (other, _, _) in enumerate(outcomes)
        if other != outcomes[0][0]
    }
    if differing:
        what = f"did not make the same call as rank 0 ({_describe_call(outcomes[0][0])})"
        raise RankError.of_ranks(differing, len(outcomes), what) from error
    failures = {
        global_rank(group, rank): message
        for rank, (_, message, _) in enumerate(outcomes)
        if message is not None
    }
    if failures:
        raise RankError.of_ranks(failures, len(outcomes), "failed") from error
    return result, [summary for _, _, summary in outcomes]


def _describe_call(call: Any) -> str:
    if not isinstance(call, dict):
        return repr(call)
    options = ", ".join(f"{key}={value!r}" for key, value in call.items() if key != "tool")
    return f"{call.get('tool')}({options})"


def check_same_layers(group: Any, layouts: list[list[tuple[str, int, str]]]) -> None:
    """Raise :class:`RankError` on every rank unless all ranks list the same BN layers.

    ``layouts[rank]`` is that rank's ``[(qualified name, num_features, buffer dtype), ...]``
    in model order; the flat tensors exchanged later are laid out by it.
    """
    first = layouts[0]
    differing = {}
    for rank, layout in enumerate(layouts[1:], start=1):
        if layout != first:
            differing[global_rank(group, rank)] = _first_difference(first, layout)
    if differing:
        what = "did not hold the same BN layers as rank 0"
        raise RankError.of_ranks(differing, len(layouts), what)


def layout_of(layers: dict[str, Any]) -> list[tuple[str, int, str]]:
    """``[(name, num_features, running_mean dtype), ...]`` of BN layers by qualified name."""
    return [
        (name, int(layer.num_features), str(layer.running_mean.dtype))
        for name, layer in layers.items()
    ]


def _first_difference(first: list[tuple[str, int, str]], other: list[tuple[str, int, str]]) -> str:
    for index, (a, b) in enumerate(zip(first, other, strict=False)):
        if a != b:
            return (
                f"its BN layer {index} is {b[0]!r} ({b[1]} features, {b[2]}) where rank 0's "
                f"is {a[0]!r} ({a[1]} features, {a[2]})"
            )
    return f"it has {len(other)} BN layers where rank 0 has {len(first)}"


def collective_device(group: Any) -> torch.device:
    """Where the group's collectives take tensors: the current CUDA device under NCCL, else
    the CPU (gloo, and ``"cpu:gloo,cuda:nccl"``, take CPU tensors)."""
    if str(torch.distributed.get_backend(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_float64(group: Any, flat: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``flat`` (1-D, the same length on every rank), in float64 on the CPU, in
    rank order: one ``all_gather``."""
    sent = flat.to(device=collective_device(group), dtype=torch.float64).contiguous()
    received = [torch.empty_like(sent) for _ in range(torch.distributed.get_world_size(group))]
    with _collective(group, "exchange of statistics"):
        torch.distributed.all_gather(received, sent, group=group)
    return [tensor.cpu() for tensor in received]


Sizes = Sequence[Sequence[int]]
"""The layout of :func:`pack`'s records: per record, the length of each of its parts."""


def pack(records: Iterable[Sequence[Any]]) -> torch.Tensor:
    """Every record's parts end to end, as one flat float64 tensor on the CPU. A part is a
    1-D NumPy array or tensor (any device) or a sequence of numbers (a header)."""
    parts = [
        torch.as_tensor(part).detach().to(dtype=torch.float64, device="cpu").reshape(-1)
        for record in records
        for part in record
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def unpack(flat: torch.Tensor, sizes: Sizes) -> list[list[torch.Tensor]]:
    """:func:`pack`'s inverse: ``flat`` cut into records of parts of these ``sizes``."""
    pieces = iter(flat.split([size for record in sizes for size in record]))
    return [[next(pieces) for _ in record] for record in sizes]


def exchange(
    group: Any, records: Iterable[Sequence[Any]], sizes: Sizes
) -> list[list[list[torch.Tensor]]]:
    """Every rank's ``records`` (laid out by ``sizes``, the same on every rank), in float64
    on the CPU, in rank order: one ``all_gather`` of the :func:`pack`-ed tensor."""
    return [unpack(flat, sizes) for flat in all_gather_float64(group, pack(records))]


@contextmanager
def _collective(group: Any, step: str, local_error: Exception | None = None) -> Iterator[None]:
    """Turn a failure of the process group itself into a :class:`RankError` saying so."""
    try:
        yield
    except RuntimeError as failure:
        size = torch.distributed.get_world_size(group)
        mine = "" if local_error is None else f" (this rank had failed: {_describe(local_error)})"
        raise RankError(
            f"the process group of {size} ranks failed during bnstats' {step}: a rank died, "
            "or did not reach it within the group's timeout (init_process_group(timeout=...)); "
            f"this rank changed no statistics{mine}. If only some ranks make this call, pass "
            f"group=False there. {_describe(failure)}",
            {},
            size,
        ) from failure
