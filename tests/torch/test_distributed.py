"""Statistics across torch.distributed ranks: exact over the union, identical on every rank.

Two processes (gloo, 127.0.0.1, a free port) are started ONCE for the module and run every
scenario of :mod:`tests.torch.distributed_scenarios` in order, saving each rank's results;
each test below checks one scenario against a single-process reference computed here on
the concatenated batches (rank 0's, then rank 1's). The pair runs under a hard timeout and
is killed if it overruns; collectives have timeouts too. The example runs under torchrun.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import bnstats.torch as bt
from tests.doc_examples import shown_output
from tests.torch import distributed_scenarios as sc
from tests.torch import eval_models, zoo
from tests.torch import reference as ref
from tests.torch import timm_patterns as timm
from tests.torch.distributed_compare import (
    RTOL,
    assert_bit_identical,
    assert_both_equal_reference,
    concatenated,
    max_relative_difference,
    single_process,
)
from tests.torch.extra_models import AuxiliaryHead

ROOT = Path(__file__).resolve().parents[2]
PAIR_TIMEOUT = 150.0  # seconds for the whole pair; it takes ~15 s on 2 cores
DEAD_RANK_EXIT_CODE = 3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _child_env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _run_bounded(commands: list[list[str]], logs: list[Path], timeout: float) -> list[int | None]:
    """Start ``commands`` together; wait at most ``timeout`` s in all; kill what is left.
    Return codes (None: killed at the deadline)."""
    processes = []
    for command, log in zip(commands, logs, strict=True):
        with open(log, "wb") as sink:
            processes.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=_child_env(), stdout=sink, stderr=subprocess.STDOUT
                )
            )
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    try:
        for process in processes:
            try:
                codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return codes


@dataclass
class Pair:
    out: Path
    codes: list[int | None]
    logs: list[Path]

    def results(self, name: str) -> tuple[dict, dict]:
        """Both ranks' results of scenario ``name``; fails the test with the logs if missing."""
        records = []
        for rank in (0, 1):
            path = self.out / f"{name}.rank{rank}.pt"
            if not path.exists():
                tails = "\n".join(log.read_text(errors="replace")[-3000:] for log in self.logs)
                pytest.fail(f"no result for {name} on rank {rank} (codes {self.codes}):\n{tails}")
            record = torch.load(path, weights_only=False)
            if record["error"] is not None:
                pytest.fail(f"scenario {name} raised on rank {rank}:\n{record['error']}")
            records.append(record["result"])
        return records[0], records[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """References run single-threaded, as the workers do: torch's float32 kernels (the
    model's forward, before any statistics) reduce in a thread-count-dependent order, which
    moves a mean by ~1e-6 of its standard deviation on activations whose mean dwarfs their
    spread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    out = tmp_path_factory.mktemp("ranks")
    port = str(_free_port())
    worker = [sys.executable, "-m", "tests.torch.distributed_worker"]
    commands = [[*worker, str(rank), "2", port, str(out)] for rank in (0, 1)]
    logs = [out / f"rank{rank}.log" for rank in (0, 1)]
    return Pair(out, _run_bounded(commands, logs, PAIR_TIMEOUT), logs)


# -- recalibrate in a group ---------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.NAMES)
def test_uneven_ranks_equal_one_process_on_the_concatenated_batches(pair, name):
    results = pair.results(f"uneven_{name}")
    expected = single_process(zoo.build(name), concatenated(name))
    assert_both_equal_reference(results, expected)
    tracked = [v for k, v in results[0]["state"].items() if k.endswith("num_batches_tracked")]
    assert all(int(v) == len(sc.RANK_SIZES[0]) + len(sc.RANK_SIZES[1]) for v in tracked)
    # the merge is not a no-op: rank 0's data alone gives other statistics
    alone = single_process(zoo.build(name), sc.rank_batches(name, 0))
    assert max_relative_difference(results[0]["state"], alone, integers=False) > 1e-3


def test_eval_mode_in_a_group_equals_one_process_on_the_concatenated_batches(pair):
    results = pair.results("eval_mode_resnet")
    expected = single_process(zoo.build("resnet"), concatenated("resnet"), mode="eval")
    assert_both_equal_reference(results, expected)
    train = single_process(zoo.build("resnet"), concatenated("resnet"))
    assert max_relative_difference(results[0]["state"], train, integers=False) > 1e-3


@pytest.mark.parametrize(
    ("scenario", "path"),
    [
        ("eval_mode_subset_resnet", "iterate_from_subset"),
        ("eval_mode_subset_unsized_rank1", "iterate_with_subset"),
    ],
)
def test_eval_mode_through_a_subset_in_a_group_reaches_the_level_by_level_statistics(
    pair, scenario, path
):
    """The subset iteration in a group: each rank's first batch is its part of the subset,
    every rank takes the same path (the subset solved first where every rank's batches have
    a length; the batch-statistics pass first where one rank's have none), makes the same
    passes and ends bit-identical, within 1e-4 of level by level over the concatenated
    batches."""
    first, second = pair.results(scenario)
    assert first["taken"] == second["taken"] == [path]
    assert first["passes"] == second["passes"] and first["subset"] == second["subset"]
    assert first["subset"][0] > 0 and first["subset"][1] == 2  # one batch on each rank
    assert_bit_identical(first["state"], second["state"])
    exact = single_process(zoo.build("resnet"), concatenated("resnet"), mode="eval_exact")
    assert max_relative_difference(first["state"], exact, integers=False) < 1e-4


def test_eval_mode_goes_on_with_a_late_subset_in_a_group(pair):
    """1,024 samples, half on each rank, where four whole passes leave the conv chain
    unconverged: the late subset is each rank's first 2 batches (64 samples over both), every
    rank makes the same passes and ends bit-identical, within 1e-4 of level by level in one
    process over the concatenated batches."""
    first, second = pair.results("eval_mode_late_subset")
    assert first["passes"] == second["passes"] <= 8 and first["subset"] == second["subset"]
    assert first["subset"][0] > 0 and first["subset"][1] == 4
    assert_bit_identical(first["state"], second["state"])
    exact = ref.snapshot(eval_models.level_by_level("convchain", 64, 16).model)
    assert max_relative_difference(first["state"], exact, integers=False) < 1e-4


def test_a_late_subset_that_joins_is_solved_in_one_forward_on_every_rank(pair):
    """Smaller data over the budget whose late subset (each rank's first 2 batches, judged
    by the subset's own pass over both ranks) joins within it: every rank gathers both
    ranks' late subsets and solves them in one forward a round (two subset passes a round,
    the correction's and the solve's, where by passes the conv chain's late subset took 50
    over 4 whole passes' rounds in one process); bit-identical on both ranks, within 1e-4
    of level by level over the concatenated batches."""
    first, second = pair.results("eval_mode_late_subset_joined")
    assert first["passes"] == second["passes"] > 4 and first["subset"] == second["subset"]
    assert first["subset"] == (2 * (first["passes"] - 4), 4)
    assert_bit_identical(first["state"], second["state"])
    exact = ref.snapshot(eval_models.level_by_level("convchain", 64, 16).model)
    assert max_relative_difference(first["state"], exact, integers=False) < 1e-4


@pytest.mark.parametrize(("scenario", "batches"), [("grown", 8), ("shrunk", 2)])
def test_a_subset_sized_to_the_budget_is_solved_in_one_forward_on_every_rank(
    pair, scenario, batches
):
    """Data over the budget with subsets of each rank's first 2 batches: where those join
    within it, the subset grows to an eighth of the data (each rank's first 4 batches);
    where they do not, it shrinks to each rank's first batch. Every rank gathers both ranks'
    subsets and solves them in one forward a round (the two subsets' batch-statistics
    passes, then two subset passes a round: without the joined forward each solve takes a
    pass per depth level that the subset moves), and takes rank 0's statistics:
    bit-identical on both ranks, within 1e-4 of level by level in one process over the
    concatenated batches."""
    first, second = pair.results(f"eval_mode_subset_{scenario}")
    assert first["passes"] == second["passes"] and first["subset"] == second["subset"]
    assert first["subset"] == (3 + 2 * (first["passes"] - 1), batches)
    assert_bit_identical(first["state"], second["state"])
    exact = ref.snapshot(eval_models.level_by_level("convchain", 64, 16).model)
    assert max_relative_difference(first["state"], exact, integers=False) < 1e-4


def test_eval_mode_runs_all_ranks_data_as_one_batch_on_every_rank(pair):
    """The conv chain's 1,024 samples, half on each rank: every rank gathers both halves and
    runs them as one batch, then one check pass over each rank's batches (three passes,
    against 6 with the late subset): bit-identical on both ranks, one process's result on
    the same batches, within 1e-4 of level by level."""
    first, second = pair.results("eval_mode_one_batch")
    assert first["passes"] == second["passes"] == 3 and first["subset"] == (0, 0)
    assert_bit_identical(first["state"], second["state"])
    batches = eval_models.batches("convchain", 64, 16)
    one = single_process(eval_models.build("convchain"), batches, mode="eval")
    assert max_relative_difference(first["state"], one) <= RTOL
    exact = ref.snapshot(eval_models.level_by_level("convchain", 64, 16).model)
    assert max_relative_difference(first["state"], exact, integers=False) < 1e-4


def test_batches_that_do_not_join_on_one_rank_send_every_rank_to_the_passes(pair):
    """Rank 1's batches hold images of two sizes: they do not join, the first exchange says
    so, and both ranks take the four passes and the late subset, the same passes, within
    1e-4 of level by level on the same batches."""
    first, second = pair.results("eval_mode_one_batch_unjoinable_rank1")
    assert first["passes"] == second["passes"] > 3 and first["subset"] == second["subset"]
    assert_bit_identical(first["state"], second["state"])
    batches = eval_models.batches("convchain", 64, 16)
    batches[33] = batches[33][:, :, :7, :7]  # rank 1's second batch
    exact = single_process(eval_models.build("convchain"), batches, mode="eval_exact")
    assert max_relative_difference(first["state"], exact, integers=False) < 1e-4


@pytest.mark.parametrize("empty", [0, 1])
def test_an_empty_rank_is_fine_when_another_has_batches(pair, empty):
    other = 1 - empty
    expected = single_process(zoo.build("resnet"), sc.rank_batches("resnet", other))
    assert_both_equal_reference(pair.results(f"empty_rank{empty}"), expected)


def assert_same_refusal(results: tuple[dict, dict], error: str, text: str) -> None:
    """Both ranks raised ``error`` with the same message, holding ``text``; nothing changed."""
    first, second = results
    assert first["type"] == second["type"] == error
    assert first["message"] == second["message"]
    assert text in first["message"]
    assert first["unchanged"] and second["unchanged"]


def test_all_ranks_empty_fail_everywhere_with_the_same_clear_error(pair):
    assert_same_refusal(pair.results("all_empty"), "ValueError", "no batch on any of the 2 ranks")


def test_a_layer_reached_on_one_rank_only_takes_that_ranks_data(pair):
    torch.manual_seed(3)
    model = AuxiliaryHead()
    batches = sc.aux_batches(0) + sc.aux_batches(1)
    expected = single_process(model, batches, forward=sc.aux_forward)
    assert_both_equal_reference(pair.results("unreached_on_one_rank"), expected)


def test_a_layer_reached_on_no_rank_fails_everywhere_naming_it(pair):
    text = "no forward on any of the 2 ranks reached BN layer(s) 'aux.1'"
    assert_same_refusal(pair.results("unreached_everywhere"), "ValueError", text)


def test_nan_on_one_rank_fails_everywhere_naming_the_layer(pair):
    results = pair.results("nonfinite_on_one_rank")
    assert_same_refusal(results, "NonFiniteStatisticsError", "BN layer '1'")


def test_a_group_of_one_rank_is_that_rank_alone(pair):
    path = pair.out / "subgroup_of_one.rank0.pt"
    first = torch.load(path, weights_only=False)["result"]
    second = torch.load(path.with_name("subgroup_of_one.rank1.pt"), weights_only=False)["result"]
    expected = single_process(zoo.build("resnet"), sc.rank_batches("resnet", 0))
    assert_bit_identical(first["state"], expected)
    assert second["type"] == "ValueError" and "not a member" in second["message"]
    assert second["unchanged"]


def test_a_ddp_wrapped_model_runs_its_module_and_matches(pair):
    results = pair.results("ddp_wrapped")
    assert all(r["returned_wrapper"] for r in results)
    expected = single_process(zoo.build("resnet"), concatenated("resnet"))
    assert_both_equal_reference(results, expected)
    expected = single_process(zoo.build("resnet"), sc.rank_batches("resnet", 0))
    assert_both_equal_reference([{"state": r["empty_rank1"]} for r in results], expected)


def test_syncbatchnorm_normalizes_each_batch_locally_and_is_put_back(pair):
    results = pair.results("sync_batchnorm")
    assert all(r["sync_layers"] == 6 and r["forward_restored"] and r["modes_kept"] for r in results)
    expected = single_process(zoo.build("resnet"), concatenated("resnet"))  # plain BN
    assert_both_equal_reference(results, expected)


def test_a_syncbatchnorm_subclass_keeps_its_own_forward_under_a_group(pair):
    results = pair.results("sync_batchnorm_act")
    assert_bit_identical(results[0]["state"], results[1]["state"])
    assert all(r["modes_kept"] for r in results)
    torch.manual_seed(0)
    plain = timm.conv_bn_act_net()  # the same layers without SyncBatchNorm, one process
    expected = single_process(plain, sc.act_batches(0) + sc.act_batches(1))
    assert max_relative_difference(results[0]["state"], expected) <= RTOL


@pytest.mark.parametrize("name", ["mixed_tools", "recalibrate_and_sync"])
def test_ranks_making_different_calls_refuse_together(pair, name):
    assert_same_refusal(pair.results(name), "RankError", "did not make the same call as rank 0")


@pytest.mark.parametrize("case", list(sc.MISMATCHES))
def test_options_that_differ_or_are_refused_on_one_rank_fail_every_rank_at_once(pair, case):
    """Every option that changes the result is compared (eval mode's as the user gave them,
    adapt's prior, batch_size and never_updated, tolerance), and a refusal of the options
    reaches every rank: the same RankError everywhere, long before the group's timeout."""
    first, second = (result[case] for result in pair.results("mismatched_calls"))
    refusals = {
        "tolerance_on_both": "ranks 0, 1 of 2 failed, so no rank changed its statistics. "
        "rank 0: ValueError: tolerance cannot be used across torch.distributed ranks",
        "eval_one_shot_iterator_on_one_rank": "rank 0 of 2 failed, so no rank changed its "
        "statistics. rank 0: TypeError: mode='eval' passes over batches several times",
    }
    text = refusals.get(case, "did not make the same call as rank 0")
    assert_same_refusal((first, second), "RankError", text)
    assert first["seconds"] < 10 and second["seconds"] < 10  # the group's timeout is 30 s


def test_an_exception_whose_message_cannot_be_read_still_reaches_every_rank(pair):
    text = "rank 1: _Unprintable (its message could not be read)"
    assert_same_refusal(pair.results("unprintable_error"), "RankError", text)


def test_explicit_group_and_group_false(pair):
    first, second = pair.results("explicit_group")
    expected = single_process(zoo.build("resnet"), concatenated("resnet"))
    assert_bit_identical(first["grouped"], second["grouped"])
    assert max_relative_difference(first["grouped"], expected) <= RTOL
    for rank, result in enumerate((first, second)):  # group=False: each rank's own data
        own = single_process(zoo.build("resnet"), sc.rank_batches("resnet", rank))
        assert_bit_identical(result["alone"], own)


# -- failures -----------------------------------------------------------------------------------


def test_a_failing_rank_makes_every_rank_raise_naming_it(pair):
    first, second = pair.results("failing_rank")
    for result in (first, second):
        assert result["type"] == "RankError"
        assert result["failures"] == {1: "RuntimeError: the loader of rank one broke"}
        assert result["message"].startswith("rank 1 of 2 failed")
        assert result["unchanged"]
    assert first["message"] == second["message"]


def test_ranks_with_different_models_raise_naming_the_rank(pair):
    first, second = pair.results("different_models")
    for result in (first, second):
        assert result["type"] == "RankError" and list(result["failures"]) == [1]
        assert "30 features" in result["message"] and "32 features" in result["message"]
        assert result["unchanged"]


def test_a_stalled_rank_is_caught_by_the_group_timeout(pair):
    waiting, _ = pair.results("stalled_rank")
    assert waiting["type"] == "RankError" and waiting["failures"] == {}
    assert "timeout" in waiting["message"] and waiting["unchanged"]


def test_a_rank_that_dies_ends_the_others_with_an_error(pair):
    assert pair.codes == [0, DEAD_RANK_EXIT_CODE]
    path = pair.out / "dead_rank.rank0.pt"
    assert path.exists(), pair.logs[0].read_text()
    survivor = torch.load(path, weights_only=False)["result"]
    assert survivor["type"] == "RankError" and "a rank died" in survivor["message"]
    assert survivor["unchanged"]


# -- audit and adapt in a group -----------------------------------------------------------------


def test_audit_in_a_group_measures_all_ranks_data(pair):
    first, second = pair.results("audit_in_group")
    assert first["unchanged"] and second["unchanged"]
    assert first["report"] == second["report"]
    expected = bt.audit(zoo.build("resnet"), concatenated("resnet")).to_dict(per_channel=True)
    got = first["report"]
    assert (got["batches"], got["samples"]) == (expected["batches"], expected["samples"])
    for layer, truth in zip(got["layers"], expected["layers"], strict=True):
        assert (
            layer["name"] == truth["name"]
            and layer["values_per_channel"] == truth["values_per_channel"]
        )
        for key in ("population_mean", "population_var", "running_var"):
            np.testing.assert_allclose(layer[key], truth[key], rtol=1e-12)
        assert layer["kl"]["mean"] == pytest.approx(truth["kl"]["mean"], rel=1e-9)


def test_diagnose_in_a_group_is_one_report_over_all_ranks_data(pair):
    first, second = pair.results("diagnose_in_group")
    assert first["unchanged"] and second["unchanged"]
    assert first["report"] == second["report"]
    expected = bt.diagnose(
        zoo.build("resnet").eval(), concatenated("resnet"), progress=False
    ).to_dict()
    got = first["report"]
    assert got["settings"].keys() == expected["settings"].keys()
    for name, truth in expected["settings"].items():
        change = got["settings"][name]["output_change"]
        assert change == pytest.approx(truth["output_change"], rel=1e-6, abs=1e-9), name
    assert [f["kind"] for f in got["findings"]] == [f["kind"] for f in expected["findings"]]


def test_diagnose_with_uneven_test_batches_is_the_report_over_all_ranks_data(pair):
    first, second = pair.results("diagnose_with_uneven_test_batches")
    assert first["report"] == second["report"]
    expected = bt.diagnose(
        zoo.build("resnet").eval(),
        concatenated("resnet"),
        sc.test_batches(0) + sc.test_batches(1),
        progress=False,
    ).to_dict()
    got = first["report"]
    assert got["settings"].keys() == expected["settings"].keys()  # the same adapt priors
    for name, truth in expected["settings"].items():
        change = got["settings"][name]["output_change"]
        assert change == pytest.approx(truth["output_change"], rel=1e-6, abs=1e-9), name


def test_diagnose_with_no_test_batch_on_one_rank_fails_every_rank(pair):
    for result in pair.results("diagnose_with_no_test_batch_on_one_rank"):
        assert result["type"] == "RankError" and result["unchanged"]
        assert result["failures"] == {
            0: "ValueError: test_batches yielded no batch; there is nothing to evaluate"
        }


def test_adapt_in_a_group_mixes_with_the_statistics_of_all_ranks(pair):
    model = zoo.build("resnet")
    batches = [x for r in (0, 1) for x in sc.rank_batches("resnet", r, sc.ADAPT_SIZES[r])]
    bt.adapt(model, batches, prior=16)  # n = 9, the largest batch, held by rank 1
    assert_both_equal_reference(pair.results("adapt_in_group"), ref.snapshot(model))


# -- sync_running_stats -------------------------------------------------------------------------


def _layers(state: dict[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")]


def _by_hand(befores: list[dict], layer: str, weights: list[float]) -> dict[str, np.ndarray]:
    means = [b[f"{layer}.running_mean"].double().numpy() for b in befores]
    variances = [b[f"{layer}.running_var"].double().numpy() for b in befores]
    w = np.array(weights)[:, None]
    mean = (w * means).sum(0) / w.sum()
    within = (w * variances).sum(0) / w.sum()
    between = (w * (np.array(means) - mean) ** 2).sum(0) / w.sum()
    timm = np.mean(variances, axis=0)  # distribute_bn(reduce=True): all-reduce average
    return {"mean": mean, "var": within + between, "between": between, "timm": timm}


def _check_pooled(results, weights_of) -> list[float]:
    befores = [r["before"] for r in results]
    assert_bit_identical(results[0]["after"], results[1]["after"])
    after = results[0]["after"]
    gaps = []
    for layer in _layers(after):
        expected = _by_hand(befores, layer, weights_of(befores, layer))
        got_var = after[f"{layer}.running_var"].double().numpy()
        np.testing.assert_allclose(after[f"{layer}.running_mean"], expected["mean"], rtol=RTOL)
        np.testing.assert_allclose(got_var, expected["var"], rtol=RTOL)
        tracked = max(int(b[f"{layer}.num_batches_tracked"]) for b in befores)
        assert int(after[f"{layer}.num_batches_tracked"]) == tracked
        gaps.append(float(np.max(np.abs(got_var - expected["timm"]) / expected["timm"])))
    return gaps


def test_sync_running_stats_pools_by_num_batches_tracked(pair):
    results = pair.results("sync_stats")
    befores = [r["before"] for r in results]
    assert not torch.equal(befores[0]["1.running_mean"], befores[1]["1.running_mean"])
    gaps = _check_pooled(
        results, lambda bs, layer: [float(b[f"{layer}.num_batches_tracked"]) for b in bs]
    )
    # averaging the variances (timm) drops the spread of the rank means: ranks 3 apart
    first = _by_hand(befores, "1", [3.0, 5.0])
    assert np.max(first["between"] / first["var"]) > 0.5
    assert max(gaps) > 0.5


def test_sync_running_stats_with_explicit_weights(pair):
    _check_pooled(pair.results("sync_stats_weighted"), lambda bs, layer: [100.0, 300.0])


# -- the example --------------------------------------------------------------------------------


def test_the_example_runs_under_torchrun_and_the_ranks_agree(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2"]
    command.append(str(ROOT / "examples" / "distributed_recalibrate.py"))
    log = tmp_path / "example.log"
    assert _run_bounded([command], [log], timeout=120.0) == [0], log.read_text()
    lines = [line for line in log.read_text().splitlines() if line.startswith("rank ")]
    assert len(lines) == 2
    assert len({line.split("here; ")[1] for line in lines}) == 1  # same buffers, same hash
    assert "all 2 ranks bit-identical: True" in log.read_text()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = "backend nccl on cuda" if gpus >= 2 else "backend gloo on cpu"
    assert expected in log.read_text()  # one GPU per rank only when there are enough
    if expected.startswith("backend gloo"):  # what docs/distributed.md shows, line for line
        shown = shown_output("distributed.md", "examples/distributed_recalibrate.py")
        lines = log.read_text().splitlines()
        printed = [line for line in lines if line.startswith(("rank", "all"))]
        assert _without_hash(printed) == _without_hash(
            [line for line in shown if not line.startswith("$ ")]
        )


def _without_hash(lines: list[str]) -> list[str]:
    """The lines with the buffers' sha256 masked: the bytes of float buffers depend on the
    CPU's rounding (its vector instructions), so the value differs between machines; that
    the ranks agree is checked on the run's own lines."""
    return [re.sub(r"sha256 [0-9a-f]{16}", "sha256 <hash>", line) for line in lines]
