"""The registry of BN kinds: a BN-plus-activation class of a user's own, not a torch
``_BatchNorm``, registered with one call, then recalibrated exactly (against a float64
computation written here), audited, adapted, folded and named by convert; and the look-up
rules for torch's, bnstats' and look-alike classes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnstats
import bnstats.torch as bt
from bnstats.torch import kinds
from tests.torch import reference as ref
from tests.torch import timm_patterns as tp
from tests.torch.models import scramble_batchnorm


class NormAct(nn.Module):
    """``relu(batch_norm(x))`` with torch's BN attributes, written without ``_BatchNorm``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        z = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )
        return self.act(z)


class HookedNormAct(NormAct):
    """The same layer, registered to be measured by the pass's hook."""


bt.register_batchnorm(NormAct, moments="kernel", fold=True, tail=("act",))
bt.register_batchnorm(HookedNormAct, moments="hook", fold=True, tail=("act",))
LAYERS = {"kernel": NormAct, "hook": HookedNormAct}


def _model(layer: type[NormAct], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), layer(4), nn.Conv2d(4, 6, 1), layer(6, momentum=0.3)
    )
    with torch.no_grad():
        for module in model:
            if isinstance(module, NormAct):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(10)
    return model.eval()


def _batches(n: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(6, 3, 5, 5, generator=gen) * 2 + 0.5 for _ in range(n)]


def _float64_population(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple]:
    """Per layer the mean and unbiased variance of every value it receives, the layers
    normalizing with their batches' statistics: a float64 copy, plain forward pre-hooks."""
    twin = copy.deepcopy(model).double().eval()
    seen: dict[str, list[np.ndarray]] = {}
    for name, module in twin.named_modules():
        if isinstance(module, NormAct):
            module.train()
            seen[name] = []
            module.register_forward_pre_hook(
                lambda m, args, name=name: seen[name].append(
                    ref.to_channels_last_2d(args[0].detach().numpy())
                )
            )
    with torch.no_grad():
        for x in batches:
            twin(x.double())
    return {name: ref.population(values) for name, values in seen.items()}


@pytest.mark.parametrize("moments", sorted(LAYERS))
def test_a_registered_layer_is_recalibrated_exactly(moments):
    model, batches = _model(LAYERS[moments]), _batches()
    truth = _float64_population(model, batches)
    assert set(truth) == {"1", "3"}
    bt.recalibrate(model, batches)
    for name, (mean, var) in truth.items():
        layer = model.get_submodule(name)
        np.testing.assert_allclose(layer.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.running_var.double().numpy(), var, rtol=1e-5)
        assert int(layer.num_batches_tracked) == len(batches)  # as update_bn counts
        assert layer.momentum in (0.1, 0.3) and not layer.training


def test_the_kernel_moments_of_a_registered_layer_are_taken_from_its_buffers():
    from bnstats.torch.modules import kernel_writes_moments

    assert kernel_writes_moments(NormAct(3))
    assert not kernel_writes_moments(HookedNormAct(3))
    assert not kernel_writes_moments(NormAct(3).half())


def test_a_registered_layer_is_audited_and_the_model_left_as_found():
    model, batches = _model(NormAct), _batches()
    saved, flags = ref.snapshot(model), ref.modes(model)
    report = bt.audit(model, batches)
    assert ref.same_state(model, saved) and ref.modes(model) == flags
    truth = _float64_population(model, batches)
    assert sorted(layer.name for layer in report.layers) == ["1", "3"]
    for layer in report.layers:
        mean, var = truth[layer.name]
        assert layer.kind == "NormAct"
        np.testing.assert_allclose(layer.population_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.population_var, var, rtol=1e-5)


def test_a_registered_layer_is_adapted():
    model, batches = _model(NormAct), _batches()
    before = {name: model.get_submodule(name).running_mean.clone() for name in ("1", "3")}
    bt.adapt(model, batches, prior=4)
    for name, old in before.items():
        assert not torch.equal(model.get_submodule(name).running_mean, old)


def test_a_registered_layer_folds_and_keeps_its_activation():
    model = _model(NormAct)
    bt.recalibrate(model, _batches())
    x = _batches(1)[0]
    fused = bt.fold(model, example_inputs=x)  # the class takes any rank: fold checks it
    assert not any(isinstance(m, NormAct) for m in fused.modules())
    assert [entry.name for entry in fused.fold_report.folded] == ["1", "3"]
    assert isinstance(fused.get_submodule("1"), nn.Sequential)  # its act, kept in its place
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_convert_names_a_registered_layer_as_left_with_its_reason():
    model = _model(NormAct)
    plan = bt.plan_conversion(model, bnstats.EMA(0.1))
    assert plan.replaced == [] and sorted(plan.left) == ["1", "3"]
    assert "NormAct keeps its own forward" in plan.left["1"]
    with pytest.warns(UserWarning, match="NormAct keeps its own forward"):
        assert bt.convert(model, bnstats.EMA(0.1)) is model


# -- the look-up --------------------------------------------------------------------------


def test_torch_and_bnstats_layers_have_their_kinds():
    assert kinds.kind_of(nn.BatchNorm2d(3)).rank == 4
    assert kinds.kind_of(nn.BatchNorm1d(3)).moments == "kernel"
    assert kinds.kind_of(nn.SyncBatchNorm(3)).synced
    assert kinds.kind_of(bt.BatchNorm3d(3)) == kinds.BatchNormKind("kernel", fold=True, rank=5)
    assert kinds.kind_of(bt.BatchRenorm2d(3)).moments == "hook"
    assert kinds.kind_of(bt.GhostBatchNorm2d(3, ghost_size=2)).rank == 4
    assert kinds.kind_of(nn.Conv2d(3, 3, 1)) is None
    assert not kinds.is_batchnorm(nn.LayerNorm(3))


def test_subclasses_with_a_forward_of_their_own_are_bn_layers_of_unknown_forward():
    class OwnForward(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class OwnTrainForward(bt.BatchNorm2d):
        def _train_forward(self, input):
            return super()._train_forward(input)

    class OwnCheck(nn.BatchNorm2d):
        def _check_input_dim(self, input):
            return None

    assert kinds.kind_of(OwnForward(3)) == kinds.BatchNormKind()  # hook, not folded
    assert kinds.kind_of(OwnTrainForward(3)).moments == "hook"
    assert kinds.kind_of(OwnTrainForward(3)).fold
    assert kinds.input_rank(OwnCheck(3)) is None and kinds.input_rank(nn.BatchNorm2d(3)) == 4


def test_timm_and_torchvision_classes_are_known_by_their_dotted_names():
    kind = kinds.kind_of(tp.BatchNormAct2d(3))  # the copy, under timm's module path
    assert kind == kinds.BatchNormKind(
        "kernel", fold=True, tail=("drop", "act"), rank=4, plain_forward=True
    )
    assert kinds.has_fixed_statistics(tp.FrozenBatchNorm2d(3))
    assert not kinds.is_batchnorm(tp.FrozenBatchNorm2d(3))
    assert kinds.kind_of(tp.FrozenBatchNorm2d(3)).fold
    assert kinds.synchronises(tp.SyncBatchNormAct(3))


class BatchNormAct2d(nn.BatchNorm2d):
    """A project's own class that shares timm's class name and computes something else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(super().forward(x))


class FrozenBatchNorm2d(tp.FrozenBatchNorm2d):
    """A project's own frozen BN sharing torchvision's class name, with its own activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


def test_a_class_that_only_shares_a_known_name_is_not_taken_for_it():
    """The name says nothing of the forward: a BN subclass of unknown forward (measured by
    the hook, not folded), and a frozen one that is reported but not folded."""
    assert kinds.kind_of(BatchNormAct2d(3)) == kinds.BatchNormKind()
    assert kinds.kind_of(FrozenBatchNorm2d(3)) == kinds.BatchNormKind(fixed=True)
    assert kinds.has_fixed_statistics(FrozenBatchNorm2d(3))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for norm in (BatchNormAct2d, FrozenBatchNorm2d):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.Conv2d(4, 2, 1))
        model = tp.scramble_frozen(scramble_batchnorm(model)).eval()
        fused = bt.fold(model, example_inputs=x)
        entry = fused.fold_report["1"]
        assert entry.code == "bn_unsupported", entry
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x))


class LookAlike(tp.BatchNormAct2d):
    """The faithful copy of timm's BatchNormAct2d defined elsewhere: its forward is the same
    but its own, so the registry does not take it for timm's."""

    forward = tp.BatchNormAct2d.forward


def _bn_act_net(layer: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Conv2d(3, 6, 3), layer(6), nn.Conv2d(6, 5, 1), layer(5, act_layer=nn.SiLU)]
    return scramble_batchnorm(nn.Sequential(*blocks))


def test_timms_bn_act_layer_is_measured_by_the_pass_own_forward_as_by_its_forward():
    """Its kind has a plain forward (kernel, then drop and act): a train-mode pass makes that
    call itself, and ends with the buffers that the layer's own forward (the look-alike's,
    measured through the hook) gives, bit for bit, and those of a float64 reference."""
    from bnstats.torch._recorder import takes_own_forward

    named, alike = _bn_act_net(tp.BatchNormAct2d), _bn_act_net(LookAlike)
    assert kinds.kind_of(named[1]).plain_forward and takes_own_forward(named[1])
    assert kinds.kind_of(alike[1]).moments == "hook" and not takes_own_forward(alike[1])
    batches = [torch.randn(4, 3, 7, 7) for _ in range(5)]
    inputs = ref.bn_inputs(alike, batches)
    before = ref.snapshot(named)
    bt.recalibrate(named, batches)
    bt.recalibrate(alike, batches)
    for key, value in named.state_dict().items():
        assert torch.equal(value, alike.state_dict()[key]), key
    for name, per_batch in inputs.items():
        mean, var = ref.population(per_batch)
        layer = named.get_submodule(name)
        np.testing.assert_allclose(layer.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.running_var.double().numpy(), var, rtol=1e-5)
    assert not ref.same_state(named, before)


class FrozenElsewhere(nn.Module):
    """A frozen BN of a library bnstats does not import, known by its dotted name."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(2))
        self.register_buffer("running_var", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test are undone after it."""
    monkeypatch.setattr(kinds, "_BY_NAME", dict(kinds._BY_NAME))
    monkeypatch.setattr(kinds, "_BY_CLASS", dict(kinds._BY_CLASS))
    monkeypatch.setattr(kinds, "_WRAPPER_CLASSES", dict(kinds._WRAPPER_CLASSES))
    monkeypatch.setattr(kinds, "_found", {})


def test_a_dotted_name_registers_a_class_without_importing_it(scratch_registry):
    assert kinds.kind_of(FrozenElsewhere()) is None
    bt.register_batchnorm(f"{__name__}.FrozenElsewhere", fixed=True, fold=True)
    assert kinds.has_fixed_statistics(FrozenElsewhere())


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"moments": "both"}, "moments must be"),
        ({"fold": True, "tail": "act"}, "tail must be"),
        ({"tail": ("act",)}, "give fold=True"),
        ({"fixed": True, "moments": "kernel"}, "never measured"),
        ({"rank": 1}, "rank must be"),
    ],
)
def test_bad_registrations_are_refused(arguments, error, scratch_registry):
    with pytest.raises(ValueError, match=error):
        bt.register_batchnorm(NormAct, **arguments)
    assert kinds.kind_of(NormAct(2)).moments == "kernel"  # nothing changed


def test_a_registered_layer_without_the_attributes_the_tools_read_is_named(scratch_registry):
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(2))

        def forward(self, x):
            return x

    bt.register_batchnorm(Bare)
    with pytest.raises(ValueError, match="'bare'.*Bare.*num_features, eps, running_var"):
        bt.recalibrate(_wrap(Bare()), [])


def _wrap(layer: nn.Module) -> nn.Module:
    model = nn.Module()
    model.bare = layer
    return model


def test_a_registered_wrapper_is_looked_through(scratch_registry):
    class Holder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    bt.register_wrapper(Holder, "inner")
    inner = nn.Sequential(nn.BatchNorm1d(2))
    assert kinds.unwrap(Holder(nn.DataParallel(inner))) is inner


def test_timm_layer_names_appear_in_the_code_of_the_registry_only():
    """Docstrings may name them; code (strings, names, attributes) only in kinds.py."""
    import ast
    from pathlib import Path

    root = Path(kinds.__file__).parent
    timm_names = ("BatchNormAct", "FrozenBatchNorm", "ModelEma", "timm.")

    def code_words(tree: ast.AST) -> set[str]:
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        words = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) not in docstrings:
                    words.add(node.value)
            elif isinstance(node, ast.Name):
                words.add(node.id)
            elif isinstance(node, ast.Attribute):
                words.add(node.attr)
        return words

    holders = {
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if any(
            name in word for word in code_words(ast.parse(path.read_text())) for name in timm_names
        )
    }
    assert holders == {"kinds.py"}


def test_a_plain_forward_is_a_kernel_forward_of_one_process():
    with pytest.raises(ValueError, match="plain_forward"):
        kinds.BatchNormKind(plain_forward=True)
    with pytest.raises(ValueError, match="plain_forward"):
        kinds.BatchNormKind(moments="kernel", plain_forward=True, synced=True)
    assert not kinds.kind_of(nn.SyncBatchNorm(3)).plain_forward
    assert kinds.plain_forward_tail(nn.BatchNorm1d(3)) == ()
    replaced = nn.BatchNorm2d(3)
    replaced.forward = lambda x: x  # a forward of the instance's own: not the plain one
    assert kinds.plain_forward_tail(replaced) is None
