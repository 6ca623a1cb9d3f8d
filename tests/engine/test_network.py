"""The engine against PyTorch in float64, step by step, and its test-time behaviour."""

from __future__ import annotations

import numpy as np
import pytest

import bnstats
from bnstats.engine import (
    SGD,
    Adam,
    BatchNorm,
    Momentum,
    Network,
    ReLU,
    softmax_cross_entropy,
)
from tests.gradcheck import numeric_gradient

torch = pytest.importorskip("torch")

SIZES = [12, 16, 8, 4]


def _torch_twin(net: Network) -> torch.nn.Sequential:
    """torch.nn layers with the engine's weights, in float64."""
    modules = []
    for layer in net.layers:
        if layer.kind == "Linear":
            lin = torch.nn.Linear(
                layer.in_features, layer.out_features, bias="bias" in layer.params
            ).double()
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(layer.params["weight"]))
                if lin.bias is not None:
                    lin.bias.copy_(torch.from_numpy(layer.params["bias"]))
            modules.append(lin)
        elif layer.kind == "BatchNorm":
            modules.append(torch.nn.BatchNorm1d(layer.num_features, momentum=0.1).double())
        else:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


def _torch_optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05)
    if name == "momentum":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01)


ENGINE_OPTIMIZERS = {
    "sgd": lambda: SGD(0.05),
    "momentum": lambda: Momentum(0.05, beta=0.9),
    "adam": lambda: Adam(0.01),
}


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_five_steps_equal_torch_in_float64(rng, optimizer):
    net = Network.mlp(SIZES, seed=3)
    twin = _torch_twin(net)
    twin.train()
    engine_opt, torch_opt = (
        ENGINE_OPTIMIZERS[optimizer](),
        _torch_optimizer(optimizer, twin.parameters()),
    )
    names = [name for name, _, _ in net.parameters()]
    torch_params = dict(zip(names, twin.parameters(), strict=True))
    for step in range(5):
        x = rng.normal(0.5, 2.0, size=(10 + step, SIZES[0]))
        upstream = rng.normal(size=(len(x), SIZES[-1]))  # random: sum() has zero grad thru BN
        out = net.forward(x, training=True)
        net.backward(upstream)
        torch_opt.zero_grad()
        tout = twin(torch.from_numpy(x))
        tout.backward(torch.from_numpy(upstream))
        np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-10, atol=1e-12)
        for name, _, grad in net.parameters():
            np.testing.assert_allclose(
                grad, torch_params[name].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name
            )
        engine_opt.step(net.parameters())
        torch_opt.step()
    for name, param, _ in net.parameters():
        np.testing.assert_allclose(
            param, torch_params[name].detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=name
        )
    torch_bns = [m for m in twin if isinstance(m, torch.nn.BatchNorm1d)]
    for layer, bn in zip(net.batchnorm_layers, torch_bns, strict=True):
        ema = layer.estimators["ema"]
        np.testing.assert_allclose(ema.mean, bn.running_mean.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ema.var, bn.running_var.numpy(), rtol=1e-10)
        assert ema.num_batches_tracked == int(bn.num_batches_tracked) == 5
    twin.eval()
    x = rng.normal(size=(7, SIZES[0]))
    np.testing.assert_allclose(
        net.logits(x), twin(torch.from_numpy(x)).detach().numpy(), rtol=1e-10, atol=1e-12
    )


def test_softmax_cross_entropy_equals_torch(rng):
    logits = rng.normal(size=(9, 5)) * 4
    y = rng.integers(0, 5, size=9)
    loss, dlogits = softmax_cross_entropy(logits, y)
    t = torch.tensor(logits, requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(t, torch.from_numpy(y))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    np.testing.assert_allclose(dlogits, t.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_network_gradient_matches_finite_differences(rng):
    net = Network.mlp([5, 6, 4, 3], seed=1)
    x = rng.normal(size=(8, 5))
    upstream = rng.normal(size=(8, 3))

    def objective() -> float:
        return float((net.forward(x, training=True) * upstream).sum())

    net.forward(x, training=True)
    net.backward(upstream)
    for name, param, grad in net.parameters():
        numeric = numeric_gradient(objective, param)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def _trained(rng, estimators=None):
    net = Network.mlp(SIZES, seed=0, estimators=estimators)
    X = rng.normal(size=(120, SIZES[0]))
    y = rng.integers(0, SIZES[-1], size=120)
    net.fit(X, y, epochs=2, batch_size=16, optimizer=Adam(1e-2))
    return net, X, y


@pytest.mark.parametrize("stats", ["ema", "population"])
def test_a_row_alone_equals_the_row_in_any_batch(rng, stats):
    net, X, _ = _trained(rng, {"ema": bnstats.EMA(0.1), "population": bnstats.Population()})
    whole = net.logits(X, stats=stats)
    for batch_size in (1, 3, 50):
        np.testing.assert_allclose(
            net.logits(X, stats=stats, batch_size=batch_size), whole, rtol=1e-12
        )
    np.testing.assert_allclose(net.logits(X[5:6], stats=stats), whole[5:6], rtol=1e-12)


def test_batch_statistics_depend_on_the_batch(rng):
    net, X, _ = _trained(rng)
    alone = net.logits(X[:1], stats="batch")
    assert np.allclose(alone, net.logits(X[1:2], stats="batch")), "one row normalizes to beta"
    assert not np.allclose(net.logits(X[:8], stats="batch")[0], alone[0])


def test_predict_and_evaluate_change_no_statistic(rng):
    net, X, y = _trained(rng)
    before = [
        {k: e.state_dict() for k, e in layer.estimators.items()} for layer in net.batchnorm_layers
    ]
    net.predict(X)
    net.evaluate(X, y, stats="batch", batch_size=4)
    net.logits(X, stats="ema")
    after = [
        {k: e.state_dict() for k, e in layer.estimators.items()} for layer in net.batchnorm_layers
    ]
    for old, new in zip(before, after, strict=True):
        for key in old:
            np.testing.assert_array_equal(old[key]["running_mean"], new[key]["running_mean"])
            np.testing.assert_array_equal(old[key]["running_var"], new[key]["running_var"])
            assert old[key]["num_batches_tracked"] == new[key]["num_batches_tracked"]


def test_training_batch_of_one_row_names_the_layer(rng):
    net = Network.mlp(SIZES, seed=0)
    with pytest.raises(ValueError, match=r"BatchNorm 'bn1'.*\(1, 16\)"):
        net.forward(rng.normal(size=(1, SIZES[0])), training=True)
    assert net.batchnorm_layers[0].estimators["ema"].count == 0


def test_wrong_width_names_the_expected_shape(rng):
    net = Network.mlp(SIZES, seed=0)
    with pytest.raises(ValueError, match=r"\(N, 12\).*\(5, 11\)"):
        net.forward(rng.normal(size=(5, 11)), training=True)
    bn = BatchNorm(4, name="bn9")
    with pytest.raises(ValueError, match=r"'bn9'.*\(N, 4\)"):
        bn.forward(np.zeros((3, 5)), training=True)


def test_untrained_estimate_and_unknown_name_are_clear(rng):
    net = Network.mlp(SIZES, seed=0)
    with pytest.raises(ValueError, match="seen no batch"):
        net.logits(rng.normal(size=(2, SIZES[0])))
    net, X, _ = _trained(rng)
    with pytest.raises(ValueError, match="no estimator 'nope'"):
        net.logits(X, stats="nope")


def test_recalibrate_gives_exact_population_statistics(rng):
    net, X, _ = _trained(rng)
    ema_before = net.batchnorm_layers[0].estimators["ema"].state_dict()
    weights_before = [p.copy() for _, p, _ in net.parameters()]
    net.recalibrate(X, batch_size=32)
    first, second = net.batchnorm_layers
    z1 = X @ net.layers[0].params["weight"].T  # the first BN's input does not depend on splits
    np.testing.assert_allclose(first.estimators["population"].mean, z1.mean(0), rtol=1e-12)
    np.testing.assert_allclose(first.estimators["population"].var, z1.var(0, ddof=1), rtol=1e-12)
    # the second BN's input: each chunk passed through the first BN with its own statistics
    inputs = []
    for chunk in np.array_split(X, 4):
        a = np.maximum(first.forward(chunk @ net.layers[0].params["weight"].T, stats="batch"), 0)
        inputs.append(a @ net.layers[3].params["weight"].T)
    z2 = np.concatenate(inputs)
    np.testing.assert_allclose(second.estimators["population"].mean, z2.mean(0), rtol=1e-10)
    np.testing.assert_allclose(second.estimators["population"].var, z2.var(0, ddof=1), rtol=1e-10)
    assert first.estimators["population"].count == len(X)
    np.testing.assert_array_equal(
        first.estimators["ema"].state_dict()["running_mean"], ema_before["running_mean"]
    )
    for before, (_, after, _) in zip(weights_before, net.parameters(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_recalibrate_eval_mode_is_the_fixed_point_of_eval_inference(rng):
    net, X, _ = _trained(rng)
    net.recalibrate(X, batch_size=1, name="eval", mode="eval")
    first, second = net.batchnorm_layers
    w1, w2 = net.layers[0].params["weight"], net.layers[3].params["weight"]
    z1 = X @ w1.T
    mu1, var1 = z1.mean(0), z1.var(0, ddof=1)
    np.testing.assert_allclose(first.estimators["eval"].var, var1, rtol=1e-12)
    # the second BN's input: the first normalizes with its own population statistics
    gamma, beta = first.params["weight"], first.params["bias"]
    a = np.maximum(gamma * (z1 - mu1) / np.sqrt(var1 + first.eps) + beta, 0)
    z2 = a @ w2.T
    np.testing.assert_allclose(second.estimators["eval"].mean, z2.mean(0), rtol=1e-10)
    np.testing.assert_allclose(second.estimators["eval"].var, z2.var(0, ddof=1), rtol=1e-10)
    assert "__eval_mode_recalibration__" not in second.estimators
    net.recalibrate(X, batch_size=32, name="train")
    assert not np.allclose(second.estimators["train"].var, z2.var(0, ddof=1), rtol=1e-3)


def test_recalibrate_with_batches_of_two_on_an_odd_count_leaves_no_row_alone(rng):
    net, X, _ = _trained(rng)
    net.recalibrate(X[:7], batch_size=2)
    z1 = X[:7] @ net.layers[0].params["weight"].T
    population = net.batchnorm_layers[0].estimators["population"]
    np.testing.assert_allclose(population.var, z1.var(0, ddof=1), rtol=1e-12)


def test_recalibrate_eval_mode_agrees_with_the_torch_tool(rng):
    import bnstats.torch as bt

    net, X, _ = _trained(rng)
    net.recalibrate(X, batch_size=16, mode="eval")
    twin = _torch_twin(net)
    for layer, module in zip(net.layers, twin, strict=True):
        if layer.kind == "BatchNorm":  # the twin's BN starts at gamma = 1, beta = 0
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(layer.params["weight"]))
                module.bias.copy_(torch.from_numpy(layer.params["bias"]))
    bt.recalibrate(twin, list(torch.from_numpy(X).split(7)), mode="eval")
    torch_layers = [m for m in twin if isinstance(m, torch.nn.BatchNorm1d)]
    for layer, twin_layer in zip(net.batchnorm_layers, torch_layers, strict=True):
        population = layer.estimators["population"]
        np.testing.assert_allclose(twin_layer.running_mean.numpy(), population.mean, atol=1e-10)
        np.testing.assert_allclose(twin_layer.running_var.numpy(), population.var, rtol=1e-10)
    with pytest.raises(ValueError, match="mode must be"):
        net.recalibrate(X, mode="test")


def test_mlp_without_batchnorm(rng):
    net = Network.mlp([4, 5, 2], batchnorm=False, seed=0)
    assert not net.batchnorm_layers and net.stats_names == ["batch"]
    X, y = rng.normal(size=(20, 4)), rng.integers(0, 2, 20)
    net.fit(X, y, epochs=1, batch_size=5)
    assert net.predict(X).shape == (20,)


def test_norm_is_a_layer_factory(rng):
    """``norm`` builds each normalization layer; ``norm=None`` is ``batchnorm=False``."""
    plain = Network.mlp([4, 5, 2], norm=None, seed=0)
    shorthand = Network.mlp([4, 5, 2], batchnorm=False, seed=0)
    assert [ly.kind for ly in plain.layers] == [ly.kind for ly in shorthand.layers]
    assert "bias" in plain.layers[0].params
    calls = []

    def factory(width, **options):
        calls.append((width, sorted(options)))
        return BatchNorm(width, **options)

    net = Network.mlp([4, 6, 5, 2], norm=factory, eps=1e-3, seed=0)
    assert calls == [(6, ["eps", "estimators"]), (5, ["eps", "estimators"])]
    assert [b.eps for b in net.batchnorm_layers] == [1e-3, 1e-3]
    with pytest.raises(TypeError, match="norm must build a BatchNorm layer, got ReLU"):
        Network.mlp([4, 5, 2], norm=lambda width, **_: ReLU())


def test_batchnorm_layer_by_name(rng):
    net = Network.mlp(SIZES, seed=0)
    assert net.batchnorm_layer() is net.batchnorm_layers[0]
    assert net.batchnorm_layer("bn2") is net.batchnorm_layers[1]
    with pytest.raises(ValueError, match="no BatchNorm layer named 'bn3'; .* are bn1, bn2"):
        net.batchnorm_layer("bn3")
    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        Network.mlp(SIZES, norm=None).batchnorm_layer()
