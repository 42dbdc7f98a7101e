"""The command line: `python -m seglight fit --config experiments/unet.yaml` (and validate, test,
predict) through LightningCLI, plus seglight's own subcommands (`models`, `datasets`).

What this adds to LightningCLI:
- short class names (`model: UNet`, `data: CamVid`), checked before parsing with a clear error;
- `defaults.yaml` next to the first --config file is applied first, so experiment files are
  short deltas over it;
- the data's num_classes, class_names, ignore_index and in_channels are linked into the model;
- a run directory per run, runs/<experiment>/version_N (config.yaml, checkpoints/, metrics.json,
  W&B files), and `--ckpt_path last|best` resolved to the newest run of that experiment;
- bf16 mixed precision chosen automatically on a GPU when trainer.precision is not set;
- errors caused by the input are printed as one short message, not a traceback.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

import seglight.data  # noqa: F401  (registers the datasets)
import seglight.models  # noqa: F401  (registers the architectures)
from seglight.data.base import DATASETS, SegmentationDataModule
from seglight.errors import ConfigError, SeglightError
from seglight.models.base import MODELS, SegmentationModel
from seglight.utils import git_revision

DEFAULTS_FILE = "defaults.yaml"
RUN_DIR_ENV = "SEGLIGHT_RUN_DIR"


# ------------------------------------------------------------------------------- config logging
def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"class_path": "x.UNet", "init_args": {"encoder": "r34"}}} ->
    {"model": "UNet", "model.encoder": "r34"}: keys W&B can group and filter runs by."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "class_path" in value:
            flat[name] = str(value["class_path"]).rsplit(".", 1)[-1]
            flat.update(flatten_config(value.get("init_args") or {}, f"{name}."))
        elif isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            flat[name] = ", ".join(
                str(v.get("class_path", v)).rsplit(".", 1)[-1] if isinstance(v, dict) else str(v)
                for v in value
            )
        else:
            flat[name] = value
    return flat


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves config.yaml in the run directory and logs the resolved config (flattened) and the git
    revision to every logger (W&B's run config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        flat = flatten_config(config)
        flat.update({f"git.{k}": v for k, v in git_revision().items()})
        for logger in trainer.loggers:
            logger.log_hyperparams(flat)


# ------------------------------------------------------------------------------- help text
class _HelpFormatter(DefaultHelpFormatter):
    def _fill_text(self, text: str, width: int, indent: str) -> str:  # keep the epilog's layout
        return "".join(indent + line for line in text.splitlines(keepends=True))


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _own_options(cls: type, base: type, group: str) -> list[str]:
    """One line per __init__ argument that `cls` adds to `base`, with its type, default and doc."""
    from docstring_parser import parse

    docs = {
        p.arg_name: (p.description or "").replace("\n", " ")
        for p in parse(cls.__doc__ or "").params
    }
    base_params = set(inspect.signature(base.__init__).parameters)
    lines = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or name in base_params or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = "" if p.default is inspect.Parameter.empty else f" = {p.default!r}"
        doc = f"  {docs[name]}" if docs.get(name) else ""
        lines.append(f"      --{group}.{name}{default}{doc}")
    return lines


def _epilog() -> str:
    lines = [
        "architectures (--model NAME, then --model.OPTION VALUE; all options: --model.help NAME):"
    ]
    for name, cls in sorted(MODELS.items()):
        lines.append(f"  {name}: {_first_doc_line(cls)}")
        lines += _own_options(cls, SegmentationModel, "model")
    lines.append("")
    lines.append("datasets (--data NAME, then --data.OPTION VALUE; all options: --data.help NAME):")
    for name, cls in sorted(DATASETS.items()):
        lines.append(f"  {name}: {_first_doc_line(cls)}")
        lines += _own_options(cls, SegmentationDataModule, "data")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- run directories
def _versions(base: Path) -> list[Path]:
    return [
        p for p in base.glob("version_*") if p.is_dir() and re.fullmatch(r"version_\d+", p.name)
    ]


_CREATED_RUN_DIRS: list[Path] = []


def new_run_dir(base: Path) -> Path:
    """Reserve base/version_N with N one above the highest existing (removed again by `run` if the
    run fails before writing anything into it)."""
    base.mkdir(parents=True, exist_ok=True)
    n = max((int(p.name.split("_")[1]) for p in _versions(base)), default=-1) + 1
    while True:
        run_dir = base / f"version_{n}"
        try:
            run_dir.mkdir()
            _CREATED_RUN_DIRS.append(run_dir)
            return run_dir
        except FileExistsError:  # another process took it
            n += 1


def find_checkpoint(base: Path, which: str) -> Path:
    """The newest run's last.ckpt ("last"), or the best checkpoint recorded in it ("best")."""
    lasts = sorted(
        (
            p / "checkpoints" / "last.ckpt"
            for p in _versions(base)
            if (p / "checkpoints" / "last.ckpt").is_file()
        ),
        key=lambda p: p.stat().st_mtime,
    )
    if not lasts:
        raise ConfigError(
            f"--ckpt_path {which}: no checkpoint found under {base}/version_*/checkpoints/ "
            "(train this experiment first, from this directory, or pass a checkpoint's path)"
        )
    if which == "last":
        return lasts[-1]
    import torch

    state = torch.load(lasts[-1], map_location="cpu", weights_only=False, mmap=True)
    for key, value in state.get("callbacks", {}).items():
        if "ModelCheckpoint" in key and value.get("best_model_path"):
            best = Path(value["best_model_path"])
            if best.is_file():
                return best
    raise ConfigError(f"--ckpt_path best: {lasts[-1]} records no best checkpoint that still exists")


# ------------------------------------------------------------------------------- the CLI
class SeglightCLI(LightningCLI):
    """LightningCLI for SegmentationModel x SegmentationDataModule (see the module docstring)."""

    def __init__(
        self, args: list[str] | None = None, experiment: str | None = None, **kwargs: Any
    ) -> None:
        self.experiment = experiment
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            SegmentationModel,
            SegmentationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    def init_parser(self, **kwargs: Any):
        kwargs.setdefault("formatter_class", _HelpFormatter)  # subcommands inherit the main one's
        if "description" in kwargs:  # a subcommand's parser: list every architecture's options
            kwargs.setdefault("epilog", _epilog())
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for key in ("num_classes", "class_names", "ignore_index", "in_channels"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            self.user_num_classes = (
                config.model.init_args.get("num_classes") if config.get("model") else None
            )
            self._setup_run_dir(config, subcommand)

    def _setup_run_dir(self, config, subcommand: str) -> None:
        name = self.experiment or str(config.model.class_path).rsplit(".", 1)[-1].lower()
        base = Path("runs") / name
        ckpt = config.get("ckpt_path")
        if ckpt in ("last", "best"):
            ckpt = str(find_checkpoint(base, ckpt))
            config.ckpt_path = ckpt
            print(f"seglight: --ckpt_path resolved to {ckpt}", file=sys.stderr)
        elif ckpt and not Path(ckpt).is_file():
            raise ConfigError(f"--ckpt_path: no such file {ckpt!r}")
        if config.trainer.get("default_root_dir"):
            run_dir = Path(config.trainer.default_root_dir)
        elif os.environ.get(RUN_DIR_ENV) and os.environ.get("LOCAL_RANK") not in (None, "0"):
            run_dir = Path(os.environ[RUN_DIR_ENV])  # a DDP worker: use the launcher's directory
        elif (
            ckpt
            and Path(ckpt).parent.name == "checkpoints"
            and Path(ckpt).parent.parent.name.startswith("version_")
        ):
            run_dir = Path(
                ckpt
            ).parent.parent  # resume or evaluate in the run that made the checkpoint
        else:
            run_dir = new_run_dir(base)
        config.trainer.default_root_dir = str(run_dir)
        os.environ[RUN_DIR_ENV] = str(run_dir)

    def before_instantiate_classes(self) -> None:
        import torch

        config = self.config[self.subcommand] if self.subcommand else self.config
        # `--trainer.enable_progress_bar false` (or model summary) wins over the defaults' callbacks,
        # which Lightning would otherwise refuse as contradictory
        for flag, suffix in (
            ("enable_progress_bar", "ProgressBar"),
            ("enable_model_summary", "ModelSummary"),
        ):
            if config.trainer.get(flag) is False and config.trainer.get("callbacks"):
                config.trainer.callbacks = [
                    c
                    for c in config.trainer.callbacks
                    if not str(c.get("class_path", "")).endswith(suffix)
                ]
        accelerator = str(config.trainer.get("accelerator") or "auto")
        on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        if config.trainer.get("sync_batchnorm") and not on_gpu:
            raise ConfigError(
                "trainer.sync_batchnorm: true needs CUDA GPUs (torch's SyncBatchNorm does not run on "
                f"the CPU, and accelerator={accelerator} gives no GPU here); set it to false"
            )
        if config.trainer.get("precision") is None and on_gpu:
            config.trainer.precision = (
                "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
            )
            print(
                f"seglight: GPU found, using precision {config.trainer.precision}", file=sys.stderr
            )

    def after_instantiate_classes(self) -> None:
        data, model = self.datamodule, self.model
        if self.user_num_classes is not None and self.user_num_classes != data.num_classes:
            raise ConfigError(
                f"model num_classes={self.user_num_classes} disagrees with the data: "
                f"{type(data).__name__} has {data.num_classes} classes. num_classes is taken from the "
                "data; remove it from the model's options"
            )
        run_dir = self.trainer.default_root_dir
        from seglight.loggers import WandbLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.use_dir(run_dir)
        print(
            f"seglight: run directory {run_dir} ({type(model).__name__} on {type(data).__name__})",
            file=sys.stderr,
        )


# ------------------------------------------------------------------------------- argv handling
def _config_paths(argv: list[str]) -> list[tuple[int, str]]:
    found = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            found.append((i, argv[i + 1]))
        elif arg.startswith("--config="):
            found.append((i, arg.split("=", 1)[1]))
    return found


def with_defaults(argv: list[str]) -> list[str]:
    """Insert `--config <dir>/defaults.yaml` before the first --config whose folder has one."""
    configs = _config_paths(argv)
    if not configs:
        return argv
    index, first = configs[0]
    defaults = Path(first).parent / DEFAULTS_FILE
    given = {Path(p).resolve() for _, p in configs if Path(p).exists()}
    if not defaults.is_file() or defaults.resolve() in given:
        return argv
    return [*argv[:index], "--config", str(defaults), *argv[index:]]


def experiment_name(argv: list[str]) -> str | None:
    """The stem of the last --config that is not a defaults file (runs/<name>/...)."""
    names = [Path(p).stem for _, p in _config_paths(argv) if Path(p).name != DEFAULTS_FILE]
    return names[-1] if names else None


def _class_ok(name: str, registry: dict[str, type]) -> bool:
    if name in registry:
        return True
    module, _, attr = name.rpartition(".")
    if not module:
        return False
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


def check_class_names(argv: list[str]) -> None:
    """Fail early, with suggestions, on an unknown `model:` / `data:` class or a missing config file."""
    values: list[tuple[str, str, str]] = []  # (group, name, where)
    for _, path in _config_paths(argv):
        if not Path(path).is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            content = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: invalid YAML: {e}") from e
        for group in ("model", "data"):
            value = content.get(group) if isinstance(content, dict) else None
            if isinstance(value, dict):
                value = value.get("class_path")
            if isinstance(value, str):
                values.append((group, value, path))
    for i, arg in enumerate(argv):
        for group in ("model", "data"):
            if arg == f"--{group}" and i + 1 < len(argv):
                values.append((group, argv[i + 1], "the command line"))
            elif arg.startswith(f"--{group}="):
                values.append((group, arg.split("=", 1)[1], "the command line"))
    for group, name, where in values:
        registry = MODELS if group == "model" else DATASETS
        if name.endswith((".yaml", ".yml", ".json")) or name.startswith("{"):
            continue  # a config file or inline config for the group
        if not _class_ok(name, registry):
            close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            kind = "architecture" if group == "model" else "dataset"
            raise ConfigError(
                f"unknown {kind} {name!r} ({group}: in {where}). "
                f"Known: {', '.join(sorted(registry))}.{hint}"
            )


# ------------------------------------------------------------------------------- own subcommands
def cmd_models(argv: list[str]) -> None:
    """List every architecture with its parameter count for 11 classes."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="seglight architectures (parameters for 11 classes, default options)")
    table.add_column("model")
    table.add_column("params", justify="right")
    table.add_column("paper", justify="right")
    table.add_column("description")
    for name, cls in sorted(MODELS.items()):
        try:
            model = cls(num_classes=11)
            params = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
        except Exception as e:  # noqa: BLE001 - show the row anyway
            params = f"error: {e}"
        paper = f"{cls.paper_params:g}M" if cls.paper_params else "-"
        table.add_row(name, params, paper, _first_doc_line(cls))
    Console().print(table)


def cmd_datasets(argv: list[str]) -> None:
    """List every dataset with its classes and where it expects its files."""
    from rich.console import Console
    from rich.table import Table

    from seglight.data.base import data_home

    table = Table(title="seglight datasets")
    for col in ("data", "classes", "default root", "description"):
        table.add_column(col)
    for name, cls in sorted(DATASETS.items()):
        names = ", ".join(cls.class_names)
        if "root" in inspect.signature(cls.__init__).parameters:
            root = str(data_home() / name.lower())
        else:
            root = "(generated, no files)"
        table.add_row(name, f"{len(cls.class_names)}: {names}", root, _first_doc_line(cls))
    Console().print(table)


COMMANDS = {"models": cmd_models, "datasets": cmd_datasets}


def run(argv: list[str] | None = None) -> SeglightCLI | None:
    """Run the CLI on `argv` (default: sys.argv[1:]); raises SeglightError on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return None
    check_class_names(argv)
    argv = with_defaults(argv)
    _CREATED_RUN_DIRS.clear()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            return SeglightCLI(args=argv, experiment=experiment_name(argv))
    except BaseException:
        for run_dir in _CREATED_RUN_DIRS:  # leave no empty version_N behind a failed start
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()
        raise


def user_error(exc: BaseException | None) -> SeglightError | None:
    """The SeglightError behind `exc`, if any (jsonargparse re-raises errors from constructors as
    ValueErrors chained to the original)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SeglightError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: errors caused by the input are printed without a traceback."""
    try:
        run(argv)
    except Exception as e:
        error = user_error(e)
        if error is None or os.environ.get("SEGLIGHT_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
