"""Loggers: a local JSON-lines scalar log (always) and Weights & Biases (offline by default).

W&B mode: ``WANDB_MODE`` in the environment always wins. Otherwise the run is offline, unless the
user asked for online (``WandbLogger.online = True``) *and* is logged in. W&B's files, cache and
config go inside the run directory, so nothing is written elsewhere.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

SCALARS_FILE = "scalars.jsonl"


class ScalarLog:
    """Appends one JSON object per logged step to ``<run_dir>/scalars.jsonl``.

    Readable without W&B: ``[json.loads(l) for l in open(path)]``.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / SCALARS_FILE
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _jsonable(v: Any) -> Any:
    v = float(v)
    return v if math.isfinite(v) else str(v)


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    try:
        return netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(online: bool) -> str | None:
    """The ``mode`` to pass to ``wandb.init``; None when ``WANDB_MODE`` decides."""
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if online and _wandb_logged_in() else "offline"


def gin_bindings(config_text: str) -> dict[str, str]:
    """A gin config's bindings as ``{"scope/configurable.param": "value"}`` (for W&B's run config).

    Values that gin wrapped over several lines are joined.
    """
    out: dict[str, str] = {}
    key = None
    for line in config_text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            key = None
            continue
        if line[0] in " \t" and key is not None:
            out[key] += " " + line.strip()
        elif " = " in line:
            key, value = line.split(" = ", 1)
            key = key.strip()
            out[key] = value.strip()
    return out


class WandbLogger:
    """Logs scalars to W&B with the operative gin config as the run config.

    Args:
        project: W&B project.
        entity: W&B entity (team or user); None for the default.
        online: log online when logged in; offline otherwise (``WANDB_MODE`` always wins).
        tags: run tags.
    """

    def __init__(self, project: str = "auxframe", entity: str | None = None, online: bool = False, tags: tuple = ()):
        self.project, self.entity, self.online, self.tags = project, entity, online, tuple(tags)
        self.run = None

    def start(self, run_dir: str | os.PathLike, name: str, config: Mapping[str, Any], resume_id: str | None) -> str | None:
        """Start (or resume) the W&B run; returns its id, or None when W&B is disabled."""
        mode = resolve_wandb_mode(self.online)
        if (mode or os.environ.get("WANDB_MODE")) == "disabled":
            return None
        wandb_dir = Path(run_dir)
        # Point W&B's directories into the run directory for this run, unless the user chose them.
        wanted = {"WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
        for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
            wanted[var] = str(wandb_dir / "wandb" / sub)
        self._env_set = [var for var in wanted if var not in os.environ]
        os.environ.update({var: wanted[var] for var in self._env_set})
        import wandb

        kwargs: dict[str, Any] = dict(
            project=self.project, entity=self.entity, name=name, dir=str(wandb_dir),
            config=dict(config), tags=list(self.tags), reinit="finish_previous",
        )
        if mode is not None:
            kwargs["mode"] = mode
        if resume_id:
            kwargs.update(id=resume_id, resume="allow")
        self.run = wandb.init(**kwargs)
        return getattr(self.run, "id", None)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.run is not None:
            self.run.log(dict(scalars), step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(dict(values))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
        for var in getattr(self, "_env_set", []):
            os.environ.pop(var, None)
        self._env_set = []
