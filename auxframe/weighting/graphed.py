"""AuxiLearn's hypergradient captured once in a CUDA graph and replayed at every outer step.

On a GPU a small model's outer step is bound by kernel launches, not arithmetic: the forward
passes, the gradient graph, J Hessian-vector products and the mixed term launch several times
the kernels of an inner step. Captured in a CUDA graph (``torch.cuda.CUDAGraph``) the whole
computation replays with one launch; ``bench/auxilearn_cost.py`` (section 7) measured 1.6 inner
steps replayed against 7.7 eager for J = 3 on the quickstart (H200).

What is captured is exactly :func:`auxframe.hypergrad.hypergradient` with ``method='neumann'``,
``curvature='hessian'``, ``mixed='vjp'`` and the AuxiLearn losses (the main task's loss on the
auxiliary set as the outer loss), written without host synchronisation: the term norms come back
as a tensor, read after the replay. Every outer step copies its batches into the graph's static
input buffers and ``alpha`` into a tensor, so the graph is captured once; a batch of another shape
(a smaller last batch) is computed eagerly instead.

The captured intermediates (the outer step's autograd graphs) stay allocated in the graph's
private memory pool for the rest of the run: about the peak memory of one outer step.

:class:`auxframe.weighting.auxilearn.AuxiLearn` uses this with ``cuda_graph=True`` where it
applies (see :meth:`AuxiLearn._graph_blocker`): CUDA, one process, Hessian curvature on the whole
batch, no label generators, no active dropout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

import torch
import torch.nn as nn

from auxframe.hypergrad import _norm, _zeros_for_none  # the same list helpers as the eager computation

if TYPE_CHECKING:  # pragma: no cover
    from auxframe.weighting.auxilearn import AuxiLearn
    from auxframe.weighting.base import TaskLosses

Batch = Mapping[tuple[str, ...], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]


class GraphedHypergradient:
    """The hypergradient of one AuxiLearn weighting, on static buffers, captured at construction.

    Args:
        weighting: the AuxiLearn weighting (its auxiliary network, tasks, Neumann settings).
        model: the multi-task model (not a DistributedDataParallel wrapper).
        inner: W, the parameters the curvature is taken over.
        make_losses: the trainer's ``(outputs, targets) -> TaskLosses``.
        batch: a training batch, ``{group's tasks: (inputs, {task: targets})}``: its shapes fix
            the graph's.
        aux_batch: an auxiliary-set batch ``(inputs, main-task targets)``.
        alpha: the Neumann scale (updated on every call).
        capture: capture the CUDA graph (default); False computes eagerly on every call, the
            same function (for CPUs and tests).

    Raises:
        RuntimeError: capture failed (the caller falls back to the eager computation).
    """

    def __init__(
        self,
        weighting: AuxiLearn,
        model: nn.Module,
        inner: list[nn.Parameter],
        make_losses: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], TaskLosses],
        batch: Batch,
        aux_batch: tuple[torch.Tensor, torch.Tensor],
        alpha: float,
        capture: bool = True,
    ):
        self.w, self.model, self.inner, self.make_losses = weighting, model, inner, make_losses
        self.phi = list(weighting.outer_params)
        self.settings = weighting.neumann_terms, weighting.scale_by_alpha  # baked into the graph
        self.groups = list(batch)
        self.x = {g: x.detach().clone() for g, (x, _) in batch.items()}
        self.y = {t: y.detach().clone() for _, (_, targets) in batch.items() for t, y in targets.items()}
        self.aux_x, self.aux_y = (t.detach().clone() for t in aux_batch)
        device = self.aux_x.device
        self.alpha = torch.tensor(float(alpha), device=device, dtype=inner[0].dtype)
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

    def __call__(self, batch: Batch, aux_batch: tuple[torch.Tensor, torch.Tensor], alpha: float):
        """Copy the batches in, replay; returns ``(grads, term_norms, outer_grad_norm, loss matrix,
        outer loss)`` as fresh tensors (the grads one per outer parameter)."""
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
        return [g.clone() for g in grads], norms.clone(), v_norm.clone(), matrix.clone(), outer.clone()

    def _compute(self):
        """The hypergradient as :func:`auxframe.hypergrad.hypergradient` computes it (Neumann,
        Hessian, mixed by vjp), with no host synchronisation."""
        w = self.w
        outputs: dict[str, torch.Tensor] = {}
        for group in self.groups:
            outputs.update(self.model(self.x[group], tasks=list(group)))
        matrix = w.loss_matrix(self.make_losses(outputs, self.y))
        train_loss = w.auxnet(matrix)
        main = w.main_task
        aux_out = self.model(self.aux_x, tasks=[main])[main]
        outer = self.make_losses({main: aux_out}, {main: self.aux_y}).mean(main)
        v = _zeros_for_none(torch.autograd.grad(outer, self.inner, retain_graph=True, allow_unused=True), self.inner)
        g = torch.autograd.grad(train_loss, self.inner, create_graph=True, allow_unused=True)
        live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        grads, params = [g[i] for i in live], [self.inner[i] for i in live]
        term = [v[i] for i in live]  # v where the training loss reaches W, as hypergradient() does
        p = [t.clone() for t in term]
        norms = [_norm(term)]
        for _ in range(w.neumann_terms):
            hv = _zeros_for_none(torch.autograd.grad(grads, params, term, retain_graph=True, allow_unused=True), params)
            term = [t - self.alpha * h for t, h in zip(term, hv)]
            p = [a + b for a, b in zip(p, term)]
            norms.append(_norm(term))
        if w.scale_by_alpha:
            p = [self.alpha * t for t in p]
        mixed = _zeros_for_none(torch.autograd.grad(grads, self.phi, p, allow_unused=True), self.phi)
        return ([-m.detach() for m in mixed], torch.stack(norms).detach(), _norm(v).detach(), matrix.detach(),
                outer.detach())

