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
        super().__init__(project=project, offline=offline, save_dir=save_dir or ".", **kwargs)

    def use_dir(self, path: str | os.PathLike) -> None:
        """Write W&B's files under `path` (when no save_dir was given and no run started yet)."""
        if not self._dir_given and self._experiment is None:
            os.makedirs(path, exist_ok=True)
            self._save_dir = self._wandb_init["dir"] = os.fspath(path)

    def add_tags(self, tags: list[str]) -> None:
        """Add tags to the run (rank zero; kept with those given as options or in WANDB_TAGS)."""
        if self._wandb_init.get("mode") == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
            return
        from lightning.pytorch.loggers.logger import DummyExperiment

        run = self.experiment  # started here if it was not yet: tags are set on the live run
        if not isinstance(run, DummyExperiment):  # other ranks than zero get a dummy
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), *tags]))
