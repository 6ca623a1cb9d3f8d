"""Run the benchmarks: bnstats against its peers, side by side, as ratios.

    python benchmarks/run.py                 # the full run (benchmarks/results.md)
    python benchmarks/run.py --quick         # smaller models and fewer repeats (CI)
    python benchmarks/run.py --only a,b --repeats 11
    python benchmarks/run.py --json          # one JSON object on stdout
    python benchmarks/run.py --device cuda   # a, b, c and g on a GPU

Comparisons: a) recalibration, b) inference, c) training cost, d) NumPy engine vs torch,
e) accuracy of the test-time estimators, f) shifted data and adapt, g) fold before
torch.compile. Each runs in this process, alternating its contenders over several repeats;
times are medians, ratios are medians of ratios paired within a repeat. BLAS, OpenMP and
torch threads are pinned to ``--threads`` (default 1) before numpy or torch is imported.

``--device cuda`` runs a, b, c and g with models and data on the GPU, wall-clock times
between ``torch.cuda.synchronize()`` calls, and the narrow-precision rows (bfloat16
autocast training step, float16 inference and compile). On the CPU the default is a-f:
g compiles with inductor, tens of seconds per model there; ``--only g`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMPARISONS = {
    "a": "recalibration",
    "b": "inference",
    "c": "training_cost",
    "d": "engine_speed",
    "e": "estimator_accuracy",
    "f": "shifted_data",
    "g": "compiled",
}
DEVICE_COMPARISONS = ("a", "b", "c", "g")  # the ones that run on a GPU
CPU_DEFAULT = ("a", "b", "c", "d", "e", "f")
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small models, few repeats (CI)")
    sizes.add_argument(
        "--tiny", action="store_true", help="minimal sizes, numbers meaningless (harness tests)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--device", default="cpu", help="cpu (default), cuda or cuda:N: where a, b, c, g run"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comparisons to run, e.g. a,c (default a-f on the CPU, a,b,c,g on a GPU)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="alternating timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device takes cpu, cuda or cuda:N, got {args.device!r}")
    on_gpu = args.device != "cpu"
    if args.only is None:
        args.only = ",".join(DEVICE_COMPARISONS if on_gpu else CPU_DEFAULT)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in COMPARISONS]
    if unknown or not keys:
        parser.error(f"--only takes letters from {','.join(COMPARISONS)}, got {args.only!r}")
    cpu_only = [k for k in keys if k not in DEVICE_COMPARISONS]
    if on_gpu and cpu_only:
        parser.error(
            f"comparison(s) {','.join(cpu_only)} run on the CPU only; "
            f"--device {args.device} takes {','.join(DEVICE_COMPARISONS)}"
        )
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    args.keys = keys
    return args


def pin_threads(threads: int) -> None:
    """Fix the thread count of OpenMP, OpenBLAS, MKL (environment, read at import) and torch."""
    for variable in _THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:
        pass


def run_all(keys: list[str], config: Any, log: Any = sys.stderr) -> list[Any]:
    """Run the comparisons named by ``keys`` in order; each result carries its wall time."""
    import importlib

    results = []
    for key in keys:
        module = importlib.import_module(f"benchmarks.{COMPARISONS[key]}")
        if log is not None:
            print(f"[{key}] {COMPARISONS[key]} ...", file=log, flush=True)
        start = time.perf_counter()
        result = module.run(config)
        result.seconds = time.perf_counter() - start
        results.append(result)
    return results


def use_this_checkout() -> None:
    """Import this checkout's ``benchmarks`` and ``bnstats`` (as a script, benchmarks/ itself
    is first on the path, its modules shadowing names such as ``inference``)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    for path in (ROOT / "src", ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def _use_device(device: str) -> str | None:
    """Select ``device``; why it cannot be used, in one line, or None."""
    use_this_checkout()
    from benchmarks.device import device_problem, select

    problem = device_problem(device)
    if problem is None:
        select(device)
    return problem


def report_object(
    command: str, started: str, seconds: float, config: Any, machine: dict, results: list
) -> dict[str, Any]:
    """Everything ``--json`` prints: the command, when, how long, the configuration, the
    machine and every comparison's result."""
    return {
        "command": command,
        "started": started,
        "seconds": round(seconds, 1),
        "config": asdict(config),
        "machine": machine,
        "results": {r.key: r.to_dict() for r in results},
        "goals_missed": [f"{r.key}: {g.text}" for r in results for g in r.goals if not g.passed],
        "goals_missed_expected_at_quick_sizes": [
            f"{r.key}: {g.text}" for r in results for g in r.goals if g.expected_miss
        ],
    }


def missed_summary(results: list[Any]) -> str:
    """The closing lines: how many goals were missed and, of those, which a quick run's sizes
    explain (goals set for the full run's sizes, see ``Goal.full_size_only``), and why."""
    from benchmarks.report import fmt

    missed = [(r.key, g) for r in results for g in r.goals if not g.passed]
    if not missed:
        return "all goals met"
    expected = [(key, g) for key, g in missed if g.expected_miss]
    if not expected:
        return f"{len(missed)} goal(s) missed"
    others = [(key, g) for key, g in missed if not g.expected_miss]
    lines = [
        f"{len(missed)} goal(s) missed; {len(expected)} of them are expected at quick sizes "
        "(their goals are set for the full run's sizes):",
        *(f"  {key}: {g.text}: {fmt(g.value)} ({g.full_size_only})" for key, g in expected),
    ]
    if others:
        lines.append(f"{len(others)} not explained by the quick sizes:")
        lines += [f"  {key}: {g.text}: {fmt(g.value)}" for key, g in others]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pin_threads(args.threads)
    problem = _use_device(args.device)
    if problem:
        print(f"run.py: error: {problem}", file=sys.stderr)
        return 2
    from benchmarks.config import full_config, on_device, quick_config, tiny_config
    from benchmarks.machine import describe
    from benchmarks.report import render, render_machine

    make = tiny_config if args.tiny else quick_config if args.quick else full_config
    config = on_device(make(repeats=args.repeats, threads=args.threads), args.device)
    command = " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    machine = describe(config.device)
    wall = time.perf_counter()
    results = run_all(args.keys, config)
    wall = time.perf_counter() - wall
    machine["load_average_after"] = describe()["load_average"]
    if args.json:
        report = report_object(command, started, wall, config, machine, results)
        print(json.dumps(report, indent=2, default=float))
    else:
        print(f"$ {command}\n{started}, {wall:.0f} s\n")
        print(render_machine(machine))
        for result in results:
            print("\n" + render(result))
        print("\n" + missed_summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
