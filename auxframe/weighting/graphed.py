"""AuxiLearn's hypergradient captured once in a CUDA graph and replayed at every outer step.

On a GPU a small model's outer step is bound by kernel launches, not arithmetic: the forward
passes, the gradient graph, J Hessian-vector products and the mixed term launch several times
the kernels of an inner step. Captured in a CUDA graph (``torch.cuda.CUDAGraph``) the whole
computation replays with one launch; ``bench/auxilearn_cost.py`` (section 7) measured 1.6 inner
steps replayed against 7.7 eager for J = 3 on the quickstart (H200).

What is captured is :func:`auxframe.hypergrad.hypergradient_parts`, the computation of
:func:`auxframe.hypergrad.hypergradient`, with the Neumann solver,
``curvature='hessian'``, ``mixed='vjp'`` and the losses the caller gives as functions of the heads'
outputs (AuxiLearn: its combined training loss, and the main task's loss on the auxiliary set as
the outer loss), written without host synchronisation: the term norms come back
as a tensor, read after the replay. Every outer step copies its batches into the graph's static
input buffers and ``alpha`` into a tensor, so the graph is captured once; a batch of another shape
(a smaller last batch) is computed eagerly instead.

The captured intermediates (the outer step's autograd graphs) stay allocated in the graph's
private memory pool for the rest of the run: about the peak memory of one outer step.

:class:`auxframe.weighting.auxilearn.AuxiLearn` uses this with ``cuda_graph=True`` where it
applies (see :meth:`AuxiLearn._choose_path`): CUDA, one process, Hessian curvature on the whole
batch, no label generators, no active dropout.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn

from auxframe.hypergrad import HypergradResult, Neumann, diverging, hypergradient_parts

Batch = Mapping[tuple[str, ...], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]
#: ``(head outputs, targets) -> (training loss L_T, the loss matrix it combines)``.
TrainLoss = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
#: ``(the main head's output on the auxiliary set, its targets) -> outer loss L_A``.
OuterLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GraphedHypergradient:
    """A hypergradient on static batch buffers, captured in a CUDA graph at construction.

    It knows nothing of the weighting that uses it: the losses come as functions of the heads'
    outputs. :meth:`auxframe.weighting.auxilearn.AuxiLearn.graph` builds one for AuxiLearn.

    Args:
        model: the multi-task model (not a DistributedDataParallel wrapper), called as
            ``model(x, tasks=[...]) -> {task: output}``.
        inner: W, the parameters the curvature is taken over.
        outer: phi, the parameters the hypergradient is taken for.
        train_loss: ``(outputs, targets) -> (L_T, loss matrix)`` on the training batch.
        outer_loss: ``(main output, targets) -> L_A`` on the auxiliary-set batch.
        main_task: the task whose head runs on the auxiliary-set batch.
        batch: a training batch, ``{group's tasks: (inputs, {task: targets})}``: its shapes fix
            the graph's.
        aux_batch: an auxiliary-set batch ``(inputs, main-task targets)``.
        alpha: the Neumann scale (updated on every call).
        neumann_terms: J, baked into the graph.
        scale_by_alpha: multiply the series by alpha (baked into the graph).
        capture: capture the CUDA graph (default); False computes eagerly on every call, the
            same function (for CPUs and tests).

    Raises:
        RuntimeError: capture failed (the caller falls back to the eager computation).
    """

    def __init__(
        self,
        model: nn.Module,
        inner: list[nn.Parameter],
        outer: list[nn.Parameter],
        train_loss: TrainLoss,
        outer_loss: OuterLoss,
        main_task: str,
        batch: Batch,
        aux_batch: tuple[torch.Tensor, torch.Tensor],
        alpha: float,
        *,
        neumann_terms: int,
        scale_by_alpha: bool = False,
        capture: bool = True,
    ):
        self.model, self.inner, self.phi = model, list(inner), list(outer)
        self.train_loss, self.outer_loss, self.main_task = train_loss, outer_loss, main_task
        self.settings = int(neumann_terms), bool(scale_by_alpha)  # baked into the graph
        self.groups = list(batch)
        self.x = {g: x.detach().clone() for g, (x, _) in batch.items()}
        self.y = {t: y.detach().clone() for _, (_, targets) in batch.items() for t, y in targets.items()}
        self.aux_x, self.aux_y = (t.detach().clone() for t in aux_batch)
        device = self.aux_x.device
        self.alpha = torch.tensor(float(alpha), device=device, dtype=self.inner[0].dtype)
        self.graph = None
        if not capture:
            return
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on the side stream, as capture requires
                self._compute()
            with torch.cuda.graph(self.graph, stream=stream):
                self.static = self._compute()
        torch.cuda.current_stream(device).wait_stream(stream)

    def fits(self, batch: Batch, aux_batch: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Whether these batches have the captured shapes and dtypes (else compute eagerly)."""
        if list(batch) != self.groups:
            return False
        same = [(x, self.x[g]) for g, (x, _) in batch.items()]
        same += [(y, self.y[t]) for _, (_, targets) in batch.items() for t, y in targets.items()]
        same += [(aux_batch[0], self.aux_x), (aux_batch[1], self.aux_y)]
        return all(a.shape == b.shape and a.dtype == b.dtype for a, b in same)

    def __call__(
        self, batch: Batch, aux_batch: tuple[torch.Tensor, torch.Tensor], alpha: float
    ) -> tuple[HypergradResult, torch.Tensor, torch.Tensor]:
        """Copy the batches in, replay; returns ``(result, loss matrix, outer loss)`` as fresh tensors."""
        with torch.no_grad():
            for g, (x, targets) in batch.items():
                self.x[g].copy_(x)
                for t, y in targets.items():
                    self.y[t].copy_(y)
            self.aux_x.copy_(aux_batch[0])
            self.aux_y.copy_(aux_batch[1])
            self.alpha.fill_(float(alpha))
        if self.graph is None:
            self.static = self._compute()
        else:
            self.graph.replay()
        grads, norms, v_norm, matrix, outer = self.static
        term_norms = norms.tolist()  # (one host synchronisation, after the replay)
        result = HypergradResult(grads=[g.clone() for g in grads], term_norms=term_norms,
                                 diverging=diverging(term_norms), outer_grad_norm=float(v_norm))
        return result, matrix.clone(), outer.clone()

    def _compute(self):
        """The forward passes, then the hypergradient core (:func:`auxframe.hypergrad.hypergradient_parts`
        with the Neumann solver, Hessian curvature and the mixed term by vjp): no host synchronisation."""
        outputs: dict[str, torch.Tensor] = {}
        for group in self.groups:
            outputs.update(self.model(self.x[group], tasks=list(group)))
        train_loss, matrix = self.train_loss(outputs, self.y)
        main = self.main_task
        outer = self.outer_loss(self.model(self.aux_x, tasks=[main])[main], self.aux_y)
        neumann_terms, scale_by_alpha = self.settings
        parts = hypergradient_parts(train_loss, outer, self.inner, self.phi,
                                    Neumann(neumann_terms, self.alpha, scale_by_alpha))
        return parts.grads, torch.stack(parts.norms), parts.outer_grad_norm, matrix.detach(), outer.detach()
