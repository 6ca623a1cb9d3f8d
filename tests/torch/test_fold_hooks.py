"""fold and hooks: a hook is never silently dropped. Hooks on the model, a wrapper or a
submodule that tracing goes through are refused (FoldTraceError naming it, the model left as
found); a BN or layer with forward or backward hooks stays unfolded (its hooks keep running
in the folded module); a hooked ``nn.Identity`` stops the fold of a BN beside a layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnstats.torch.fold import FoldTraceError, fold
from tests.torch import fold_models as fm
from tests.torch.models import scramble_batchnorm

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _block() -> nn.Sequential:
    """``conv -> BN -> ReLU`` inside a container, then a 1x1 conv."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    return scramble_batchnorm(nn.Sequential(inner, nn.Conv2d(4, 2, 1))).eval()


def _double_output(module, args, out):
    return out * 2


def _halve_input(module, args):
    return (args[0] * 0.5,)


def _ignore_gradients(module, grad_input, grad_output):
    return None


def _ignore_grad_output(module, grad_output):
    return None


HOOKS = {
    "forward": (lambda m: m.register_forward_hook(_double_output), "forward hooks"),
    "forward-pre": (lambda m: m.register_forward_pre_hook(_halve_input), "forward pre-hooks"),
    "backward": (
        lambda m: m.register_full_backward_hook(_ignore_gradients),
        "backward hooks",
    ),
    "backward-pre": (
        lambda m: m.register_full_backward_pre_hook(_ignore_grad_output),
        "backward pre-hooks",
    ),
}


@pytest.mark.parametrize("hook", list(HOOKS))
def test_hooks_on_the_model_itself_are_refused_and_the_model_left_as_found(hook):
    register, words = HOOKS[hook]
    model = _block()
    register(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FoldTraceError, match=f"Sequential: the model itself has {words}"):
        fold(model, example_inputs=X)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(getattr(model, f"_{hook.replace('-', '_')}_hooks")) == 1


def test_hooks_on_a_wrapper_are_refused():
    model = _block()
    wrapper = nn.DataParallel(model)
    wrapper.register_forward_hook(_double_output)
    with pytest.raises(FoldTraceError, match="its wrapper DataParallel has forward hooks"):
        fold(wrapper, example_inputs=X)


@pytest.mark.parametrize("hook", list(HOOKS))
def test_hooks_on_a_container_that_tracing_goes_through_are_refused(hook):
    """Traced through, a container's hooks would run once on proxies and never again."""
    register, words = HOOKS[hook]
    model = _block()
    register(model[0])
    with pytest.raises(FoldTraceError, match=rf"submodule '0' \(Sequential\) has {words}"):
        fold(model, example_inputs=X)


def test_a_hook_on_a_layer_kept_as_one_call_keeps_running():
    model = _block()
    seen = []
    model[0][2].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    fused = fold(model, example_inputs=X)
    assert fused.fold_report["0.1"].folded_into == "0.0"
    seen.clear()
    with torch.no_grad():
        torch.testing.assert_close(fused(X), model(X))
    assert seen == [(2, 4, 6, 6)] * 2  # once in the folded module, once in the model


def _gradients(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    model(x).square().sum().backward()
    return x.grad


def test_a_bn_with_backward_hooks_stays_and_its_hooks_keep_firing():
    model = _block()
    fired = []
    model[0][1].register_full_backward_hook(lambda m, gi, go: fired.append(go[0].clone()))
    fused = fold(model, example_inputs=X)
    entry = fused.fold_report["0.1"]
    assert entry.code == "bn_unsupported" and "has backward hooks" in entry.reason, entry
    expected = _gradients(model, X)
    got = _gradients(fused, X)
    torch.testing.assert_close(got, expected)
    assert len(fired) == 2
    torch.testing.assert_close(fired[1], fired[0])


@pytest.mark.parametrize("hook", ["backward", "backward-pre"])
def test_a_layer_with_backward_hooks_takes_no_bn_in(hook):
    """Folded, the conv would produce the BN's output: its hook would see another
    grad_output."""
    model = _block()
    seen = []
    if hook == "backward":
        model[0][0].register_full_backward_hook(lambda m, gi, go: seen.append(go[0].clone()))
    else:
        model[0][0].register_full_backward_pre_hook(lambda m, go: seen.append(go[0].clone()))
    fused = fold(model, example_inputs=X)
    entry = fused.fold_report["0.1"]
    assert entry.code == "layer_unsupported", entry
    assert f"which has {HOOKS[hook][1]}" in entry.reason, entry
    _gradients(model, X), _gradients(fused, X)
    torch.testing.assert_close(seen[1], seen[0])


class _IdentityBeside(nn.Module):
    """``identity(conv(x)) + bn(x)``: RepVGG's identity branch with an ``nn.Identity``."""

    def __init__(self, identity: nn.Identity) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.identity = identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.identity(self.conv(x)) + self.bn(x)


def test_a_bn_beside_a_layer_stays_when_an_identity_on_the_way_has_hooks():
    x = torch.randn(2, 4, 6, 6)
    plain = scramble_batchnorm(_IdentityBeside(nn.Identity())).eval()
    assert fold(plain).fold_report["bn"].position == "beside"
    hooked = nn.Identity()
    hooked.register_forward_hook(lambda module, args, out: out * 0.5)
    model = scramble_batchnorm(_IdentityBeside(hooked)).eval()
    fused = fold(model)
    entry = fused.fold_report["bn"]
    assert not entry.folded
    assert "which reaches the sum through identity (Identity), which has forward hooks" in (
        entry.reason
    ), entry
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


def test_hooks_inside_a_folded_chain_module_are_named():
    """fold_models.Chain is traced through too: the refusal names it by its path."""
    model = nn.Sequential(fm.Chain(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model[0].register_forward_pre_hook(_halve_input)
    with pytest.raises(FoldTraceError, match=r"'0' \(Chain\) has forward pre-hooks"):
        fold(model)
