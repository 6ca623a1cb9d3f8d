"""``bnstats audit | recalibrate | fold`` on a user's model, run as a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.cli.user_project import make_project, stale_weights, user_module  # noqa: E402


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path)


def test_audit_prints_a_table_and_json(cli, project):
    stale_weights(project)
    args = ["audit", "--model", "usermodels:make", "--weights", "weights.pt", "--data", "data.npz"]
    result = cli(*args, "--batch-size", "8", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "1" in result.stdout and "4" in result.stdout  # layer names of the Sequential
    result = cli(*args, "--json", cwd=project)
    report = json.loads(result.stdout)
    assert [layer["name"] for layer in report["layers"]] == ["1", "4"]
    assert report["samples"] == 30 or report["batches"] == 1


def test_audit_writes_an_html_page(cli, project):
    result = cli(
        "audit", "--model", "usermodels:make", "--data", "data.npz", "--out", "page", cwd=project
    )
    assert result.returncode == 0, result.stderr
    page = (project / "page" / "audit.html").read_text()
    assert "data:image/png;base64," in page and "never_updated" in page


def test_recalibrate_writes_exact_statistics(cli, project):
    model = stale_weights(project)
    result = cli(
        "recalibrate",
        "--model",
        "usermodels.py:make",
        "--weights",
        "weights.pt",
        "--data",
        "usermodels:batches",
        "--out",
        "new.pt",
        "--json",
        cwd=project,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [row["name"] for row in summary["layers"]] == ["1", "4"]
    state = torch.load(project / "new.pt", weights_only=True)
    # the first BN's input does not depend on how batches are normalized: check it exactly
    inputs = torch.cat([x for x, _ in user_module(project).batches()]).double()
    z = model[0].double()(inputs)
    expected_var = z.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True)
    torch.testing.assert_close(state["1.running_var"].double(), expected_var, rtol=1e-5, atol=1e-7)


def test_fold_writes_a_module_with_the_same_outputs(cli, project):
    model = stale_weights(project)
    result = cli(
        "fold",
        "--model",
        "usermodels:make",
        "--weights",
        "weights.pt",
        "--data",
        "data.npz",
        "--out",
        "folded.pt",
        "--json",
        cwd=project,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["max_relative_difference"] < 1e-5
    folded = torch.load(project / "folded.pt", weights_only=False)
    x = torch.randn(3, 2, 6, 6)
    model.eval()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["audit", "--model", "nomodule:make", "--data", "data.npz"], "cannot import 'nomodule'"),
        (
            ["audit", "--model", "usermodels:nothing", "--data", "data.npz"],
            "has no attribute 'nothing'",
        ),
        (["audit", "--model", "usermodels", "--data", "data.npz"], "must look like"),
        (
            ["audit", "--model", "usermodels:make", "--data", "missing.npz"],
            "no such file missing.npz",
        ),
        (
            ["audit", "--model", "usermodels:make", "--data", "data.npz", "--data-key", "Y"],
            "no array Y",
        ),
        (
            ["audit", "--model", "usermodels:make", "--weights", "data.npz", "--data", "data.npz"],
            "data.npz",
        ),
        (["audit", "--model", "usermodels:broken", "--data", "data.npz"], "audit: RuntimeError"),
        (
            [
                "recalibrate",
                "--model",
                "usermodels:make",
                "--data",
                "data.npz",
                "--out",
                "no/dir/x.pt",
            ],
            "does not exist",
        ),
        (["recalibrate", "--model", "usermodels:make", "--data", "data.npz"], "--out"),
        (["fold", "--model", "usermodels:instance", "--out", "."], "is a directory"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, project, args, message):
    result = cli(*args, cwd=project)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (project / "no").exists()


def test_wrong_weights_file_names_the_file_and_writes_nothing(cli, project):
    torch.save({"0.weight": torch.zeros(1)}, project / "other.pt")
    result = cli(
        "recalibrate",
        "--model",
        "usermodels:make",
        "--weights",
        "other.pt",
        "--data",
        "data.npz",
        "--out",
        "new.pt",
        cwd=project,
    )
    assert result.returncode == 2 and "other.pt does not fit the model" in result.stderr
    assert not (project / "new.pt").exists()


def test_max_samples_counts_samples_of_tuple_batches(cli, project):
    """``usermodels:batches`` gives (x, y) tuples of 5, 9 and 4 samples."""
    args = ["--model", "usermodels:make", "--data", "usermodels:batches", "--max-samples", "7"]
    result = cli("audit", *args, "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 7 and report["batches"] == 2
    assert [layer["values_per_channel"] for layer in report["layers"]] == [7 * 36, 7 * 36]


def test_recalibrate_reports_the_audits_numbers(cli, project):
    """The table of changes is the audit of the model before recalibrating, on the same
    samples: the same mean shift and variance ratio, not a second computation of them."""
    stale_weights(project)
    common = ["--model", "usermodels:make", "--weights", "weights.pt", "--data", "data.npz"]
    audited = cli("audit", *common, "--max-samples", "20", "--json", cwd=project)
    changed = cli(
        "recalibrate", *common, "--max-samples", "20", "--out", "new.pt", "--json", cwd=project
    )
    assert audited.returncode == changed.returncode == 0, audited.stderr + changed.stderr
    expected = [
        {"name": row["name"], "mean_shift": row["mean_shift"], "var_ratio": row["var_ratio"]}
        for row in json.loads(audited.stdout)["layers"]
    ]
    assert json.loads(changed.stdout)["layers"] == expected
    table = cli("recalibrate", *common, "--out", "new.pt", cwd=project)
    assert "worst |old-new| mean / std" in table.stdout and "wrote new.pt" in table.stdout


def test_audit_of_a_built_model_is_in_eval_mode_and_names_its_page(cli, project):
    result = cli(
        "audit", "--model", "usermodels:make", "--data", "data.npz", "--out", "page", cwd=project
    )
    assert result.returncode == 0, result.stderr
    assert "model_in_training_mode" not in result.stdout
    assert result.stdout.rstrip().endswith(
        f"wrote {project / 'page' / 'audit.html'}".replace(str(project) + "/", "")
    )
    result = cli(
        "audit",
        "--model",
        "usermodels:make",
        "--data",
        "data.npz",
        "--out",
        "p2",
        "--json",
        cwd=project,
    )
    assert json.loads(result.stdout)["page"] == "p2/audit.html"


def test_audit_page_with_a_nan_running_var(cli, project):
    model = user_module(project).make()
    model[1].running_var[0] = float("nan")
    torch.save(model.state_dict(), project / "nan.pt")
    args = ["--model", "usermodels:make", "--weights", "nan.pt", "--data", "data.npz"]
    result = cli("audit", *args, "--out", "page", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "variance ratio is not finite" in (project / "page" / "audit.html").read_text()


def _bad_files(project):
    (project / "badsyntax.py").write_text("def make(:\n    pass\n")
    (project / "nameerror.py").write_text("undefined_name\n")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 2, 6, 6))
    np.savez(project / "complex.npz", X=x + 1j)
    np.savez(project / "huge.npz", X=x * 1e300)
    np.savez(project / "wide.npz", X=rng.normal(size=(30, 5, 6, 6)))
    (project / "afile").write_text("x")
    model = user_module(project).make()
    state = model.state_dict()
    state["0.weight"] = torch.zeros(4, 2, 5, 5)
    del state["4.running_var"]
    torch.save(state, project / "mismatch.pt")


MODEL = ["--model", "usermodels:make"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["audit", "--model", "badsyntax:make", "--data", "data.npz"],
            "--model: importing badsyntax failed: SyntaxError",
        ),
        (
            ["audit", "--model", "nameerror:make", "--data", "data.npz"],
            "--model: importing nameerror failed: NameError: name 'undefined_name'",
        ),
        (["audit", *MODEL, "--data", "complex.npz"], "inputs must be real numbers"),
        (["audit", *MODEL, "--data", "huge.npz"], "beyond float32's range"),
        (
            ["audit", *MODEL, "--weights", "mismatch.pt", "--data", "data.npz"],
            "mismatch.pt does not fit the model: 1 keys missing (4.running_var); 1 shapes "
            "differ (0.weight is (4, 2, 5, 5) in the file, (4, 2, 3, 3) in the model)",
        ),
        (
            ["fold", *MODEL, "--data", "wide.npz", "--out", "f.pt"],
            "fold: RuntimeError: Given groups=1, weight of size [4, 2, 3, 3]",
        ),
        (["audit", *MODEL, "--data", "data.npz", "--out", "afile"], "--out afile is a file"),
        (
            ["audit", *MODEL, "--data", "usermodels:failing_batches"],
            "audit: ZeroDivisionError: division by zero",
        ),
        (
            ["audit", "--model", "usermodels:odd", "--data", "data.npz"],
            "audit: AttributeError: 'Tensor' object has no attribute 'no_such_method'",
        ),
        (
            ["audit", *MODEL, "--data", "data.npz", "--max-samples", "0"],
            "argument --max-samples: expected an integer >= 1, got '0'",
        ),
        (
            ["recalibrate", *MODEL, "--data", "data.npz", "--batch-size", "-3", "--out", "r.pt"],
            "argument --batch-size: expected an integer >= 1, got '-3'",
        ),
    ],
)
def test_each_message_is_one_line_and_leaves_nothing(cli, project, args, message):
    _bad_files(project)
    before = sorted(p.name for p in project.iterdir())
    result = cli(*args, cwd=project)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    after = sorted(p.name for p in project.iterdir() if p.name != "__pycache__")
    assert after == [name for name in before if name != "__pycache__"]


def test_json_into_a_closed_pipe_ends_quietly(project):
    """Like ``bnstats audit --json | head -c 0``: the reader is gone before the JSON comes."""
    from tests.cli.conftest import SRC

    process = subprocess.Popen(
        [sys.executable, "-m", "bnstats", "audit", *MODEL, "--data", "data.npz", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and stderr == "", stderr


def test_without_torch_the_install_hint(cli, project, tmp_path, monkeypatch):
    """A ``torch`` that fails to import, first on the path, stands for a missing one."""
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    result = cli("audit", "--model", "usermodels:make", "--data", "data.npz", cwd=project)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert 'pip install ".[torch]"' in result.stderr and "No module named" not in result.stderr


def test_recalibrate_a_model_with_lazy_layers(cli, project):
    np.savez(project / "flat.npz", X=np.random.default_rng(0).normal(size=(20, 3)))
    args = ["--model", "usermodels:lazy", "--data", "flat.npz", "--out", "lazy.pt"]
    result = cli("recalibrate", *args, cwd=project)
    assert result.returncode == 0, result.stderr
    assert "uninitialized lazy layers (1) had no statistics to compare with" in result.stdout
    assert torch.load(project / "lazy.pt", weights_only=True)["1.running_var"].shape == (4,)
