"""How many whole-model passes ``mode="eval"`` needs, and iterations tried to need fewer.

``mode="eval"`` looks for the fixed point ``s* = F(s*)`` of eval-mode inference, where
``F(s)`` is every BN layer's input population (mean, unbiased var) when every BN layer
normalizes with ``s``. Part 1 measures bnstats' own ``mode="eval"`` and ``mode="eval_exact"``
on the four test models (``tests/torch/eval_models.py``). Part 2 runs iterations tried as
alternatives, outside bnstats (plain hooks that set each call's statistics), and prints the
worst difference of what each would write from ``eval_exact``:

- ``S0``: bnstats' schedule: batch statistics ``s0``; fixed at ``s0``; tracked (each batch
  at ``s0``, then ``F(s0)`` transported by the batch's per-channel change); fixed at ``t``.
- ``S0 regress``: the same with the transport a paired per-channel regression of the
  tracked run's input on the reference run's (the optimal linear control variate; the same
  samples in both runs): ``a = cov(x_t, x_r) / v_r``, ``mean = m_t + a (F_mean - m_r)``,
  ``var = v_t + a**2 (F_var - v_r)``.
- ``S1``: the batch-statistics run as the first reference (``s0`` its population), then
  fixed at ``t1`` and tracked from that run: 4 passes, 2 forwards in passes 2 and 4.
- ``S3``: two tracked steps in one pass (each batch: batch statistics, tracked from them,
  tracked from that), then fixed: 4 passes, 3 forwards per batch in pass 3.
- ``chained``: each pass tracked from the previous pass's run (its per-batch moments kept,
  one forward per batch and pass), 8 passes.
- ``oracle``: fixed at ``s*`` perturbed by ``eps`` (relative, every channel), then tracked
  and fixed: how close a start must be for one more tracked step to reach 1e-4.

Run: ``PYTHONPATH=src python -m benchmarks.eval_iterations [--only library|attempts]``.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from tests.torch import eval_models
from torch import nn

import bnstats.torch as bt

MODELS = {  # name: (batches, batch size)
    "chain": (16, 64),
    "convchain": (16, 16),
    "residual": (10, 16),
    "dense": (10, 16),
}
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]
Moments = tuple[int, torch.Tensor, torch.Tensor]  # values per channel, mean, biased var
Rule = Callable[[str, int, int, torch.Tensor, torch.Tensor, torch.Tensor], Any]


def build(name: str) -> tuple[nn.Module, list[torch.Tensor]]:
    count, size = MODELS[name]
    return eval_models.build(name), eval_models.batches(name, count, size)


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def buffers(model: nn.Module) -> Stats:
    return {
        n: (m.running_mean.double().clone(), m.running_var.double().clone())
        for n, m in bn_layers(model).items()
    }


def worst(stats: Stats, exact: Stats) -> float:
    """Worst channel over all layers: ``|d var| / var`` and ``|d mean| / sqrt(var)``."""
    result = 0.0
    for name, (mean, var) in exact.items():
        m, v = stats[name]
        result = max(result, float(((v - var).abs() / var).max()))
        result = max(result, float(((m - mean).abs() / var.sqrt()).max()))
    return result


def library_table() -> None:
    print("model      exact passes  eval passes  forwards/batch  worst vs exact  moved")
    for name in MODELS:
        model, data = build(name)
        exact = bt.recalibrate_report(copy.deepcopy(model), data, mode="eval_exact")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = bt.recalibrate_report(model, data, mode="eval")
        forwards = 5 + (0 if result.converged else exact.passes)
        print(
            f"{name:10s} {exact.passes:12d}  {result.passes:11d}  {forwards:14d}  "
            f"{worst(buffers(model), buffers(exact.model)):14.2g}  "
            f"{max(result.moved.values()):.2g}"
        )


# -- part 2: the iterations tried, with plain hooks ---------------------------------------


def moments(x: torch.Tensor) -> Moments:
    x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    return x.shape[1], x.mean(1), x.var(1, unbiased=False)


class Runner:
    """The model in eval mode; at each BN call ``rule(name, call, batch, x, mean, var)``
    gives the statistics to normalize with (None: the buffers)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.rule: Rule | None = None
        self.seen: dict[str, list[Moments]] = {}
        self.kept: dict[str, list[torch.Tensor]] = {}
        for name, layer in bn_layers(model).items():
            layer.register_forward_pre_hook(self._hook(name))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            n, mean, var = moments(x)
            calls = self.seen.setdefault(name, [])
            self.kept.setdefault(name, []).append(x.detach())
            statistics = self.rule(name, len(calls), self.batch, x, mean, var)
            calls.append((n, mean, var))
            if statistics is not None:
                module.running_mean.copy_(statistics[0])
                module.running_var.copy_(statistics[1])

        return hook

    def forward(self, x: torch.Tensor, batch: int, rule: Rule) -> Runner:
        """One forward; afterwards ``seen`` and ``kept`` hold each call's moments and input."""
        self.rule, self.batch, self.seen, self.kept = rule, batch, {}, {}
        with torch.no_grad():
            self.model(x)
        return self

    def run(self, data: list[torch.Tensor], rule: Rule) -> list[dict[str, list[Moments]]]:
        return [self.forward(x, b, rule).seen for b, x in enumerate(data)]


def population(records: list[dict[str, list[Moments]]]) -> Stats:
    """Per layer the mean and unbiased var of every call of every batch (Chan et al.)."""
    merged: dict[str, list[torch.Tensor]] = {}
    for record in records:
        for name, calls in record.items():
            for n, mean, var in calls:
                if name not in merged:
                    merged[name] = [torch.tensor(float(n)), mean, var * n]
                    continue
                count, m, m2 = merged[name]
                total, delta = count + n, mean - m
                merged[name] = [
                    total,
                    m + delta * n / total,
                    m2 + var * n + delta**2 * count * n / total,
                ]
    return {name: (m, m2 / (count - 1)) for name, (count, m, m2) in merged.items()}


def batch_rule(name: str, call: int, batch: int, x: Any, mean: Any, var: Any) -> Any:
    return (mean, var) if x.numel() // x.shape[1] >= 2 else None


def fixed(stats: Stats) -> Rule:
    return lambda name, call, batch, x, mean, var: stats.get(name)


def ratio(base: tuple, reference: Moments, x: torch.Tensor, now: tuple) -> tuple:
    """bnstats' transport: the per-channel affine map from the reference's moments to now's."""
    (base_mean, base_var), (_, m_r, v_r), (m_t, v_t) = base, reference, now
    a2 = torch.where(v_r > 0, v_t / torch.where(v_r > 0, v_r, 1.0), 1.0)
    return m_t + a2.sqrt() * (base_mean - m_r), base_var * a2


def regress(base: tuple, reference: torch.Tensor, x: torch.Tensor, now: tuple) -> tuple:
    """Paired per-channel regression of the input on the reference run's (same samples)."""
    (base_mean, base_var) = base
    xr = reference.double().transpose(0, 1).reshape(reference.shape[1], -1)
    xt = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    m_r, m_t, v_r, v_t = (
        xr.mean(1),
        xt.mean(1),
        xr.var(1, unbiased=False),
        xt.var(1, unbiased=False),
    )
    cov = ((xr - m_r[:, None]) * (xt - m_t[:, None])).mean(1)
    a = torch.where(v_r > 0, cov / torch.where(v_r > 0, v_r, 1.0), 1.0)
    return m_t + a * (base_mean - m_r), v_t + a * a * (base_var - v_r)


def tracked(base: Stats, runner: Runner, transport: Callable) -> Rule:
    """The rule of a run after ``runner``'s reference run of the same batch."""
    seen, kept = dict(runner.seen), dict(runner.kept)
    exact_ref = transport is regress

    def rule(name: str, call: int, batch: int, x: Any, mean: Any, var: Any) -> Any:
        if name not in base or call >= len(seen.get(name, [])):
            return None
        reference = kept[name][call] if exact_ref else seen[name][call]
        return transport(base[name], reference, x, (mean, var))

    return rule


def tracked_pass(r: Runner, data: list, reference: Rule, base: Stats, transport: Callable) -> Stats:
    records = []
    for b, x in enumerate(data):
        rule = tracked(base, r.forward(x, b, reference), transport)
        records.append(r.forward(x, b, rule).seen)
    return population(records)


def schedule_s0(r: Runner, data: list, transport: Callable) -> Stats:
    s0 = population(r.run(data, batch_rule))
    base = population(r.run(data, fixed(s0)))
    t = tracked_pass(r, data, fixed(s0), base, transport)
    return population(r.run(data, fixed(t)))


def schedule_s1(r: Runner, data: list, transport: Callable) -> Stats:
    s0 = population(r.run(data, batch_rule))
    t1 = tracked_pass(r, data, batch_rule, s0, transport)
    base = population(r.run(data, fixed(t1)))
    return tracked_pass(r, data, fixed(t1), base, transport)


def schedule_s3(r: Runner, data: list, transport: Callable) -> Stats:
    s0 = population(r.run(data, batch_rule))
    t1 = tracked_pass(r, data, batch_rule, s0, transport)
    records = []
    for b, x in enumerate(data):
        first = tracked(s0, r.forward(x, b, batch_rule), transport)
        second = tracked(t1, r.forward(x, b, first), transport)
        records.append(r.forward(x, b, second).seen)
    return population(r.run(data, fixed(population(records))))


def chained(r: Runner, data: list, passes: int) -> list[Stats]:
    """Each pass tracked from the previous pass's run of the batch (moments kept)."""
    records = r.run(data, batch_rule)
    history = [population(records)]
    for _ in range(passes - 1):
        previous, base, records = records, history[-1], []
        for b, x in enumerate(data):

            def rule(name, call, batch, x, mean, var, seen=previous[b], base=base):  # noqa: ANN001
                if name not in base or call >= len(seen.get(name, [])):
                    return None
                return ratio(base[name], seen[name][call], x, (mean, var))

            records.append(r.forward(x, b, rule).seen)
        history.append(population(records))
    return history


def oracle(r: Runner, data: list, exact: Stats, eps: float) -> float:
    gen = torch.Generator().manual_seed(5)

    def noise(t: torch.Tensor) -> torch.Tensor:
        return eps * torch.randn(t.shape, generator=gen, dtype=t.dtype)

    start = {k: (m + v.sqrt() * noise(m), v * (1 + noise(v)).abs()) for k, (m, v) in exact.items()}
    base = population(r.run(data, fixed(start)))
    t = tracked_pass(r, data, fixed(start), base, ratio)
    return worst(population(r.run(data, fixed(t))), exact)


def attempts() -> None:
    rows = [
        ("S0 (bnstats)", 4, 5, lambda r, d: schedule_s0(r, d, ratio)),
        ("S0 regress", 4, 5, lambda r, d: schedule_s0(r, d, regress)),
        ("S1", 4, 6, lambda r, d: schedule_s1(r, d, ratio)),
        ("S3", 4, 7, lambda r, d: schedule_s3(r, d, ratio)),
    ]
    print("attempt       model      passes  forwards/batch  worst vs exact")
    for name in MODELS:
        model, data = build(name)
        exact = buffers(bt.recalibrate(copy.deepcopy(model), data, mode="eval_exact"))
        for label, passes, forwards, run in rows:
            got = run(Runner(copy.deepcopy(model)), data)
            print(f"{label:13s} {name:10s} {passes:6d}  {forwards:14d}  {worst(got, exact):.2g}")
        history = chained(Runner(copy.deepcopy(model)), data, 8)
        per_pass = " ".join(f"{worst(h, exact):.2g}" for h in history)
        print(f"{'chained':13s} {name:10s} {8:6d}  {8:14d}  per pass: {per_pass}")
        if name in ("chain", "convchain"):
            for eps in (1e-2, 1e-3, 1e-4):
                error = oracle(Runner(copy.deepcopy(model)), data, exact, eps)
                print(f"{'oracle':13s} {name:10s} from s* + {eps:g}, tracked, fixed: {error:.2g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("library", "attempts"), default=None)
    args = parser.parse_args(argv)
    if args.only in (None, "library"):
        library_table()
    if args.only in (None, "attempts"):
        attempts()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
