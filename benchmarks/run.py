"""Run the benchmarks: bnstats against its peers, side by side, as ratios.

    python benchmarks/run.py                 # the full run (benchmarks/results.md)
    python benchmarks/run.py --quick         # smaller models and fewer repeats (CI)
    python benchmarks/run.py --only a,b --repeats 11
    python benchmarks/run.py --json          # one JSON object on stdout

Comparisons: a) recalibration, b) inference, c) training cost, d) NumPy engine vs torch,
e) accuracy of the test-time estimators, f) shifted data and adapt. Each runs in this
process, alternating its contenders over several repeats; times are medians, ratios are
medians of ratios paired within a repeat. BLAS, OpenMP and torch threads are pinned to
``--threads`` (default 1) before numpy or torch is imported.
"""

from __future__ import annotations

import argparse
import json
import os
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
}
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, few repeats (CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--only", default=",".join(COMPARISONS), help="comparisons to run, e.g. a,c (default all)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="alternating timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in COMPARISONS]
    if unknown or not keys:
        parser.error(f"--only takes letters from {','.join(COMPARISONS)}, got {args.only!r}")
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
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pin_threads(args.threads)
    here = Path(__file__).resolve().parent  # as a script, benchmarks/ itself is on the path,
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # shadowing names
    for path in (ROOT / "src", ROOT):  # measure this checkout's bnstats
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from benchmarks.config import full_config, quick_config
    from benchmarks.machine import describe
    from benchmarks.report import render, render_machine

    make = quick_config if args.quick else full_config
    config = make(repeats=args.repeats, threads=args.threads)
    command = " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    machine = describe()
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
        missed = [g for r in results for g in r.goals if not g.passed]
        print(f"\n{len(missed)} goal(s) missed" if missed else "\nall goals met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
