"""Loggers: a local JSON-lines scalar log (always) and Weights & Biases (offline by default).

W&B mode: ``WANDB_MODE`` in the environment always wins. Otherwise the run is offline, unless the
user asked for online (``WandbLogger.online = True``) *and* is logged in. W&B's files, cache and
config go inside the run directory, so nothing is written elsewhere.

W&B conventions (README, "W&B"): a run's **group** is its configuration's name
(:func:`auxframe.runconfig.group_name`, the same for every seed), its **job type** says what started it
(``train``, ``sweep``, ``probe``), and its **tags** name the weighting, the dataset and the task graph
(``weighting:arml``, ``dataset:digits``, ``main:digit``, ``aux:rotation+parity``). The run config
holds the operative gin config and, under ``run``, the provenance of ``run.json``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

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
        tags: more run tags, after auxframe's own (weighting, dataset, task graph).
        group: the W&B group (None: the configuration's name, so that a configuration's seeds group).
        job_type: the W&B job type (None: what started the run: ``train``, ``sweep`` or ``probe``).
    """

    def __init__(self, project: str = "auxframe", entity: str | None = None, online: bool = False, tags: tuple = (),
                 group: str | None = None, job_type: str | None = None):
        self.project, self.entity, self.online, self.tags = project, entity, online, tuple(tags)
        self.group, self.job_type = group, job_type
        self.run = None

    def init_arguments(self, run_dir: str | os.PathLike, name: str, config: Mapping[str, Any], resume_id: str | None,
                       group: str | None = None, job_type: str = "train", tags: Sequence[str] = ()) -> dict[str, Any]:
        """The arguments of ``wandb.init`` (``mode`` only when this logger decides it, see the module doc)."""
        kwargs: dict[str, Any] = dict(
            project=self.project, entity=self.entity, name=name, dir=str(run_dir), config=dict(config),
            group=self.group or group, job_type=self.job_type or job_type,
            tags=list(dict.fromkeys([*tags, *self.tags])), reinit="finish_previous",
        )
        mode = resolve_wandb_mode(self.online)
        if mode is not None:
            kwargs["mode"] = mode
        if resume_id:
            kwargs.update(id=resume_id, resume="allow")
        return kwargs

    def start(self, run_dir: str | os.PathLike, name: str, config: Mapping[str, Any], resume_id: str | None,
              group: str | None = None, job_type: str = "train", tags: Sequence[str] = ()) -> str | None:
        """Start (or resume) the W&B run; returns its id, or None when W&B is disabled.

        Args:
            run_dir: the run directory (W&B's files go inside it).
            name: the run's name.
            config: the run config (the operative gin bindings; ``run.json``'s provenance is added as ``run``).
            resume_id: the W&B id to resume, or None.
            group: the configuration's name (used unless ``WandbLogger.group`` is set).
            job_type: what started the run (used unless ``WandbLogger.job_type`` is set).
            tags: auxframe's tags for the run (:func:`run_tags`).
        """
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

        from auxframe.rundir import provenance_of

        config = {**config, "run": provenance_of(wandb_dir)}
        self.run = wandb.init(**self.init_arguments(wandb_dir, name, config, resume_id, group, job_type, tags))
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


#: W&B's limit on a tag's length.
MAX_TAG = 64


def run_tags(config: str, main_task: str, aux_tasks: Sequence[str]) -> list[str]:
    """auxframe's W&B tags of a run: ``weighting:NAME``, ``dataset:NAME``, ``main:TASK`` and
    ``aux:TASK+TASK`` (``aux:none`` alone; ``aux:K tasks`` when the names exceed a tag's 64 characters).

    Args:
        config: the gin config text (``gin.config_str()``).
        main_task: the main task's name.
        aux_tasks: the auxiliary tasks' names.
    """
    from auxframe.runconfig import config_bindings, plugin_named

    bindings = config_bindings(config)
    aux = "aux:" + ("+".join(aux_tasks) if aux_tasks else "none")
    if len(aux) > MAX_TAG:
        aux = f"aux:{len(aux_tasks)} tasks"
    tags = [f"weighting:{plugin_named(bindings, 'train.weighting', 'weightings', 'equal')}",
            f"dataset:{plugin_named(bindings, 'train.dataset', 'datasets')}", f"main:{main_task}", aux]
    return [t[:MAX_TAG] for t in tags]
