"""ForkMerge (Jiang, Chen, Guo, Fu, Wang and Long, "ForkMerge: Mitigating Negative Transfer in
Auxiliary-Task Learning", NeurIPS 2023), in its two-branch form (the paper's Algorithm 1).

The model is forked into two branches that train side by side from the same point: the *joint*
branch on the main and auxiliary losses (weight 1 each), the *target* branch on the main loss
alone. Every ``merge_every`` steps they are merged,

    theta <- (1 - lambda*) theta_target + lambda* theta_joint,
    lambda* = argmin over lambda in ``alphas`` of the main task's loss on held-out data,

and both branches continue from the merged parameters (each keeps its own optimizer state). A
harmful auxiliary task thus costs at most what the held-out data can tell: lambda* = 0 is the
target-only model.

**A weighting, not a trainer strategy.** The two-branch algorithm needs no more than a weighting
is given: the live model *is* the joint branch (trained by the trainer's optimizer on
``L_main + sum_k L_k``); the target branch is a copy of the backbone and the main head that this
weighting trains on the same main-task batch each step (``torch.func.functional_call`` on the
step's ``TaskLosses.inputs``, with its own optimizer: its state is this weighting's state, in the
checkpoint); the held-out data is the auxiliary set (``StepContext.aux_set_batch``), which the
split already keeps for bilevel methods; and the merge writes the live parameters in the outer
step, as ARML's Langevin noise does after a step. The official code's multi-branch form (one
branch per auxiliary-task subset, ranked and pruned on validation, each with its own data
stream, scheduler and best-on-validation checkpoint) would need several trainers and is a trainer
strategy; it is not implemented here.

Differences from the official code (thuml/ForkMerge, ``auxiliary_domain_image_recognition/
forkmerge.py``): the merge is chosen by the main task's *loss* on ``val_batches`` batches of the
auxiliary set (a weighting sees losses, not the trainer's metrics), and each branch enters the
merge as it is at the end of the period (the official code reloads each branch's best-on-validation
state of the period first). As there, the merge weights are a grid (0, 0.2, ..., 1), auxiliary heads
are not merged (only the target branch's parameters are), and BatchNorm's running statistics are
merged with the parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from auxframe import distributed
from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, VectorWeights, WeightingSetup


class ForkMerge(VectorWeights):
    """A target-only branch beside the joint model, merged every ``merge_every`` steps.

    Args:
        merge_every: steps between merges (the official code merges every epoch).
        alphas: the grid of merge weights of the joint branch (0 is the target branch alone).
        val_batches: auxiliary-set batches the merge weights are chosen on (the same batches for
            every candidate).
        optimizer: factory of the target branch's optimizer (give it the model's, e.g.
            ``@torch.optim.Adam``, so that both branches train alike; default Adam, lr 1e-3).

    Logged: ``forkmerge/lambda`` (the last merge's weight of the joint branch) and, as every
    auxiliary task's weight, the share of the joint branch in the merged model.
    """

    def __init__(self, merge_every: int = 100, alphas: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
                 val_batches: int = 2, optimizer: Callable[..., torch.optim.Optimizer] | None = None):
        if int(merge_every) < 1:
            raise ConfigError(f"weightings.forkmerge.merge_every must be >= 1, got {merge_every}.")
        alphas = tuple(float(a) for a in alphas)
        if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
            raise ConfigError(f"weightings.forkmerge.alphas must be merge weights in [0, 1], got {alphas}.")
        self.outer_every, self.alphas, self.val_batches = int(merge_every), alphas, int(val_batches)
        self.optimizer_factory = optimizer or torch.optim.Adam

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        if not self.aux_tasks:
            raise ConfigError("ForkMerge merges a joint branch trained with auxiliary tasks, but the task graph has none; use weightings.stl.")
        if not info.has_aux_set:
            raise ConfigError("ForkMerge chooses its merge on the held-out auxiliary set, but the split has none; "
                              "set LowDataSplit.aux_per_class > 0 (see datasets/digits.gin).")
        model = distributed.unwrap(info.model)
        heads = {f"heads.{t}." for t in self.aux_tasks}
        self.branch_names = [n for n, p in model.named_parameters() if p.requires_grad and not any(n.startswith(h) for h in heads)]
        params = dict(model.named_parameters())
        self.branch = {n: params[n].detach().clone().requires_grad_(True) for n in self.branch_names}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not any(n.startswith(h) for h in heads)}
        self.optimizer = self.optimizer_factory(list(self.branch.values()))
        self.lam = 1.0
        self._logs: dict[str, float] = {}

    # -- the target branch ---------------------------------------------------------------------------
    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        total = super().backward(losses, ctx)  # the joint branch: the live model, Equal
        self.target_step(losses, ctx)
        return total

    def target_step(self, losses: TaskLosses, ctx: StepContext) -> None:
        """One optimizer step of the target branch on this step's main-task batch."""
        model = distributed.unwrap(ctx.model)
        out = torch.func.functional_call(model, {**self.branch, **self.buffers}, (losses.inputs[self.main_task],),
                                         {"tasks": [self.main_task]})
        loss = losses.from_outputs({self.main_task: out[self.main_task]}).mean(self.main_task)
        tensors = list(self.branch.values())
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, tensors)]
        distributed.all_reduce_mean(grads)
        self.optimizer.zero_grad(set_to_none=True)
        for t, g in zip(tensors, grads):
            t.grad = g
        self.optimizer.step()

    # -- the merge ------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged(self, model: torch.nn.Module, lam: float) -> dict[str, torch.Tensor]:
        """``(1 - lam) theta_target + lam theta_joint`` for the target branch's parameters and float buffers."""
        live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        out = {n: (1 - lam) * t.detach() + lam * live[n].detach() for n, t in self.branch.items()}
        out.update({n: (1 - lam) * b + lam * live[n] if b.is_floating_point() else live[n].clone()
                    for n, b in self.buffers.items()})
        return out

    @torch.no_grad()
    def outer_step(self, ctx: StepContext) -> bool:
        """Merge the branches with the grid weight whose model has the lowest held-out main loss."""
        model = distributed.unwrap(ctx.model)
        batches = [ctx.aux_set_batch() for _ in range(self.val_batches)]
        was_training = model.training
        model.eval()
        scores = []
        for lam in self.alphas:
            state = self.merged(model, lam)
            loss = 0.0
            for x, y in batches:
                out = torch.func.functional_call(model, state, (x,), {"tasks": [self.main_task]})
                loss = loss + ctx.make_losses({self.main_task: out[self.main_task]}, {self.main_task: y}).mean(self.main_task)
            scores.append(loss / len(batches))
        scores_t = torch.stack(scores)
        distributed.all_reduce_mean([scores_t])
        best = int(torch.argmin(scores_t))
        self.lam = self.alphas[best]
        state = self.merged(model, self.lam)
        live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for n, value in state.items():
            live[n].copy_(value)
            if n in self.branch:
                self.branch[n].copy_(value)
            else:
                self.buffers[n].copy_(value)
        model.train(was_training)
        self.w = torch.tensor([1.0] + [self.lam] * len(self.aux_tasks), device=self.w.device)
        self._logs = {"forkmerge/lambda": self.lam, "forkmerge/val_loss": float(scores_t[best])}
        return True

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        return sum(losses.mean(t) for t in self.names if t in losses)  # the joint branch: weight 1 each

    def log_values(self) -> dict[str, float]:
        return {**super().log_values(), **self._logs}

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.clone(), "lam": self.lam, "branch": {n: t.detach().clone() for n, t in self.branch.items()},
                "buffers": {n: b.clone() for n, b in self.buffers.items()}, "optimizer": self.optimizer.state_dict(),
                "logs": dict(self._logs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.lam = float(state["lam"])
        with torch.no_grad():
            for n, t in self.branch.items():
                t.copy_(state["branch"][n])
            for n, b in self.buffers.items():
                b.copy_(state["buffers"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self._logs = dict(state["logs"])
