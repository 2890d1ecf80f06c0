"""PACS-style domain folders: ``<root>/<domain>/<class>/<image>``, one dataset per choice of domains.

PACS (Li et al., ICCV 2017) has four domains (``art_painting``, ``cartoon``, ``photo``,
``sketch``) of the same seven classes; any data set laid out the same way works. Classes and
domains are numbered in sorted order over *every* domain folder under ``root``, so datasets made
from different domains share one class numbering.

Few-shot domain adaptation (the ARML paper's setting): the main task is classification in the
target domain with ``k`` labelled images per class (``LowDataSplit.labels_per_class = k``); each
source domain is an auxiliary task on its own data (``Task.data = @source/datasets.pacs()``),
trained on all of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from auxframe.data.base import LabelField
from auxframe.data.images import SampleDataset, read_image, require_dir
from auxframe.data.transforms import Transforms
from auxframe.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
HOW = ("Download PACS (https://domaingeneralization.github.io/#data, the 'kfold' image folders) and point "
       "`datasets.pacs.root` at the folder holding the domain folders (art_painting, cartoon, photo, sketch).")


class DomainFolders(SampleDataset):
    """Images of the chosen domains; fields ``class`` (main) and ``domain``.

    Args:
        root: the folder holding one folder per domain, each with one folder per class.
        domains: the domains to include (None: all).
        transforms: resizing, augmentation and normalisation.

    Attributes:
        classes: class names (the ``class`` field's numbering).
        domains: every domain name under ``root`` (the ``domain`` field's numbering).
    """

    def __init__(self, root: str = "data/PACS/kfold", domains: Sequence[str] | None = None,
                 transforms: Transforms | None = None):
        root_ = require_dir(root, "PACS-style domain folders", HOW)
        self.domains = sorted(p.name for p in root_.iterdir() if p.is_dir())
        if not self.domains:
            raise DataError(f"{root_} holds no domain folders. {HOW}")
        chosen = list(self.domains if domains is None else domains)
        unknown = [d for d in chosen if d not in self.domains]
        if unknown:
            raise DataError(f"domains {unknown} are not folders of {root_}; its domains are: {', '.join(self.domains)}.")
        self.classes = sorted({c.name for d in self.domains for c in (root_ / d).iterdir() if c.is_dir()})
        self.files: list[Path] = []
        classes, domain_ids = [], []
        for d in chosen:
            for c, name in enumerate(self.classes):
                folder = root_ / d / name
                images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
                self.files += images
                classes += [c] * len(images)
                domain_ids += [self.domains.index(d)] * len(images)
        if not self.files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root_} for domains {chosen}. {HOW}")
        labels = {"class": np.array(classes), "domain": np.array(domain_ids)}
        fields = {"class": LabelField(len(self.classes), f"the object class: {', '.join(self.classes)} (main task)"),
                  "domain": LabelField(len(self.domains), f"the domain: {', '.join(self.domains)}")}
        super().__init__(labels, fields, "class", transforms)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int):
        return read_image(self.files[index]), {}


def pacs(root: str = "data/PACS/kfold", domains: Sequence[str] | None = None,
         transforms: Transforms | None = None) -> DomainFolders:
    """PACS-style ``domain/class/image`` folders, read lazily.

    Args:
        root: the folder holding the domain folders.
        domains: which domains to include, e.g. ``['photo']`` for a target domain (None: all).
        transforms: resizing, augmentation and normalisation (PACS images are 227x227).

    Returns:
        A :class:`DomainFolders` with fields ``class`` and ``domain``.
    """
    return DomainFolders(root, domains, transforms)
