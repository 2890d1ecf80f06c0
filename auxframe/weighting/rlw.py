"""Random loss weighting, RLW (Lin, Ye, Xu, Shi and Zhang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022).

At every step the task weights are drawn afresh, ``lambda = f(x)`` with ``x ~ p(x)``, and the model
trains on ``sum_t lambda_t L_t``. The paper's distributions (its Table 1):

* ``'normal'``: ``softmax(x)``, ``x ~ N(0, I)`` (the default, LibMTL's ``RLW``);
* ``'uniform'``: ``x / sum(x)``, ``x ~ U(0, 1)^T``;
* ``'dirichlet'``: ``x ~ Dir(1, ..., 1)``;
* ``'bernoulli'``: ``x ~ Bernoulli(1/2)^T``, normalised by its sum (all-zero draws drawn again);
* ``'constrained_bernoulli'``: one task at random gets weight 1, the others 0.

The weights sum to 1, as in the paper. They come from the method's own seeded generator (saved in
checkpoints), the same on every rank under torchrun.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, VectorWeights, WeightingSetup

DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli")


def draw_weights(distribution: str, num_tasks: int, generator: torch.Generator) -> torch.Tensor:
    """One draw of RLW's weights (``(T,)``, summing to 1) from ``distribution``."""
    if distribution == "normal":
        return torch.softmax(torch.randn(num_tasks, generator=generator), 0)
    if distribution == "uniform":
        x = torch.rand(num_tasks, generator=generator)
        return x / x.sum()
    if distribution == "dirichlet":
        gamma = -torch.rand(num_tasks, generator=generator).log()  # Gamma(1) = Exp(1): Dir(1) by normalising
        return gamma / gamma.sum()
    if distribution == "bernoulli":
        while True:
            x = (torch.rand(num_tasks, generator=generator) < 0.5).float()
            if x.sum() > 0:
                return x / x.sum()
    if distribution == "constrained_bernoulli":
        x = torch.zeros(num_tasks)
        x[int(torch.randint(num_tasks, (1,), generator=generator))] = 1.0
        return x
    raise ConfigError(f"weightings.rlw.distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")


class RLW(VectorWeights):
    """Weights drawn at random every step.

    Args:
        distribution: one of :data:`DISTRIBUTIONS`.
        seed: seed of the weights' generator.
    """

    def __init__(self, distribution: str = "normal", seed: int = 0):
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(f"weightings.rlw.distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
        self.distribution, self.seed = distribution, int(seed)

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.w = self.w / len(self.names)  # logged before the first draw: the distribution's mean

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        self.w = draw_weights(self.distribution, len(self.names), self.generator).to(self.w.device)
        return super().backward(losses, ctx)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
