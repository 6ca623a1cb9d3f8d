"""Run the tests of bnstats.keras and bnstats.flax in processes without torch.

``python tests/run_torch_free.py`` (``.ci/run`` does): one pytest process per Keras backend
(JAX and NumPy; TensorFlow too where it is installed) over ``tests/keras``, and one over
``tests/flax`` and the tests of ``benchmarks/eval_host_one_batch.py`` and
``benchmarks/eval_host_subset.py`` (Keras on JAX, Flax).
Their conftest fails a test that imports torch and skips every test in a process where
torch is already imported (the main test run), so these processes are where they run.
Extra arguments go to pytest. Exits with the first failing status.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def runs() -> list[tuple[dict[str, str], list[str]]]:
    """(environment additions, test paths) of each process."""
    backends = ["jax", "numpy"]
    if importlib.util.find_spec("tensorflow") is not None:
        backends.append("tensorflow")
    keras = [({"KERAS_BACKEND": backend}, ["tests/keras"]) for backend in backends]
    flax = [
        "tests/flax",
        "tests/benchmarks/test_eval_host_one_batch.py",
        "tests/benchmarks/test_eval_host_subset.py",
    ]
    return [*keras, ({"KERAS_BACKEND": "jax"}, flax)]


def main(extra: list[str]) -> int:
    for env, paths in runs():
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths, *extra]
        print(f"$ {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(command[1:])}")
        status = subprocess.call(command, cwd=ROOT, env={**os.environ, **env})
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
