"""Auxiliary networks that combine per-sample task losses into one training loss (plugin kind ``auxnets``).

AuxiLearn (Navon et al., "Auxiliary Learning by Implicit Differentiation", ICLR 2021) trains the
model on ``g_phi(losses)``, a learned combination of the task losses, and trains ``phi`` by implicit
differentiation on a held-out auxiliary set. This module holds the networks ``g_phi``; the outer
(hypergradient) step lives elsewhere. They follow ``auxilearn/hypernet.py`` of the official code.

Contract shared by every network here:

* ``__init__(num_tasks, *, main_index=0, skip_main=False, monotone=None, **arch_params)``.
  ``num_tasks`` counts the main task too; column ``main_index`` of the loss tensor is the main task.
* ``forward(losses) -> scalar``. ``losses`` is ``(B, T)`` per-sample losses (``(B, T, H, W)``
  per-pixel losses for :class:`ConvAuxNet`), e.g. ``TaskLosses.per_sample([main, *aux])``. The
  network maps them to an unreduced loss (:meth:`AuxNet.unreduced`), which is averaged over the batch
  (and pixels). With ``skip_main=True`` the mean main loss is added unweighted outside the network,
  as the reference's skip connection does::

      out = g(losses).mean() + losses[:, main_index].mean()

  ``g`` still sees the main column, so for the linear net the main task's weight is ``1 + w_main``.
  The reference's nonlinear and convolutional nets always add the main loss (there is no switch);
  set ``skip_main=True`` to reproduce them. Without it their small initial weights (below) scale
  the main loss down to a few percent.
* ``monotone``: ``None`` (unconstrained); ``"projection"`` (weights clamped to >= 0 by
  :meth:`AuxNet.project_`, to be called after every outer step, as the reference's ``clamp()``);
  or ``"softplus"`` (the stored parameters are raw values and the effective weights are
  ``softplus(raw) > 0``, so no projection is needed).
  Biases are never constrained: they do not affect monotonicity. With non-negative weights and
  non-decreasing activations the output is non-decreasing in every task's loss.
* :meth:`AuxNet.project_` always exists (a no-op unless ``monotone="projection"``).
* :meth:`AuxNet.effective_weights` gives ``d out / d mean(loss_t)`` at a batch, ``(T,)``, by
  autograd w.r.t. a per-task shift of the input; for the linear net it is its weight vector (plus
  1 at ``main_index`` with ``skip_main``).

Initialisation (as in the reference code): linear weights start at ``init_value=1.0``; the MLP and
conv nets draw weights uniformly from ``[0, init_upper]`` (0.2 for the MLP, the default of the
reference's Oxford-Pet script, which also used hidden sizes ``(10, 10)``; 0.1 for the conv net, the
default of its NYUv2 conv nets), hidden biases 0 and a bias-free last layer. Starting non-negative
means every variant starts monotone. In ``"softplus"`` mode the raw parameters are set so that the
effective weights have that same initial value (at least ``1e-3``, as ``softplus`` never reaches 0).

Not carried over from the reference: weight normalisation (off in its published experiment scripts),
dropout (default 0 there, and it would make :meth:`AuxNet.effective_weights` random), and the
conv net's average pooling (this conv net keeps ``H, W``; the mean over pixels is the same either way).

Example:
    >>> net = LinearAuxNet(3, skip_main=True, monotone="projection")
    >>> total = net(losses.per_sample(["digit", "parity", "rotation"]))   # scalar
    >>> total.backward(); model_optimizer.step()
    >>> ...; outer_optimizer.step(); net.project_()                       # after each outer step
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from auxframe.errors import ConfigError

__all__ = ["AuxNet", "LinearAuxNet", "NonlinearAuxNet", "ConvAuxNet", "AuxNetConfigError", "MONOTONE_OPTIONS"]

#: Accepted values of ``monotone``.
MONOTONE_OPTIONS: tuple[str | None, ...] = (None, "projection", "softplus")

#: Activation name -> (function, whether it is non-decreasing, so allowed in a monotone net).
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "softplus": (F.softplus, True),
    "relu": (F.relu, True),
    "elu": (F.elu, True),
    "tanh": (torch.tanh, True),
    "gelu": (F.gelu, False),
}

#: Smallest initial effective weight in "softplus" mode (softplus(raw) is never 0).
_SOFTPLUS_MIN_INIT = 1e-3


class AuxNetConfigError(ConfigError, ValueError):
    """A bad constructor parameter of an auxiliary network (a ``ConfigError`` and a ``ValueError``)."""


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """``x`` with ``softplus(x) == y`` for ``y > 0``."""
    return y + torch.log(-torch.expm1(-y))


class AuxNet(nn.Module):
    """Base class: input checks, the skip connection, projection and effective weights.

    Subclasses build their layers, list the ones whose ``weight`` is constrained in
    :meth:`_weight_layers` (default: ``self.layers``), set :attr:`input_dim`, and implement
    :meth:`unreduced`.

    Args:
        num_tasks: number of tasks, main task included (the size of the loss tensor's dim 1).
        main_index: column of the main task's loss.
        skip_main: add the mean main loss, unweighted, to the network's output.
        monotone: ``None``, ``"projection"`` or ``"softplus"`` (see the module docstring).

    Raises:
        AuxNetConfigError: (a ``ValueError``) for a bad ``num_tasks``, ``main_index`` or ``monotone``.

    Attributes:
        dense_input: True for networks over per-pixel loss maps ``(B, T, H, W)``; False for
            per-sample loss vectors ``(B, T)``.
    """

    dense_input = False

    def __init__(
        self, num_tasks: int, *, main_index: int = 0, skip_main: bool = False, monotone: str | None = None
    ):
        super().__init__()
        name = type(self).__name__
        if not _is_int(num_tasks) or num_tasks < 1:
            raise AuxNetConfigError(
                f"{name}: num_tasks must be a positive int (main task included), got {num_tasks!r}"
            )
        if not _is_int(main_index) or not 0 <= main_index < num_tasks:
            raise AuxNetConfigError(
                f"{name}: main_index must be a column of the losses, 0 <= main_index < "
                f"num_tasks={num_tasks}; got {main_index!r}"
            )
        if monotone not in MONOTONE_OPTIONS:
            raise AuxNetConfigError(
                f"{name}: monotone must be one of None, 'projection' or 'softplus'; got {monotone!r}"
            )
        self.num_tasks = int(num_tasks)
        self.main_index = int(main_index)
        self.skip_main = bool(skip_main)
        self.monotone = monotone

    # -- provided by subclasses ---------------------------------------------------------------
    #: ``losses.dim()`` the network takes (2 per sample, 4 per pixel), and where to go otherwise.
    input_dim: int | None = None
    input_hint: str = ""

    def _weight_layers(self) -> list[nn.Module]:
        """Layers whose ``weight`` must be non-negative in a monotone net (default: ``self.layers``)."""
        return list(self.layers)

    def unreduced(self, losses: torch.Tensor) -> torch.Tensor:
        """``g(losses)`` before the mean and without the skip connection (each subclass defines it)."""
        raise NotImplementedError(f"{type(self).__name__} must define unreduced(losses), the per-sample loss map")

    def _check_input(self, losses: torch.Tensor) -> None:
        if self.input_dim is not None and isinstance(losses, torch.Tensor) and losses.dim() != self.input_dim:
            raise ValueError(
                f"{type(self).__name__} got losses of shape {tuple(losses.shape)}; it takes {self.input_hint} "
                f"(T={self.num_tasks})."
            )
        self._check_tasks(losses)

    # -- shared ------------------------------------------------------------------------------
    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """The combined training loss, a scalar.

        Args:
            losses: ``(B, T)`` per-sample losses (``(B, T, H, W)`` per pixel for the conv net).

        Raises:
            ValueError: if the shape does not fit the network.
        """
        self._check_input(losses)
        out = self.unreduced(losses).mean()
        if self.skip_main:
            out = out + losses[:, self.main_index].mean()
        return out

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the constrained weights to >= 0 in place (``monotone="projection"``); else a no-op."""
        if self.monotone == "projection":
            for layer in self._weight_layers():
                layer.weight.clamp_(min=0.0)

    def effective_weights(self, losses: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        """``d forward(losses) / d mean(losses[:, t])`` for every task ``t``, shape ``(T,)``.

        Computed by autograd w.r.t. a shift ``s_t`` added to every sample (and pixel) of task ``t``,
        which moves that task's mean loss by ``s_t``. Gradients do not reach ``losses``.

        Args:
            losses: a batch, as for :meth:`forward`.
            create_graph: keep the graph, so the result can be differentiated w.r.t. ``phi``.
        """
        self._check_input(losses)
        shape = (1, self.num_tasks) + (1,) * (losses.dim() - 2)
        with torch.enable_grad():
            shift = torch.zeros(self.num_tasks, dtype=losses.dtype, device=losses.device, requires_grad=True)
            out = self(losses.detach() + shift.view(shape))
            (grad,) = torch.autograd.grad(out, shift, create_graph=create_graph)
        return grad

    def _weight(self, layer: nn.Module) -> torch.Tensor:
        """The effective weight of ``layer``: ``softplus(raw)`` in softplus mode, else the parameter."""
        return F.softplus(layer.weight) if self.monotone == "softplus" else layer.weight

    @torch.no_grad()
    def _init_weight_(self, layer: nn.Module, value: torch.Tensor) -> None:
        """Set ``layer``'s parameter so that its effective weight is ``value``."""
        if self.monotone == "softplus":
            value = _inverse_softplus(value.clamp(min=_SOFTPLUS_MIN_INIT))
        layer.weight.copy_(value)

    def _init_layers_uniform_(self, init_upper: float) -> None:
        """Weights of ``self.layers`` uniform in ``[0, init_upper]`` (reference init), biases 0."""
        for layer in self.layers:
            self._init_weight_(layer, torch.empty_like(layer.weight).uniform_(0.0, float(init_upper)))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def _run_layers(self, x: torch.Tensor, apply: Callable[..., torch.Tensor]) -> torch.Tensor:
        """``self.layers`` with the activation between them; ``apply(x, weight, layer)`` runs one."""
        act = ACTIVATIONS[self.activation][0]
        for i, layer in enumerate(self.layers):
            x = apply(x, self._weight(layer), layer)
            if i < len(self.layers) - 1:
                x = act(x)
        return x

    def _check_tasks(self, losses: torch.Tensor) -> None:
        if not isinstance(losses, torch.Tensor) or losses.dim() < 2 or losses.shape[1] != self.num_tasks:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"{type(self).__name__} expected losses with T={self.num_tasks} task columns in dim 1 "
                f"(main task at column {self.main_index}), e.g. (B, {self.num_tasks}); got shape {shape}"
            )

    def _check_activation(self, activation: str) -> None:
        if activation not in ACTIVATIONS:
            raise AuxNetConfigError(
                f"{type(self).__name__}: unknown activation {activation!r}; "
                f"choose one of {sorted(ACTIVATIONS)}"
            )
        if self.monotone is not None and not ACTIVATIONS[activation][1]:
            allowed = sorted(k for k, (_, mono) in ACTIVATIONS.items() if mono)
            raise AuxNetConfigError(
                f"{type(self).__name__}: activation {activation!r} is not non-decreasing, so the net would "
                f"not be monotone; with monotone={self.monotone!r} use one of {allowed}"
            )

    def _check_init_upper(self, init_upper: float) -> None:
        if not (isinstance(init_upper, (int, float)) and math.isfinite(init_upper) and init_upper > 0):
            raise AuxNetConfigError(
                f"{type(self).__name__}: init_upper must be a positive number, got {init_upper!r}"
            )

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, main_index={self.main_index}, skip_main={self.skip_main}, "
            f"monotone={self.monotone!r}"
        )


class LinearAuxNet(AuxNet):
    """Linear combination ``mean_b sum_t w_t * losses[b, t]`` (bias-free); reference ``LinearHyperNet``.

    Also accepts dense ``(B, T, ...)`` losses (then the mean runs over pixels as well); since the net
    is linear, that equals ``sum_t w_t * mean(losses[:, t])``.

    Args:
        num_tasks: number of tasks, main task included.
        main_index: column of the main task's loss.
        skip_main: add the mean main loss unweighted (the main task's weight becomes ``1 + w_main``).
        monotone: ``None``, ``"projection"`` or ``"softplus"``.
        init_value: initial weight of every task (> 0 with ``"softplus"``, >= 0 with ``"projection"``).

    Example:
        >>> net = LinearAuxNet(2, init_value=1.0)
        >>> net(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))       # (1 + 2 + 3 + 4) / 2
        tensor(5., grad_fn=...)
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        main_index: int = 0,
        skip_main: bool = False,
        monotone: str | None = None,
        init_value: float = 1.0,
    ):
        super().__init__(num_tasks, main_index=main_index, skip_main=skip_main, monotone=monotone)
        if monotone == "softplus" and not init_value > 0:
            raise AuxNetConfigError(
                f"LinearAuxNet: init_value must be > 0 with monotone='softplus', got {init_value}"
            )
        if monotone == "projection" and not init_value >= 0:
            raise AuxNetConfigError(
                f"LinearAuxNet: init_value must be >= 0 with monotone='projection', got {init_value}"
            )
        self.linear = nn.Linear(num_tasks, 1, bias=False)
        self._init_weight_(self.linear, torch.full((1, num_tasks), float(init_value)))

    @property
    def weights(self) -> torch.Tensor:
        """The effective task weights ``w``, shape ``(T,)`` (without the skip connection's 1)."""
        return self._weight(self.linear)[0]

    @torch.no_grad()
    def set_weights_(self, weights: torch.Tensor) -> None:
        """Set the effective task weights ``w`` (``(T,)``) in place, e.g. to rescale them."""
        self._init_weight_(self.linear, weights.detach().reshape(1, -1).to(self.linear.weight))

    def _weight_layers(self) -> list[nn.Module]:
        return [self.linear]

    def unreduced(self, losses: torch.Tensor) -> torch.Tensor:
        """``sum_t w_t * losses[:, t]``, shape ``(B, ...)``."""
        return torch.tensordot(losses, self.weights, dims=([1], [0]))


class NonlinearAuxNet(AuxNet):
    """An MLP over each sample's loss vector, averaged over the batch; reference ``NonlinearHyperNet``.

    ``g(l) = W_K act(... act(W_1 l + b_1) ...)``: hidden layers with biases, a bias-free last layer
    to one output. Monotone variants constrain every ``W_k`` to be non-negative and need a
    non-decreasing activation. For per-pixel losses use :class:`ConvAuxNet` (1x1 kernels give a
    per-pixel MLP).

    Args:
        num_tasks: number of tasks, main task included.
        main_index: column of the main task's loss.
        skip_main: add the mean main loss unweighted (the reference always does).
        monotone: ``None``, ``"projection"`` or ``"softplus"``.
        hidden_sizes: widths of the hidden layers (an int for one layer); ``()`` for a linear map.
        activation: one of ``softplus`` (reference default), ``relu``, ``elu``, ``tanh``, ``gelu``
            (``gelu`` only without ``monotone``).
        init_upper: weights start uniform in ``[0, init_upper]``, biases at 0.
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        main_index: int = 0,
        skip_main: bool = False,
        monotone: str | None = None,
        hidden_sizes: int | Sequence[int] = (10, 10),
        activation: str = "softplus",
        init_upper: float = 0.2,
    ):
        super().__init__(num_tasks, main_index=main_index, skip_main=skip_main, monotone=monotone)
        sizes = [hidden_sizes] if isinstance(hidden_sizes, int) else list(hidden_sizes)
        if not all(_is_int(h) and h > 0 for h in sizes):
            raise AuxNetConfigError(
                f"NonlinearAuxNet: hidden_sizes must be positive ints, got {hidden_sizes!r}"
            )
        self._check_activation(activation)
        self._check_init_upper(init_upper)
        self.hidden_sizes = tuple(sizes)
        self.activation = activation
        dims = [num_tasks, *sizes, 1]
        last = len(dims) - 2
        self.layers = nn.ModuleList(
            nn.Linear(d_in, d_out, bias=i < last) for i, (d_in, d_out) in enumerate(zip(dims, dims[1:]))
        )
        self._init_layers_uniform_(init_upper)

    input_dim = 2
    input_hint = "per-sample losses (B, T); for per-pixel losses (B, T, H, W) use ConvAuxNet (plugin 'conv')"

    def unreduced(self, losses: torch.Tensor) -> torch.Tensor:
        """``g(losses[b])`` for every sample, shape ``(B,)``."""
        x = self._run_layers(losses, lambda x, w, layer: F.linear(x, w, layer.bias))
        return x.squeeze(-1)


class ConvAuxNet(AuxNet):
    """A convolutional net over per-pixel losses ``(B, T, H, W)``; reference ``NoFCCNNHyperNet``.

    Layers ``conv(k_1) -> act -> ... -> conv(k_K)`` to one channel, each with padding ``k // 2`` so
    the output map is ``(B, 1, H, W)``; the combined loss is its mean. Hidden convs have biases, the
    last is bias-free. The default ``1x1 -> 3x3 -> 1x1`` mixes the tasks' losses at each pixel, then
    looks at the 3x3 neighbourhood, then reduces to one map. Per-sample ``(B, T)`` losses are refused:
    as 1x1 images only the kernels' centre taps would act, i.e. an MLP; use ``nonlinear`` for them.

    Args:
        num_tasks: number of tasks (input channels), main task included.
        main_index: channel of the main task's loss.
        skip_main: add the mean main loss unweighted (the reference always does).
        monotone: ``None``, ``"projection"`` or ``"softplus"``.
        channels: widths of the hidden conv layers.
        kernel_sizes: odd kernel size of each conv, one more than ``channels`` (the last conv maps
            to one channel).
        activation: as for :class:`NonlinearAuxNet`.
        init_upper: weights start uniform in ``[0, init_upper]`` (reference: 0.1), biases at 0.
    """

    #: Takes per-pixel loss maps ``(B, T, H, W)`` rather than per-sample vectors.
    dense_input = True

    def __init__(
        self,
        num_tasks: int,
        *,
        main_index: int = 0,
        skip_main: bool = False,
        monotone: str | None = None,
        channels: Sequence[int] = (8, 16),
        kernel_sizes: Sequence[int] = (1, 3, 1),
        activation: str = "softplus",
        init_upper: float = 0.1,
    ):
        super().__init__(num_tasks, main_index=main_index, skip_main=skip_main, monotone=monotone)
        channels, kernel_sizes = list(channels), list(kernel_sizes)
        if not all(_is_int(c) and c > 0 for c in channels):
            raise AuxNetConfigError(f"ConvAuxNet: channels must be positive ints, got {channels!r}")
        if len(kernel_sizes) != len(channels) + 1:
            raise AuxNetConfigError(
                f"ConvAuxNet: kernel_sizes needs one size per conv, len(channels) + 1 = {len(channels) + 1} "
                f"(the last conv maps to one channel); got {kernel_sizes!r} for channels {channels!r}"
            )
        if not all(_is_int(k) and k > 0 and k % 2 == 1 for k in kernel_sizes):
            raise AuxNetConfigError(
                f"ConvAuxNet: kernel_sizes must be odd positive ints (padding k // 2 keeps H, W); "
                f"got {kernel_sizes!r}"
            )
        self._check_activation(activation)
        self._check_init_upper(init_upper)
        self.channels, self.kernel_sizes, self.activation = tuple(channels), tuple(kernel_sizes), activation
        dims = [num_tasks, *channels, 1]
        self.layers = nn.ModuleList(
            nn.Conv2d(d_in, d_out, kernel_size=k, padding=k // 2, bias=i < len(kernel_sizes) - 1)
            for i, (d_in, d_out, k) in enumerate(zip(dims, dims[1:], kernel_sizes))
        )
        self._init_layers_uniform_(init_upper)

    input_dim = 4
    input_hint = ("per-pixel losses (B, T, H, W); for per-sample losses (B, T) use LinearAuxNet ('linear') "
                  "or NonlinearAuxNet ('nonlinear')")

    def unreduced(self, losses: torch.Tensor) -> torch.Tensor:
        """The per-pixel combined loss map, shape ``(B, 1, H, W)``."""
        return self._run_layers(losses, lambda x, w, layer: F.conv2d(x, w, layer.bias, padding=layer.padding))
