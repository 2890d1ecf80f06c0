"""Auxiliary networks (plugin kind ``auxnets``) against hand computation.

Covers: the combined loss of each net on numbers worked out by hand, the skip connection on the
main loss, effective weights (autograd against finite differences), projection and softplus
monotonicity, a non-monotone net that the monotonicity check catches, shape and parameter errors,
gradients reaching ``phi``, and loading through the registry's type check.
"""

from __future__ import annotations

import ast
from importlib import metadata
from pathlib import Path

import pytest
import torch

from auxframe import auxnets
from auxframe.auxnets import AuxNet, ConvAuxNet, LinearAuxNet, NonlinearAuxNet
from auxframe.errors import ConfigError
from auxframe.registry import Registry

MODES = [None, "projection", "softplus"]


def make(kind: str, num_tasks: int = 3, **kw) -> AuxNet:
    cls = {"linear": LinearAuxNet, "nonlinear": NonlinearAuxNet, "conv": ConvAuxNet}[kind]
    return cls(num_tasks, **kw)


def batch(kind: str, num_tasks: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, num_tasks, 5, 6) if kind == "conv" else (8, num_tasks)
    return torch.rand(shape, generator=g) * 3


@torch.no_grad()
def randomize_(net: AuxNet, seed: int, scale: float = 1.0) -> None:
    """Arbitrary parameters (negative ones included); a projection net is then projected."""
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * scale)
    net.project_()


@torch.no_grad()
def sgd_step_(net: AuxNet, lr: float) -> None:
    """A plain SGD outer step, ``p -= lr * p.grad`` (torch.optim's first step imports dynamo: 2 s)."""
    for p in net.parameters():
        if p.grad is not None:
            p -= lr * p.grad


@torch.no_grad()
def is_non_decreasing(net: AuxNet, losses: torch.Tensor, tol: float = 1e-6) -> bool:
    """Raising any one task's loss (everywhere, or at one sample / pixel) never lowers the output."""
    base = net(losses)
    for t in range(losses.shape[1]):
        for delta in (0.05, 1.0, 10.0):
            everywhere = losses.clone()
            everywhere[:, t] += delta
            one = losses.clone()
            one[(0, t) + (0,) * (losses.dim() - 2)] += delta
            if net(everywhere) < base - tol or net(one) < base - tol:
                return False
    return True


# -- combined loss by hand --------------------------------------------------------------------
def test_linear_combined_loss_is_the_hand_weighted_sum():
    net = LinearAuxNet(3)
    with torch.no_grad():
        net.linear.weight.copy_(torch.tensor([[0.5, 2.0, -1.0]]))
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 1.0]])
    # sample 0: 0.5 + 4 - 3 = 1.5 ; sample 1: 2 + 0 - 1 = 1 ; mean = 1.25
    assert net(losses).item() == pytest.approx(1.25)


def test_linear_starts_at_init_value_in_every_mode():
    for mode in MODES:
        net = LinearAuxNet(4, monotone=mode, init_value=0.7)
        assert torch.allclose(net.weights, torch.full((4,), 0.7)), mode
    # the reference default: every weight 1, i.e. the plain sum of mean losses
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert LinearAuxNet(2)(losses).item() == pytest.approx(5.0)


def test_linear_accepts_dense_losses_as_weighted_sum_of_means():
    net = LinearAuxNet(2)
    with torch.no_grad():
        net.linear.weight.copy_(torch.tensor([[2.0, -0.5]]))
    losses = torch.rand(3, 2, 4, 5)
    expected = 2.0 * losses[:, 0].mean() - 0.5 * losses[:, 1].mean()
    assert torch.allclose(net(losses), expected)


def test_softplus_linear_weights_are_softplus_of_the_raw_parameters():
    net = LinearAuxNet(3, monotone="softplus")
    raw = torch.tensor([[-2.0, 0.0, 3.0]])
    with torch.no_grad():
        net.linear.weight.copy_(raw)
    w = torch.nn.functional.softplus(raw[0])
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 1.0]])
    expected = (losses * w).sum(1).mean()
    assert torch.allclose(net(losses), expected)


def test_nonlinear_combined_loss_by_hand():
    net = NonlinearAuxNet(2, hidden_sizes=(2,), activation="relu", main_index=1)
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        net.layers[0].bias.copy_(torch.tensor([0.0, -1.0]))
        net.layers[1].weight.copy_(torch.tensor([[2.0, -3.0]]))
    assert net.layers[1].bias is None  # last layer bias-free, as in the reference
    losses = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    # sample 0: h = relu([-1, 3.5]) = [0, 3.5] -> -10.5 ; sample 1: h = [2.5, 1.5] -> 0.5
    assert net(losses).item() == pytest.approx(-5.0)
    net.skip_main = True  # + mean of main column 1: (2 + 0.5) / 2
    assert net(losses).item() == pytest.approx(-5.0 + 1.25)


def test_conv_1x1_is_a_per_pixel_weighted_sum():
    net = ConvAuxNet(2, channels=(), kernel_sizes=(1,))
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.tensor([3.0, -1.0]).view(1, 2, 1, 1))
    losses = torch.rand(2, 2, 3, 4)
    assert torch.allclose(net(losses), 3 * losses[:, 0].mean() - losses[:, 1].mean())


def test_conv_3x3_keeps_height_and_width_with_zero_padding():
    net = ConvAuxNet(1, channels=(), kernel_sizes=(3,))
    with torch.no_grad():
        net.layers[0].weight.fill_(1.0)
    losses = torch.ones(1, 1, 2, 2)
    # every pixel of a 2x2 image sees all four pixels through the zero-padded 3x3 kernel
    assert net.unreduced(losses).shape == (1, 1, 2, 2)
    assert net(losses).item() == pytest.approx(4.0)
    default = ConvAuxNet(3)
    assert default.unreduced(torch.rand(2, 3, 5, 7)).shape == (2, 1, 5, 7)


# -- skip_main -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "nonlinear", "conv"])
def test_skip_main_adds_the_unweighted_mean_main_loss(kind):
    torch.manual_seed(0)
    plain = make(kind, main_index=2)
    skip = make(kind, main_index=2, skip_main=True)
    skip.load_state_dict(plain.state_dict())
    losses = batch(kind)
    assert torch.allclose(skip(losses), plain(losses) + losses[:, 2].mean())
    diff = skip.effective_weights(losses) - plain.effective_weights(losses)
    assert torch.allclose(diff, torch.tensor([0.0, 0.0, 1.0]), atol=1e-5)


def test_linear_skip_main_matches_reference_forward():
    # reference: loss = linear(losses).mean(); loss += losses[:, main_task].mean()
    net = LinearAuxNet(3, main_index=1, skip_main=True, init_value=0.5)
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 1.0]])
    # 0.5 * (6 + 5) / 2 + (2 + 0) / 2 = 2.75 + 1
    assert net(losses).item() == pytest.approx(3.75)


# -- effective weights -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_linear_effective_weights_are_its_weights(mode):
    net = LinearAuxNet(3, monotone=mode)
    with torch.no_grad():
        net.linear.weight.copy_(torch.tensor([[0.2, 1.5, 3.0]]))
    w = net.weights.detach()
    assert not torch.allclose(w, torch.ones(3))
    for losses in (torch.rand(5, 3), torch.rand(2, 3, 4, 4)):
        assert torch.allclose(net.effective_weights(losses), w)
    net.skip_main = True
    assert torch.allclose(net.effective_weights(torch.rand(5, 3)), w + torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("kind", ["nonlinear", "conv"])
def test_effective_weights_match_finite_differences_of_the_mean_loss(kind):
    net = make(kind, skip_main=True).double()
    randomize_(net, seed=3)
    losses = batch(kind).double()
    ew = net.effective_weights(losses)
    eps = 1e-6
    for t in range(3):
        up, down = losses.clone(), losses.clone()
        up[:, t] += eps  # moves the mean loss of task t by eps
        down[:, t] -= eps
        fd = (net(up) - net(down)) / (2 * eps)
        assert ew[t].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def test_effective_weights_work_under_no_grad_and_can_keep_the_graph():
    net = LinearAuxNet(3, monotone="softplus")
    losses = torch.rand(4, 3, requires_grad=True)
    with torch.no_grad():
        ew = net.effective_weights(losses)
    assert ew.shape == (3,) and not ew.requires_grad
    ew = net.effective_weights(losses, create_graph=True)
    ew.sum().backward()
    raw = net.linear.weight
    assert torch.allclose(raw.grad, torch.sigmoid(raw.detach()))  # d softplus / d raw
    assert losses.grad is None  # the batch's own graph is not touched


# -- monotone: projection --------------------------------------------------------------------
def test_projection_clamps_weights_pushed_negative_by_an_outer_step():
    net = LinearAuxNet(3, monotone="projection")
    net.linear.weight.grad = torch.tensor([[0.5, 3.0, -1.0]])
    sgd_step_(net, lr=1.0)
    assert torch.allclose(net.weights, torch.tensor([0.5, -2.0, 2.0]))  # the step did go negative
    net.project_()
    assert torch.allclose(net.weights, torch.tensor([0.5, 0.0, 2.0]))


@pytest.mark.parametrize("kind", ["nonlinear", "conv"])
def test_projection_clamps_every_weight_but_not_biases(kind):
    net = make(kind, monotone="projection")
    free = make(kind, monotone=None)
    for n in (net, free):
        with torch.no_grad():
            for p in n.parameters():
                p.copy_(torch.randn(p.shape) - 0.5)
        n.project_()
    assert all((layer.weight >= 0).all() for layer in net.layers)
    assert any((layer.bias < 0).any() for layer in net.layers if layer.bias is not None)
    assert any((layer.weight < 0).any() for layer in free.layers)  # no-op without "projection"


# -- monotone: softplus ----------------------------------------------------------------------
def test_softplus_effective_weights_positive_whatever_the_raw_parameters():
    net = LinearAuxNet(3, monotone="softplus")
    with torch.no_grad():
        net.linear.weight.copy_(torch.tensor([[-15.0, 0.0, 20.0]]))
    assert (net.effective_weights(torch.rand(4, 3)) > 0).all()
    # an outer step that would make plain weights negative leaves softplus weights positive
    net.linear.weight.grad = torch.full((1, 3), 50.0)
    sgd_step_(net, lr=1.0)
    net.project_()  # no-op in softplus mode
    assert (net.linear.weight <= -30).all()
    assert (net.weights > 0).all() and (net.effective_weights(torch.rand(4, 3)) > 0).all()


# -- monotone nets are non-decreasing; the unconstrained one is not ---------------------------
@pytest.mark.parametrize("kind", ["nonlinear", "conv"])
@pytest.mark.parametrize("mode", ["projection", "softplus"])
@pytest.mark.parametrize("activation", ["softplus", "relu"])
def test_monotone_nets_are_non_decreasing_in_every_loss(kind, mode, activation):
    for seed in range(3):
        net = make(kind, monotone=mode, activation=activation)
        randomize_(net, seed=seed, scale=2.0)
        losses = batch(kind, seed=seed)
        assert is_non_decreasing(net, losses)
        assert (net.effective_weights(losses) >= 0).all()


@pytest.mark.parametrize("kind", ["nonlinear", "conv"])
def test_unconstrained_net_can_decrease_so_the_check_can_fail(kind):
    net = make(kind, monotone=None)
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.fill_(0.1)
        net.layers[-1].weight.fill_(-0.1)  # softplus hidden units rise with the losses; output falls
    losses = batch(kind)
    assert not is_non_decreasing(net, losses)
    assert (net.effective_weights(losses) < 0).all()
    # the same parameters, projected, give a monotone net
    mono = make(kind, monotone="projection")
    mono.load_state_dict(net.state_dict())
    mono.project_()
    assert is_non_decreasing(mono, losses)


def test_nets_start_monotone_with_weights_in_the_init_range():
    for mode in MODES:
        net = NonlinearAuxNet(3, monotone=mode, hidden_sizes=(6, 4), init_upper=0.3)
        weights = torch.cat([net._weight(layer).flatten() for layer in net.layers])
        assert weights.min() >= 0 and weights.max() <= 0.3 + 1e-6, mode
        assert all((layer.bias == 0).all() for layer in net.layers[:-1])
        conv = ConvAuxNet(3, monotone=mode)
        weights = torch.cat([conv._weight(layer).flatten() for layer in conv.layers])
        assert weights.min() >= 0 and weights.max() <= 0.1 + 1e-6, mode


# -- trainable phi ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "nonlinear", "conv"])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_every_parameter(kind, mode):
    torch.manual_seed(0)
    net = make(kind, monotone=mode, skip_main=True)
    losses = batch(kind)
    out = net(losses)
    assert out.dim() == 0
    out.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_an_outer_step_changes_the_combined_loss():
    net = NonlinearAuxNet(3, monotone="softplus")
    losses = batch("nonlinear")
    before = net(losses).item()
    net(losses).backward()
    sgd_step_(net, lr=0.1)
    assert net(losses).item() < before  # descending on the combined loss itself lowers it


def test_model_gradient_flows_through_the_auxnet():
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = torch.stack([theta[0] ** 2 * torch.ones(4), theta[1] * torch.ones(4)], dim=1)
    net = LinearAuxNet(2, skip_main=True, init_value=0.5)
    net(losses).backward()
    # (0.5 + 1) * theta0^2 + 0.5 * theta1 -> grads (3 * theta0, 0.5)
    assert torch.allclose(theta.grad, torch.tensor([3.0, 0.5]))


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_wrong_number_of_task_columns(kind):
    net = make(kind, num_tasks=3)
    with pytest.raises(ValueError, match=r"T=3.*\(8, 2\)"):
        net(torch.rand(8, 2))
    with pytest.raises(ValueError, match="T=3"):
        net.effective_weights(torch.rand(8, 4))
    with pytest.raises(ValueError, match=r"\(8,\)"):
        net(torch.rand(8))


def test_conv_rejects_per_sample_losses_and_wrong_channels():
    net = ConvAuxNet(3)
    with pytest.raises(ValueError, match=r"\(8, 3\).*'linear'.*'nonlinear'"):
        net(torch.rand(8, 3))
    with pytest.raises(ValueError, match=r"T=3.*\(2, 2, 4, 4\)"):
        net(torch.rand(2, 2, 4, 4))


def test_nonlinear_rejects_dense_losses_pointing_to_conv():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*ConvAuxNet"):
        NonlinearAuxNet(3)(torch.rand(2, 3, 4, 4))


@pytest.mark.parametrize("kind", ["linear", "nonlinear", "conv"])
def test_invalid_monotone_names_the_options(kind):
    with pytest.raises(ValueError, match=r"None, 'projection' or 'softplus'.*'clamp'") as info:
        make(kind, monotone="clamp")
    assert isinstance(info.value, ConfigError)  # the CLI prints it without a traceback


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LinearAuxNet(3, main_index=3), "main_index"),
        (lambda: LinearAuxNet(0), "num_tasks"),
        (lambda: LinearAuxNet(3, monotone="softplus", init_value=0.0), "init_value"),
        (lambda: LinearAuxNet(3, monotone="projection", init_value=-1.0), "init_value"),
        (lambda: NonlinearAuxNet(3, activation="swish"), "unknown activation 'swish'"),
        (lambda: NonlinearAuxNet(3, monotone="softplus", activation="gelu"), "not non-decreasing"),
        (lambda: NonlinearAuxNet(3, hidden_sizes=(4, 0)), "hidden_sizes"),
        (lambda: NonlinearAuxNet(3, init_upper=0.0), "init_upper"),
        (lambda: ConvAuxNet(3, kernel_sizes=(1, 2, 1)), "odd"),
        (lambda: ConvAuxNet(3, channels=(8,), kernel_sizes=(1, 3, 1)), "len\\(channels\\) \\+ 1 = 2"),
    ],
)
def test_bad_parameters_are_config_errors(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_unconstrained_nets_allow_non_monotone_activation_and_negative_init():
    assert NonlinearAuxNet(3, activation="gelu")(torch.rand(4, 3)).dim() == 0
    assert torch.allclose(LinearAuxNet(2, init_value=-1.0).weights, torch.tensor([-1.0, -1.0]))


# -- plugin contract -------------------------------------------------------------------------
PLUGINS = {"linear": "LinearAuxNet", "nonlinear": "NonlinearAuxNet", "conv": "ConvAuxNet"}


def test_registry_loads_them_as_auxnets():
    eps = [metadata.EntryPoint(n, f"auxframe.auxnets:{c}", "auxframe.auxnets") for n, c in PLUGINS.items()]
    reg = Registry(entry_points=lambda g: eps if g == "auxframe.auxnets" else [], register_in_gin=False)
    for name, cls in PLUGINS.items():
        obj = reg.get("auxnets", name)
        assert obj.__name__ == cls and issubclass(obj, torch.nn.Module)


def test_module_does_not_import_gin():
    tree = ast.parse(Path(auxnets.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" in imported  # the walk does see the imports
    assert not any(m == "gin" or m.startswith("gin.") for m in imported)


@pytest.mark.parametrize("mode", [None, "projection", "softplus"])
def test_set_weights_sets_the_effective_weights(mode):
    net = LinearAuxNet(3, monotone=mode)
    net.set_weights_(torch.tensor([1.0, 0.25, 2.0]))
    assert net.weights.tolist() == pytest.approx([1.0, 0.25, 2.0], rel=1e-5)
    losses = torch.tensor([[2.0, 4.0, 1.0]])  # the combined loss is sum_t w_t L_t with those weights
    assert net(losses).sum().item() == pytest.approx(2.0 + 1.0 + 2.0, rel=1e-5)
