"""Seeded, stratified low-data splits: few labels for the main task, the rest unlabelled.

The protocol (the "digits low-label protocol" of ``RESULTS_PROTOCOL.md``) cuts a dataset into five
disjoint parts, class by class, so that every part keeps the class balance of the whole:

1. ``test``: ``test_fraction`` (about 30%) of each class, used only for the final report.
2. ``val``: ``val_per_class`` images of each class, or else ``val_fraction`` of what is left of
   each class; used to choose hyperparameters and checkpoints (never the test split).
3. ``aux``: a held-out *auxiliary set* of a few labelled images per class (``aux_per_class``, or
   ``aux_fraction`` of each class's training pool), for the outer step of bilevel methods.
4. ``labeled``: ``labels_per_class`` images of each class (n in {5, 10} in the protocol) with their
   main-task labels; ``None`` keeps all the rest (the full-data setting).
5. ``unlabeled``: the rest of the training pool, whose main-task labels are hidden; self-supervised
   auxiliary tasks train on ``labeled + unlabeled`` (the ``train`` pool).

Examples whose stratification label is missing (``-1``) cannot be evaluated or counted as
labelled, so they all go to ``unlabeled``. Splits are deterministic for a seed (numpy
``default_rng(seed)``) and differ between seeds.

Two variants for real data sets:

- A dataset with an official test set (``dataset.official_test``: CIFAR, SVHN, CelebA, Pet, CUB,
  NYUv2) gives it as the ``test`` split whole, with ``official_test=True`` (the default); the
  other parts are cut from the remaining images and ``test_fraction`` is not used.
- A stratification field that is not one class per image (NYUv2's per-pixel segmentation) cannot
  be stratified on: every example then counts as one class, the parts are drawn at random, and the
  ``*_per_class`` counts count images.

Example:
    >>> split = LowDataSplit(labels_per_class=10, aux_per_class=2)(dataset)
    >>> split.sizes()
    {'labeled': 100, 'aux': 20, 'unlabeled': ..., 'val': ..., 'test': ...}
    >>> split.pool("labeled+aux")
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import ClassVar

import numpy as np

from auxframe.data.base import ImageDataset
from auxframe.errors import DataError

_PARTS = ("labeled", "aux", "unlabeled", "val", "test")


@dataclass
class Split:
    """The five disjoint index sets of a low-data split (int64, sorted).

    Attributes:
        labeled: main-task labelled training examples.
        aux: held-out auxiliary set (labelled; for bilevel methods' outer step).
        unlabeled: the rest of the training pool (labels hidden; for self-supervised tasks).
        val: validation examples.
        test: test examples.
        POOLS: the valid basic pool names; :meth:`pool` also accepts unions written with ``+``.
    """

    labeled: np.ndarray
    aux: np.ndarray
    unlabeled: np.ndarray
    val: np.ndarray
    test: np.ndarray
    POOLS: ClassVar[tuple[str, ...]] = (*_PARTS, "train", "all")

    def __post_init__(self):
        for name in _PARTS:
            setattr(self, name, np.unique(np.asarray(getattr(self, name), dtype=np.int64)))

    def _basic(self, name: str) -> np.ndarray:
        if name == "train":
            return np.union1d(self.labeled, self.unlabeled)
        if name == "all":
            return np.unique(np.concatenate([getattr(self, p) for p in _PARTS]))
        return getattr(self, name)

    def pool(self, name: str) -> np.ndarray:
        """The indices of a named pool or of a union of pools.

        Args:
            name: one of :attr:`POOLS` (``train`` is ``labeled + unlabeled``, every training
                image except the aux set; ``all`` is every index), or several joined with ``+``,
                e.g. ``"labeled+aux"``.

        Returns:
            Sorted, unique int64 indices.

        Raises:
            DataError: a part of ``name`` is not a valid pool name.
        """
        parts = [p.strip() for p in str(name).split("+")]
        for part in parts:
            if part not in self.POOLS:
                raise DataError(
                    f"unknown split pool '{part}' in '{name}'; valid pools are "
                    f"{', '.join(self.POOLS)}, or a union of them joined with '+' "
                    f"(e.g. 'labeled+aux')."
                )
        return np.unique(np.concatenate([self._basic(p) for p in parts])).astype(np.int64)

    def sizes(self) -> dict[str, int]:
        """Number of examples in each of the five disjoint parts, by name."""
        return {name: int(getattr(self, name).size) for name in _PARTS}


def _round(fraction: float, n: int) -> int:
    """``fraction * n`` rounded half up (the same on every platform)."""
    return int(np.floor(fraction * n + 0.5))


def _check_count(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise DataError(f"{name} must be a whole number or None, got {value!r}; set {name}=<int>.")
    if value < 0:
        raise DataError(f"{name} must be >= 0, got {value}; set {name} to 0 or more (or None).")


def _check_fraction(name: str, value: float | None, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise DataError(f"{name} must be a number in [0, 1), got None; set {name}=0.3, say.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise DataError(f"{name} must be a number in [0, 1), got {value!r}.")
    if not 0.0 <= float(value) < 1.0:
        raise DataError(f"{name} must be in [0, 1), got {value}; set {name} to a fraction below 1.")


@dataclass
class _ClassPlan:
    """How many images of one class go to each part (in split order)."""

    test: int
    val: int
    aux: int
    labeled: int
    unlabeled: int = 0


class LowDataSplit:
    """A seeded, stratified splitter into labeled / aux / unlabeled / val / test.

    Args:
        labels_per_class: main-task labelled training images per class; None = all the training
            pool left after the aux set (or ``labels_fraction`` of it).
        aux_per_class: images per class in the held-out auxiliary set.
        aux_fraction: alternatively, this fraction of each class's training pool (rounded) goes to
            the auxiliary set. At most one of ``aux_per_class`` and ``aux_fraction``; neither means
            no auxiliary set.
        val_per_class: validation images per class; wins over ``val_fraction`` if given.
        val_fraction: fraction of each class's non-test images used for validation.
        test_fraction: fraction of each class used for testing.
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same split.
        stratify_on: the label field to stratify on; None = ``dataset.main_field``.
        labels_fraction: alternatively, this fraction of each class's training pool (after the aux
            set, rounded) is labelled (CelebA 1%: 0.01); needs ``labels_per_class=None``.
        official_test: use the dataset's official test set (``dataset.official_test``) as the
            test split when it has one; False cuts ``test_fraction`` of each class instead.

    Raises:
        DataError: a count is negative or not an integer, a fraction is outside ``[0, 1)``, both
            ``aux_per_class`` and ``aux_fraction`` are set, or both ``labels_per_class`` and
            ``labels_fraction``.
    """

    def __init__(
        self,
        labels_per_class: int | None = 10,
        aux_per_class: int | None = None,
        aux_fraction: float | None = None,
        val_per_class: int | None = None,
        val_fraction: float | None = 0.1,
        test_fraction: float = 0.3,
        seed: int = 0,
        stratify_on: str | None = None,
        labels_fraction: float | None = None,
        official_test: bool = True,
    ):
        for name, value in (
            ("labels_per_class", labels_per_class),
            ("aux_per_class", aux_per_class),
            ("val_per_class", val_per_class),
        ):
            _check_count(name, value)
        _check_fraction("aux_fraction", aux_fraction)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("labels_fraction", labels_fraction)
        if labels_per_class is not None and labels_fraction is not None:
            raise DataError(
                f"labels_per_class={labels_per_class} and labels_fraction={labels_fraction} are both set; "
                f"the labelled set is sized by one of them: set labels_per_class=None to use the fraction."
            )
        _check_fraction("test_fraction", test_fraction, allow_none=False)
        if aux_per_class is not None and aux_fraction is not None:
            raise DataError(
                f"aux_per_class={aux_per_class} and aux_fraction={aux_fraction} are both set; "
                f"the auxiliary set is sized by one of them: set the other to None."
            )
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise DataError(f"seed must be an integer, got {seed!r}.")
        self.labels_per_class = labels_per_class
        self.aux_per_class = aux_per_class
        self.aux_fraction = aux_fraction
        self.val_per_class = val_per_class
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = int(seed)
        self.stratify_on = stratify_on
        self.labels_fraction = labels_fraction
        self.official_test = bool(official_test)

    def __repr__(self) -> str:
        args = ", ".join(
            f"{k}={getattr(self, k)!r}"
            for k in (
                "labels_per_class", "aux_per_class", "aux_fraction", "val_per_class",
                "val_fraction", "test_fraction", "seed", "stratify_on", "labels_fraction", "official_test",
            )
        )
        return f"LowDataSplit({args})"

    def __call__(self, dataset: ImageDataset) -> Split:
        """Split ``dataset`` by class of its stratification field.

        Args:
            dataset: any :class:`ImageDataset`; only ``len`` and ``targets`` are used.

        Returns:
            The :class:`Split`; its five parts partition ``range(len(dataset))``.

        Raises:
            DataError: the stratification field does not exist; a class has too few images for
                the validation, auxiliary or labelled sets asked for; the official test indices are
                out of range; or the labeled, val or test split comes out empty.
        """
        field_name = self.stratify_on or dataset.main_field
        targets = self._targets(dataset, field_name)
        official = self._official_test(dataset)
        rng = np.random.default_rng(self.seed)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in _PARTS}
        in_test = np.zeros(len(dataset), dtype=bool)
        if official is not None:
            in_test[official] = True
            parts["test"].append(official)
        parts["unlabeled"].append(np.flatnonzero((targets < 0) & ~in_test))
        for cls in np.unique(targets[(targets >= 0) & ~in_test]):
            members = rng.permutation(np.flatnonzero((targets == cls) & ~in_test))
            plan = self._plan(int(cls), members.size, field_name, cut_test=official is None)
            start = 0
            for name in ("test", "val", "aux", "labeled", "unlabeled"):
                count = getattr(plan, name)
                parts[name].append(members[start : start + count])
                start += count
        split = Split(**{name: np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
                         for name, chunks in parts.items()})
        self._check_not_empty(split, len(dataset))
        return split

    @staticmethod
    def _targets(dataset: ImageDataset, field_name: str) -> np.ndarray:
        """Per-image classes to stratify on; all zeros (one group) for a field that has none."""
        if dataset.field(field_name).kind != "class":
            return np.zeros(len(dataset), dtype=np.int64)
        targets = np.asarray(dataset.targets(field_name), dtype=np.int64)
        if targets.shape != (len(dataset),):
            raise DataError(
                f"{type(dataset).__name__}.targets('{field_name}') has shape {targets.shape}, "
                f"expected ({len(dataset)},); fix the dataset's targets()."
            )
        return targets

    def _official_test(self, dataset: ImageDataset) -> np.ndarray | None:
        """The dataset's official test indices when asked for and present, checked."""
        official = getattr(dataset, "official_test", None) if self.official_test else None
        if official is None:
            return None
        official = np.unique(np.asarray(official, dtype=np.int64))
        if official.size == 0 or official[0] < 0 or official[-1] >= len(dataset):
            raise DataError(
                f"{type(dataset).__name__}.official_test is empty or holds indices outside [0, {len(dataset)}); "
                f"fix the dataset, or set `LowDataSplit.official_test = False`."
            )
        return official

    def _plan(self, cls: int, n: int, field_name: str, cut_test: bool = True) -> _ClassPlan:
        """Counts per part for a class of ``n`` images; raises if the class is too small."""
        where = f"class {cls} of field '{field_name}'"
        n_test = _round(self.test_fraction, n) if cut_test else 0
        rest = n - n_test
        if self.val_per_class is not None:
            n_val = self.val_per_class
            if n_val > rest:
                raise DataError(
                    f"{where} has {rest} images after the test split (of {n}), but "
                    f"val_per_class={n_val} asks for {n_val}; lower val_per_class "
                    f"(or test_fraction)."
                )
        else:
            n_val = _round(self.val_fraction or 0.0, rest)
        pool = rest - n_val
        if self.aux_per_class is not None:
            n_aux = self.aux_per_class
            if n_aux > pool:
                raise DataError(
                    f"the auxiliary set is larger than the training set: {where} has {pool} "
                    f"training images after the test/val splits, but aux_per_class={n_aux} asks "
                    f"for {n_aux}; lower aux_per_class (or test_fraction / val_fraction)."
                )
        else:
            n_aux = _round(self.aux_fraction or 0.0, pool)
        if self.labels_per_class is None:
            n_labeled = pool - n_aux
            if self.labels_fraction is not None:
                n_labeled = _round(self.labels_fraction, n_labeled)
        else:
            n_labeled = self.labels_per_class
            if n_labeled + n_aux > pool:
                asked = f"labels_per_class={n_labeled}"
                if n_aux:
                    aux_name = "aux_per_class" if self.aux_per_class is not None else "aux_fraction"
                    asked += f" plus {n_aux} for the aux set ({aux_name})"
                raise DataError(
                    f"{where} has {pool} training images after the test/val splits, but "
                    f"{asked} asks for {n_labeled + n_aux}; lower labels_per_class"
                    + (" or the aux set" if n_aux else "")
                    + " (or test_fraction / val_fraction)."
                )
        return _ClassPlan(
            test=n_test, val=n_val, aux=n_aux, labeled=n_labeled,
            unlabeled=pool - n_aux - n_labeled,
        )

    def _check_not_empty(self, split: Split, n: int) -> None:
        """Raise if the labeled, val or test split is empty, naming the parameter to change."""
        if split.test.size == 0:
            raise DataError(
                f"the test split is empty: test_fraction={self.test_fraction} of each class "
                f"rounds to 0 images ({n} examples in all); raise test_fraction."
            )
        if split.val.size == 0:
            how = (
                f"val_per_class={self.val_per_class}" if self.val_per_class is not None
                else f"val_fraction={self.val_fraction} of each class rounds to 0 images"
            )
            raise DataError(
                f"the val split is empty: {how}; raise val_fraction or set val_per_class >= 1."
            )
        if split.labeled.size == 0:
            if self.labels_per_class is not None:
                fix = f"labels_per_class={self.labels_per_class}; raise labels_per_class"
            else:
                fix = "the aux set takes every training image; lower aux_per_class / aux_fraction"
            raise DataError(f"the labeled split is empty: {fix}.")
