"""The run directory: one run per directory, checked before any work, locked while training.

Layout::

    <run_dir>/config.gin            the parsed gin config (compared on --resume)
    <run_dir>/operative_config.gin  what the run actually used (gin.operative_config_str)
    <run_dir>/run.json              auxframe version, start time, W&B run id
    <run_dir>/scalars.jsonl         every logged scalar, one JSON object per line
    <run_dir>/metrics.json          final validation and test metrics
    <run_dir>/checkpoints/          step_<N>.pt, the newest few
    <run_dir>/wandb/                the W&B run (offline unless you asked for online)
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from auxframe.errors import RunDirError

CONFIG_FILE = "config.gin"
OPERATIVE_FILE = "operative_config.gin"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# Bindings that may change between the original run and a resumed one.
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.log_every", "train.eval_every")


def _comparable(config: str) -> list[str]:
    return [ln for ln in config.splitlines() if ln.strip() and not ln.startswith(RESUMABLE_CHANGES)]


class RunDir:
    """Checks and owns one run directory.

    Args:
        path: the directory.
        resume: whether the run continues an earlier one in ``path``.
        config: the gin config text of this run (``gin.config_str()``).

    Raises:
        RunDirError: the directory holds another run (or a different config on resume), is not an
            auxframe run directory, has nothing to resume, or is in use by another process.
    """

    def __init__(self, path: str | os.PathLike, resume: bool, config: str):
        self.path = Path(path)
        self.resume = resume
        self.config = config
        self._lock_fd: int | None = None
        saved = self.path / CONFIG_FILE
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} is a file; choose a directory with --run-dir.")
        if saved.is_file():
            if not resume:
                raise RunDirError(
                    f"run directory {self.path} already holds a run. Pass --resume to continue it, or "
                    f"choose another --run-dir."
                )
            self._check_same_config(saved.read_text())
            self._lock()
        elif self.path.is_dir() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise RunDirError(
                f"{self.path} is not empty and is not an auxframe run directory (no {CONFIG_FILE}); "
                f"choose a new or empty --run-dir."
            )
        elif resume:
            raise RunDirError(f"nothing to resume in {self.path}: it holds no run. Drop --resume to start one.")

    def _check_same_config(self, saved: str) -> None:
        old, new = _comparable(saved), _comparable(self.config)
        if old != new:
            removed = [ln for ln in old if ln not in new][:5]
            added = [ln for ln in new if ln not in old][:5]
            raise RunDirError(
                f"--resume: the config differs from the one {self.path} was started with "
                f"(only {', '.join(RESUMABLE_CHANGES)} may change). Was: {removed}; now: {added}. "
                f"Resume with the original gin files, or start a new --run-dir."
            )

    def _lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"another auxframe process is training in {self.path}; wait for it to finish or choose "
                f"another --run-dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def create(self) -> None:
        """Create the directory (after everything was built and validated) and write the config."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        if not self.resume:
            if (self.path / CONFIG_FILE).exists():
                raise RunDirError(f"run directory {self.path} was taken by another run meanwhile; choose another.")
            _write_atomic(self.path / CONFIG_FILE, self.config)
            self._write_run_json({"auxframe_version": _version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def resume_state(self) -> dict[str, Any] | None:
        """The latest checkpoint's state when resuming (None when starting, or none was written)."""
        if not self.resume:
            return None
        from auxframe.checkpoint import latest_checkpoint, load_checkpoint

        path = latest_checkpoint(self.path)
        return load_checkpoint(path) if path is not None else None

    def wandb_id(self) -> str | None:
        return self._read_run_json().get("wandb_id")

    def record_wandb_id(self, run_id: str | None) -> None:
        if run_id:
            self._write_run_json({"wandb_id": run_id})

    def write_operative_config(self) -> None:
        import gin

        _write_atomic(self.path / OPERATIVE_FILE, gin.operative_config_str())

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _read_run_json(self) -> dict[str, Any]:
        f = self.path / RUN_FILE
        return json.loads(f.read_text()) if f.is_file() else {}

    def _write_run_json(self, values: dict[str, Any]) -> None:
        _write_atomic(self.path / RUN_FILE, json.dumps({**self._read_run_json(), **values}, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _version() -> str:
    from auxframe import __version__

    return __version__
