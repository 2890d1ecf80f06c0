"""Generated auxiliary labels (plugin kind ``labelgens``): a network invents the auxiliary task.

The second half of AuxiLearn (Navon et al., ICLR 2021), after MAXL (Liu, Davison and Johns,
"Self-Supervised Generalisation with Meta Auxiliary Learning", NeurIPS 2019). A *label generator*
maps an image and its main-task label ``y`` in ``[0, C)`` to a soft label over ``C * k`` auxiliary
classes, ``k`` per main class. A masked (hierarchical) softmax keeps each example's label inside the
``k`` auxiliary classes of its own main class: auxiliary class ``y * k + j`` (``j < k``) is the
``j``-th subclass of main class ``y``, and every other entry is exactly zero. The main model gets
an auxiliary head trained on these labels (soft cross-entropy); the generator's parameters are the
outer parameters of the AuxiLearn weighting, learned by the hypergradient of the main-task loss on
the auxiliary set (``weightings.auxilearn``; see docs/generated_labels.md).

A ``labelgens`` plugin is a factory ``fn(input_shape, num_classes, **params) -> nn.Module`` whose
module has the attributes ``num_classes`` (C) and ``classes_per_main`` (k) and maps
``(images (B, C_in, H, W), labels (B,) int64)`` to soft labels ``(B, C * k)``: rows of examples with
a label sum to one, rows of examples whose label is missing (``-1``) are zero (zero loss). It may
define ``regularizer(soft_labels, labels) -> scalar``, added to the outer loss (the default
generator's MAXL entropy term against collapse).

Example (gin)::

    generated/Task.name = 'generated'
    generated/Task.generator = @labelgens.default
    labelgens.default.classes_per_main = 5
    labelgens.default.backbone = @generator/backbones.small_cnn
    TaskGraph.tasks = [@digit/Task(), @generated/Task()]
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from auxframe.errors import ConfigError, DataError, TaskGraphError


def masked_softmax(logits: torch.Tensor, labels: torch.Tensor, classes_per_main: int) -> torch.Tensor:
    """Softmax over each example's own block of ``k`` auxiliary classes; zero everywhere else.

    Args:
        logits: ``(B, C * k)`` scores over every auxiliary class.
        labels: ``(B,)`` int64 main-task labels in ``[0, C)``; ``-1`` (missing) gives a zero row.
        classes_per_main: k.

    Returns:
        ``(B, C * k)`` soft labels: row ``b`` is a distribution over columns
        ``labels[b] * k .. labels[b] * k + k - 1`` and zero elsewhere. Only the block's logits
        receive gradients.
    """
    batch, total = logits.shape
    num_classes = total // classes_per_main
    present = labels >= 0
    index = labels.clamp(min=0)
    if bool((index >= num_classes).any()):
        raise DataError(
            f"a main-task label is {int(index.max())}, but the label generator has {num_classes} main classes "
            f"({total} outputs / {classes_per_main} per class). Build it with the main field's `num_classes`."
        )
    blocks = logits.reshape(batch, num_classes, classes_per_main)
    rows = torch.arange(batch, device=logits.device)
    probs = blocks[rows, index].softmax(dim=1) * present.unsqueeze(1).to(logits.dtype)
    out = torch.zeros_like(blocks)
    out[rows, index] = probs
    return out.reshape(batch, total)


def negative_entropy_of_mean(soft_labels: torch.Tensor) -> torch.Tensor:
    """MAXL's anti-collapse term: ``sum_j m_j log m_j`` with ``m`` the batch-mean soft label.

    Minimising it spreads the examples of each main class over its auxiliary classes (the class
    proportions are fixed by the data, so ``H(m)`` is their entropy plus the class-weighted
    entropies of the mean label within each class); individual labels may stay confident.

    Args:
        soft_labels: ``(B, C * k)`` soft labels.

    Returns:
        A scalar ``<= 0``.
    """
    mean = soft_labels.mean(dim=0)
    return (mean * torch.log(mean + 1e-20)).sum()


class LabelGenerator(nn.Module):
    """The default label generator: its own backbone, the one-hot main label, an MLP, a masked softmax.

    Features ``backbone(images)`` (flattened) are concatenated with the one-hot main label and
    mapped by an MLP to ``C * k`` logits; :func:`masked_softmax` keeps each label in its main class's
    block.

    Args:
        input_shape: ``(channels, height, width)`` of the images.
        num_classes: C, the number of main classes.
        classes_per_main: k, auxiliary classes per main class (AuxiLearn and MAXL use 5 on CIFAR).
        backbone: a ``backbones`` plugin (factory called with ``input_shape``) or its registered
            name; its parameters are the generator's own. Give it a gin scope to size it apart
            from the main model's (``@generator/backbones.small_cnn``).
        hidden: widths of the MLP's hidden ReLU layers.
        entropy_weight: weight of MAXL's anti-collapse term (:func:`negative_entropy_of_mean`) in
            the outer loss (MAXL: 0.2); 0 turns it off.
        temperature: the logits are divided by it before the softmax (< 1: sharper labels).

    Example:
        >>> gen = LabelGenerator((1, 8, 8), num_classes=10, classes_per_main=5)
        >>> soft = gen(images, digits)            # (B, 50), row b inside block digits[b]
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        classes_per_main: int = 5,
        backbone: Callable[..., nn.Module] | str = "small_cnn",
        hidden: Sequence[int] = (64,),
        entropy_weight: float = 0.2,
        temperature: float = 1.0,
    ):
        super().__init__()
        if not isinstance(classes_per_main, int) or classes_per_main < 1:
            raise ConfigError(f"labelgens.default.classes_per_main must be a positive integer, got {classes_per_main!r}.")
        if entropy_weight < 0 or temperature <= 0:
            raise ConfigError(
                f"labelgens.default needs entropy_weight >= 0 and temperature > 0, got {entropy_weight!r} and "
                f"{temperature!r}."
            )
        if isinstance(backbone, str):
            from auxframe.registry import registry

            backbone = registry.get("backbones", backbone)
        self.num_classes, self.classes_per_main = int(num_classes), classes_per_main
        self.entropy_weight, self.temperature = float(entropy_weight), float(temperature)
        self.backbone = backbone(input_shape=tuple(input_shape))
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            features = self.backbone(torch.zeros(2, *input_shape)).flatten(1).shape[1]
            self.backbone.train(was)
        layers: list[nn.Module] = []
        width = features + self.num_classes
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, self.num_classes * classes_per_main))
        self.mlp = nn.Sequential(*layers)

    @property
    def num_outputs(self) -> int:
        """C * k, the auxiliary head's output size."""
        return self.num_classes * self.classes_per_main

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Soft auxiliary labels ``(B, C * k)`` for images ``(B, C_in, H, W)`` and labels ``(B,)``."""
        features = self.backbone(images).flatten(1)
        onehot = F.one_hot(labels.clamp(min=0), self.num_classes).to(features.dtype)
        logits = self.mlp(torch.cat([features, onehot], dim=1)) / self.temperature
        return masked_softmax(logits, labels, self.classes_per_main)

    def regularizer(self, soft_labels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``entropy_weight`` times MAXL's negative entropy of the batch-mean label (added to the outer loss)."""
        return self.entropy_weight * negative_entropy_of_mean(soft_labels)


class GeneratedLabels:
    """A task's label source made from a label generator: what the trainer and weightings use.

    Calls the generator on a batch (in the model's train or eval mode; with gradients to the
    generator only when asked, i.e. in an outer step), and accumulates what the inner steps
    trained on since the last :meth:`statistics` call: the mean entropy of a generated label and
    how often each auxiliary class was an example's most likely one.

    Args:
        generator: a ``labelgens`` module (attributes ``num_classes``, ``classes_per_main``).
        task: the name of the task whose labels it makes (for messages and log names).

    Raises:
        TaskGraphError: the module lacks the attributes of a label generator.
    """

    def __init__(self, generator: nn.Module, task: str):
        for attr in ("num_classes", "classes_per_main"):
            if not isinstance(getattr(generator, attr, None), int):
                raise TaskGraphError(
                    f"the label generator of task '{task}' ({type(generator).__name__}) has no integer `{attr}` "
                    f"attribute; a labelgens plugin's module must have `num_classes` and `classes_per_main`."
                )
        if not isinstance(generator, nn.Module):
            raise TaskGraphError(f"the label generator of task '{task}' is {type(generator).__name__}, not an nn.Module.")
        self.generator, self.task = generator, task
        self.num_classes, self.classes_per_main = generator.num_classes, generator.classes_per_main
        self._reset()

    @property
    def num_outputs(self) -> int:
        return self.num_classes * self.classes_per_main

    def parameters(self) -> list[nn.Parameter]:
        """The generator's trainable parameters (a list)."""
        return [p for p in self.generator.parameters() if p.requires_grad]

    def to(self, device: torch.device) -> "GeneratedLabels":
        self.generator.to(device)
        return self

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, train: bool, grad: bool = False) -> torch.Tensor:
        """Soft labels ``(B, C * k)`` for a batch; counted in the statistics when ``train`` and not ``grad``."""
        if self.generator.training != train:
            self.generator.train(train)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            soft = self.generator(images, labels)
        if tuple(soft.shape) != (images.shape[0], self.num_outputs):
            raise TaskGraphError(
                f"the label generator of task '{self.task}' returned shape {tuple(soft.shape)} for {images.shape[0]} "
                f"images; it must return (B, num_classes * classes_per_main) = (B, {self.num_outputs})."
            )
        if train and not grad:
            self._count(soft.detach(), labels)
        return soft

    def regularizer(self, soft_labels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """The generator's own outer-loss term, or None when it defines none."""
        reg = getattr(self.generator, "regularizer", None)
        return reg(soft_labels, labels) if reg is not None else None

    # -- what the inner steps trained on ----------------------------------------------------------
    def _reset(self) -> None:
        self.usage = torch.zeros(self.num_classes, self.classes_per_main, dtype=torch.float64)
        self.entropy_sum, self.rows = 0.0, 0

    @torch.no_grad()
    def _count(self, soft: torch.Tensor, labels: torch.Tensor) -> None:
        keep = labels >= 0
        soft, labels = soft[keep], labels[keep]
        blocks = soft.reshape(-1, self.num_classes, self.classes_per_main)[torch.arange(len(labels)), labels]
        self.entropy_sum += float(-(blocks * torch.log(blocks.clamp_min(1e-12))).sum())
        self.rows += int(labels.numel())
        flat = (labels * self.classes_per_main + blocks.argmax(dim=1)).cpu()
        self.usage.view(-1).index_add_(0, flat, torch.ones(len(flat), dtype=torch.float64))

    def statistics(self, reset: bool = True) -> dict[str, float]:
        """What the generated labels looked like since the last reset, for the logs.

        Returns:
            ``entropy``: mean entropy (nats) of one generated label (0: one-hot; ``log k``:
            uniform); ``classes_in_use``: mean over the main classes seen of the number of
            auxiliary classes that were the most likely one for at least one example; and
            ``classes_in_use/<c>`` for each main class ``c`` seen. Empty when nothing was counted.
        """
        if self.rows == 0:
            return {}
        seen = self.usage.sum(dim=1) > 0
        in_use = (self.usage > 0).sum(dim=1)
        out = {"entropy": self.entropy_sum / self.rows, "classes_in_use": float(in_use[seen].double().mean())}
        out.update({f"classes_in_use/{c}": float(in_use[c]) for c in torch.nonzero(seen).flatten().tolist()})
        if reset:
            self._reset()
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "usage": self.usage.clone(),
                "entropy_sum": self.entropy_sum, "rows": self.rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.usage = state["usage"].clone().to(torch.float64)
        self.entropy_sum, self.rows = float(state["entropy_sum"]), int(state["rows"])


def build_generated_labels(factory: Callable[..., nn.Module] | str, task: str, input_shape: Sequence[int],
                           num_classes: int) -> GeneratedLabels:
    """Call a ``labelgens`` factory (or its registered name) and wrap the module for task ``task``."""
    if isinstance(factory, str):
        from auxframe.registry import registry

        factory = registry.get("labelgens", factory)
    if isinstance(factory, nn.Module):
        raise TaskGraphError(
            f"task '{task}' got a label generator instance; name the factory without parentheses "
            f"(`{task}/Task.generator = @labelgens.default`): auxframe calls it with the image shape and "
            f"the number of main classes."
        )
    return GeneratedLabels(factory(input_shape=tuple(input_shape), num_classes=int(num_classes)), task)
