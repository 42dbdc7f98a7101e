"""The W&B logger, made to work without an account.

- No credentials (no WANDB_API_KEY and no `wandb login`): logs offline, and says so in one line;
  `wandb sync <run dir>/wandb/offline-run-*` uploads the run later.
- WANDB_MODE=disabled: no W&B at all (nothing written, no process started).
- Its files go into the run directory (trainer.default_root_dir) unless save_dir is given.
- W&B's group, job type, tags and name are its options (`--trainer.logger.group ablation1`, or
  `group:` under the logger's init_args in YAML), or W&B's environment variables
  (WANDB_RUN_GROUP, WANDB_JOB_TYPE, WANDB_TAGS, WANDB_NAME), which `seglight sweep` sets; the
  architecture and the dataset are added as tags by the CLI.
"""

from __future__ import annotations

import netrc
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info


def has_wandb_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` writes it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger, offline when there are no credentials, off with WANDB_MODE=disabled.

    Args:
        project: W&B project.
        offline: force offline (true) or online (false); null decides from the credentials.
        save_dir: where W&B writes its files; null: the run directory.
        **kwargs: passed to Lightning's WandbLogger and wandb.init (name, group, job_type, tags,
            notes, ...).
    """

    def __init__(
        self,
        project: str = "seglight",
        offline: bool | None = None,
        save_dir: str | None = None,
        **kwargs,
    ) -> None:
        env_mode = os.environ.get("WANDB_MODE", "").lower()
        if env_mode == "disabled":
            kwargs["mode"] = "disabled"
            offline = False
        elif offline is None:
            offline = env_mode in ("offline", "dryrun") or not has_wandb_credentials()
            if offline and env_mode not in ("offline", "dryrun"):
                rank_zero_info(
                    "W&B: no credentials (WANDB_API_KEY or `wandb login`), logging offline; "
                    "upload later with `wandb sync <run dir>/wandb/offline-run-*`"
                )
        self._dir_given = save_dir is not None
        # W&B's own run summary at the end (history sparklines, ~40 lines per run) repeats what
        # seglight prints; its warnings and the offline/sync lines stay
        if kwargs.get("settings") is None:
            kwargs["settings"] = {"quiet": True}
        super().__init__(project=project, offline=offline, save_dir=save_dir or ".", **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # Lightning passes anonymous=None, which W&B >= 0.19 warns about on every run
            self._wandb_init.pop("anonymous", None)

    def use_dir(self, path: str | os.PathLike) -> None:
        """Write W&B's files under `path` (when no save_dir was given and no run started yet)."""
        if not self._dir_given and self._experiment is None:
            os.makedirs(path, exist_ok=True)
            self._save_dir = self._wandb_init["dir"] = os.fspath(path)

    def name_run(self, name: str, job_type: str | None = None) -> None:
        """Name the run (and set its job type) unless given as options or in WANDB_NAME /
        WANDB_JOB_TYPE; before the run starts."""
        if self._experiment is not None:
            return
        if not self._wandb_init.get("name") and not os.environ.get("WANDB_NAME"):
            self._wandb_init["name"] = self._name = name
        if (
            job_type
            and not self._wandb_init.get("job_type")
            and not os.environ.get("WANDB_JOB_TYPE")
        ):
            self._wandb_init["job_type"] = job_type

    def resume_run(self, run_id: str) -> None:
        """Log into the existing W&B run `run_id` (W&B's resume by id; offline too: `wandb sync`
        uploads the offline parts of one run in order) instead of starting a new one; before the
        run starts. Its name, group and job type stay those of the run."""
        if self._experiment is not None:
            return
        self._wandb_init.update(id=run_id, resume="allow")
        for key in ("name", "group", "job_type"):
            self._wandb_init.pop(key, None)
        self._id, self._name = run_id, None
        self.resumed = True

    resumed = False
    #: an evaluation's step for its metrics: the evaluated checkpoint's (set when it is loaded),
    #: not the evaluation's own 0, which W&B would plot at the start of the training's run
    evaluation_step: int | None = None

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        if step is not None and self.evaluation_step is not None:
            step = self.evaluation_step
        super().log_metrics(metrics, step)

    def add_tags(self, tags: list[str]) -> None:
        """Add tags to the run (rank zero; kept with those given as options or in WANDB_TAGS)."""
        if self._wandb_init.get("mode") == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
            return
        from lightning.pytorch.loggers.logger import DummyExperiment

        run = self.experiment  # started here if it was not yet: tags are set on the live run
        if not isinstance(run, DummyExperiment):  # other ranks than zero get a dummy
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), *tags]))


def wandb_run_id(run_dir: str | os.PathLike) -> str | None:
    """The id of the first W&B run written in `run_dir`/wandb (the fit's), or None.

    W&B names each run's folder `run-<date>_<time>-<id>` (`offline-run-...` offline).
    """
    folder = Path(run_dir) / "wandb"
    if not folder.is_dir():
        return None
    found = [
        m.groups()
        for p in folder.iterdir()
        if p.is_dir() and (m := re.fullmatch(r"(?:offline-)?run-(\d{8}_\d{6})-(\w+)", p.name))
    ]
    return min(found)[1] if found else None
