"""Recipes: the gin files that ship inside packages, listed by ``auxframe ls``, copied by ``auxframe cp``.

auxframe's own recipes live in ``auxframe/configs/`` and are named by their path there
(``quickstart.gin``, ``experiments/digits_arml.gin``): on the command line (``--gin``), in an
``include`` line of any gin file, anywhere, and in ``auxframe cp``. Their full package path
(``auxframe/configs/experiments/digits_arml.gin``) names them too.

A third-party package ships recipes the same way: a package folder (with an ``__init__.py``) of
gin files, declared in the entry-point group ``auxframe.recipes``::

    [project.entry-points."auxframe.recipes"]
    mypkg = "mypkg.configs"

and include the folder in the package data (``mypkg = ["configs/*.gin", "configs/**/*.gin"]``).
Its recipes are named by package path, ``mypkg/configs/experiments/x.gin``, which gin's resource
reader also reads in ``include`` lines (as dopamine's recipes are read). The entry point makes
them appear in ``auxframe ls``; naming them works without it.

Nothing here imports the packages whose recipes it lists (nor torch nor gin).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from auxframe.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent / "configs"
"""The recipes shipped inside auxframe."""

GROUP = "auxframe.recipes"
"""The entry-point group through which other packages declare their recipe folders."""

_CONFIG_ROOTS = ("configs", "gin_configs")  # names that older commands put before a recipe's path


@dataclass(frozen=True)
class Recipe:
    """One shipped gin file.

    Attributes:
        name: what names it on the command line and in ``include`` lines, e.g. ``quickstart.gin``
            or ``mypkg/configs/experiments/x.gin``.
        path: the file.
        description: the first sentence of its opening comment.
        dist: the distribution that ships it.
    """

    name: str
    path: Path
    description: str
    dist: str


def package_folder(dotted: str) -> Path | None:
    """The folder of the package ``dotted`` (e.g. ``mypkg.configs``), found without importing it.

    Only the top-level package's location is asked of the import system (which imports nothing);
    the rest is a walk down its folders.
    """
    top, *rest = dotted.split(".")
    if not all(part.isidentifier() for part in [top, *rest]):
        return None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        folder = Path(location, *rest)
        if (folder / "__init__.py").is_file() or (not rest and folder.is_dir()):
            return folder
    return None


def package_resource(name: str | Path) -> Path | None:
    """The file a package path such as ``auxframe/configs/base/train.gin`` names, or None.

    As gin's own resource reader reads it (``gin/resource_reader.py``): the head is a Python package
    (a folder with an ``__init__.py``) and the tail a file in it. Nothing is imported to find it.
    """
    head, filename = os.path.split(str(name))
    if not head or os.path.isabs(head):
        return None
    folder = package_folder(head.replace("/", ".").replace(os.sep, "."))
    candidate = folder / filename if folder is not None else None
    return candidate if candidate is not None and candidate.is_file() else None


def find(name: str | Path) -> Path | None:
    """The recipe ``name`` names: a path under ``auxframe/configs/`` (``.gin`` may be left out;
    a leading ``configs/`` or ``gin_configs/`` is dropped), or a package path; None if none."""
    p = Path(name)
    if p.is_absolute():
        return None
    short = Path(*p.parts[1:]) if len(p.parts) > 1 and p.parts[0] in _CONFIG_ROOTS else p
    for candidate in (CONFIGS / short, CONFIGS / f"{short}.gin"):
        if candidate.is_file():
            return candidate
    return package_resource(p) or (package_resource(f"{p}.gin") if p.suffix != ".gin" else None)


def sources() -> list[tuple[str, Path, str]]:
    """Where recipes live: ``(name prefix, folder, distribution)``, auxframe's own first.

    A declared folder that cannot be found is skipped (``auxframe ls`` says so on stderr through
    :func:`missing_sources`).
    """
    out = [("", CONFIGS, "auxframe")]
    for ep, folder in _declared():
        if folder is not None and folder.resolve() != CONFIGS:
            out.append((ep.value.replace(".", "/") + "/", folder, _dist_name(ep)))
    return out


def missing_sources() -> list[str]:
    """Entry points of group ``auxframe.recipes`` whose folder is not an installed package."""
    return [f"'{ep.name} = {ep.value}' of package '{_dist_name(ep)}'" for ep, folder in _declared() if folder is None]


def _declared() -> list[tuple[metadata.EntryPoint, Path | None]]:
    seen, out = set(), []
    for ep in metadata.entry_points(group=GROUP):
        if (ep.value, _dist_name(ep)) not in seen:  # one distribution seen twice on sys.path
            seen.add((ep.value, _dist_name(ep)))
            out.append((ep, package_folder(ep.value)))
    return out


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return (dist.metadata["Name"] or dist.name) if dist is not None else "<unknown package>"


def recipes(prefix: str = "") -> list[Recipe]:
    """Every shipped recipe whose name starts with ``prefix``, auxframe's first; each source's files
    top-level first, then by folder."""
    out = []
    for name_prefix, folder, dist in sources():
        files = sorted(folder.rglob("*.gin"), key=lambda f: (len(f.relative_to(folder).parts) > 1, f.relative_to(folder)))
        for f in files:
            name = name_prefix + f.relative_to(folder).as_posix()
            if name.startswith(prefix):
                out.append(Recipe(name, f, description(f), dist))
    return out


def description(path: Path) -> str:
    """The first sentence of a gin file's opening comment, on one line."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(ln for ln in lines if ln)
    end = next((i + 1 for i in range(len(text)) if text[i] == "." and (i + 1 == len(text) or text[i + 1] == " ")
                and not text[max(0, i - 3):i + 1].endswith(("e.g.", "i.e.", "al.", "vs."))), len(text))
    return text[:end].rstrip(".")


def copy(name: str, destination: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Copy the recipe ``name`` to ``destination`` (a file, or a folder to copy it into) to edit it.

    Returns:
        ``(recipe file, written file)``.

    Raises:
        ConfigError: no recipe of that name, or the destination exists and ``force`` is False.
    """
    source = find(name)
    if source is None:
        raise ConfigError(f"no recipe named '{name}'. `auxframe ls` lists them (e.g. quickstart.gin, "
                          f"experiments/digits_arml.gin).")
    dest = Path(destination)
    if dest.is_dir() or str(destination).endswith(("/", os.sep)):
        dest = dest / source.name
    if dest.exists() and not force:
        raise ConfigError(f"{dest} already exists; pass --force to overwrite it, or give another file name.")
    if dest.exists() and dest.resolve() == source.resolve():
        raise ConfigError(f"{dest} is the recipe itself; copy it somewhere else to edit it.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, dest)
    return source, dest
