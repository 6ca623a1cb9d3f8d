"""The benchmarks' device option: ``--device cpu`` runs the GPU comparisons (a, b, c, g) end to
end on the tiny configuration, ``--device cuda`` without CUDA is one line and exit status 2,
and timed blocks wait for the device before their clocks start and stop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import benchmarks.run as runner
import pytest
import torch
from benchmarks.config import full_config, on_device, quick_config, tiny_config
from benchmarks.timing import Contender, alternate, synchronizer

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(ROOT / "benchmarks" / "run.py")]


def run_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_the_gpu_comparisons_run_on_the_cpu_with_the_tiny_configuration():
    done = run_script("--tiny", "--device", "cpu", "--only", "a,b,c,g", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["config"]["device"] == "cpu"
    assert set(report["results"]) == {"a", "b", "c", "g"}
    for result in report["results"].values():
        assert result["settings"]["device"] == "cpu" and result["goals"]
    training = report["results"]["c"]["data"]
    assert {"timings", "timings_bfloat16_autocast"} <= set(training)
    inference = report["results"]["b"]["data"]
    assert {"batch_1", "batch_4", "batch_1_float16", "batch_4_float16"} <= set(inference)
    compiled = report["results"]["g"]["data"]["batch_4"]
    assert set(compiled["compile_s"]) == {"compile", "bt.fold + compile"}
    assert compiled["bt.fold + compile"]["output_rel_diff"] < 1e-2  # float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_one_line_and_status_2():
    done = run_script("--tiny", "--device", "cuda", timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--device cuda: CUDA is not available" in lines[0] and "Traceback" not in done.stderr


def test_device_arguments():
    assert runner.parse_args(["--device", "cuda"]).keys == ["a", "b", "c", "g"]
    assert runner.parse_args([]).keys == ["a", "b", "c", "d", "e", "f"]
    assert runner.parse_args(["--device", "cuda:1", "--only", "g"]).keys == ["g"]
    for wrong in (["--device", "gpu"], ["--device", "cuda", "--only", "a,d"]):
        with pytest.raises(SystemExit):
            runner.parse_args(wrong)


def test_a_gpu_configuration_adds_the_narrow_precisions_and_times_wall_clock():
    gpu = on_device(full_config(), "cuda")
    assert gpu.basis == "wall" and gpu.image_size == 224 and gpu.inference_batches == (1, 64)
    assert gpu.train_precisions == ("float32", "bfloat16") and gpu.compile_dtype == "float16"
    quick = on_device(quick_config(), "cuda")
    assert quick.fold_dtypes == ("float32", "float16") and quick.resnet_widths == (
        64,
        128,
        256,
        512,
    )
    assert quick.repeats == quick_config().repeats and quick.image_size == 224
    assert on_device(quick_config(), "cpu").basis == "cpu"
    assert on_device(tiny_config(), "cpu") == tiny_config()


def test_timed_blocks_wait_for_the_device_before_and_after_the_calls():
    events: list[str] = []
    contender = Contender("a", lambda _s: events.append("run"), lambda: events.append("prepare"))
    alternate([contender], repeats=2, warmup=0, sync=lambda: events.append("sync"))
    assert events == ["prepare", "sync", "run", "sync"] * 2
    assert synchronizer("cpu")() is None
