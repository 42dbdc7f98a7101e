"""`seglight fit | validate | test | predict`: LightningCLI over every registered architecture
and dataset (`seglight.cli` dispatches here).

What this adds to LightningCLI:
- short class names (`model: UNet`, `data: CamVid`), checked before parsing with a clear error;
- `defaults.yaml` next to the first --config file (and one in the folder above it) is applied
  first, so experiment files are short deltas over it (seglight.config);
- the data's num_classes, class_names, ignore_index and in_channels are linked into the model;
- a run directory per run, runs/<experiment>/version_N (config.yaml, checkpoints/, metrics.json,
  W&B files), and `--ckpt_path last|best` resolved to the newest run of that experiment (or to
  the run in --trainer.default_root_dir); under torchrun/srun only rank 0 reserves it and the
  other ranks adopt it (RunDirectorySync); a requeued SLURM job finds its own again;
- evaluations (validate/test/predict) save config_<stage>_<n>.yaml, never over fit's config.yaml;
- bf16 mixed precision chosen automatically on a GPU when trainer.precision is not set;
- errors caused by the input are printed as one short message, not a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import DefaultHelpFormatter, get_loader, set_loader
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

import seglight.data  # noqa: F401  (registers the datasets)
import seglight.methods  # noqa: F401  (registers the training methods)
import seglight.models  # noqa: F401  (registers the architectures)
from seglight.callbacks import EVALUATION_CONFIG_ATTR
from seglight.config import (
    check_class_names,
    experiment_name,
    flatten_config,
    logged_config,
    network_options,
    resolve_network_names,
    with_defaults,
)
from seglight.data.base import DATASETS, SegmentationDataModule
from seglight.errors import ConfigError, user_error
from seglight.models.base import MODELS, SegmentationModel
from seglight.utils import atomic_write_text, first_doc_line, git_revision

RUN_DIR_ENV = "SEGLIGHT_RUN_DIR"


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config in the run directory, config.yaml for `fit` and
    config_<stage>_<n>.yaml for `validate`, `test` and `predict` (the n-th of that stage: an
    evaluation never overwrites the training config), and logs it (flattened), the git
    revision, and the architecture and dataset as tags to every logger (W&B's run config)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes its TrainerFn enum
        if stage != "fit" and self.save_to_log_dir and not self.already_saved:
            log_dir = Path(trainer.log_dir)  # the same on every rank (Lightning broadcasts it)
            n = 1
            while (log_dir / f"config_{stage}_{n}.yaml").exists():
                n += 1
            self.config_filename = trainer.strategy.broadcast(f"config_{stage}_{n}.yaml")
            self.overwrite = False
            setattr(trainer, EVALUATION_CONFIG_ATTR, self.config_filename)  # for metrics.json
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        flat = logged_config(flatten_config(config))
        if trainer.datamodule is not None:  # linked into the model, not an option of its own
            flat["data.num_classes"] = trainer.datamodule.num_classes
        flat.update({f"git.{k}": v for k, v in git_revision().items()})
        tags = [type(pl_module).__name__]
        if trainer.datamodule is not None:
            tags.append(type(trainer.datamodule).__name__)
        for logger in trainer.loggers:
            # an evaluation resumed into the training run keeps the training's config
            if stage == "fit" or not getattr(logger, "resumed", False):
                logger.log_hyperparams(flat)
            # and its tags: a predict on a folder would tag the training's run `Images`
            if hasattr(logger, "add_tags") and (
                stage == "fit" or not getattr(logger, "resumed", False)
            ):
                logger.add_tags(tags)


# ------------------------------------------------------------------------------- help text
class _HelpFormatter(DefaultHelpFormatter):
    def _fill_text(self, text: str, width: int, indent: str) -> str:  # keep the epilog's layout
        return "".join(indent + line for line in text.splitlines(keepends=True))


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
        lines.append(f"  {name}: {first_doc_line(cls)}")
        lines += _own_options(cls, SegmentationModel, "model")
    lines.append("")
    lines.append("datasets (--data NAME, then --data.OPTION VALUE; all options: --data.help NAME):")
    for name, cls in sorted(DATASETS.items()):
        lines.append(f"  {name}: {first_doc_line(cls)}")
        lines += _own_options(cls, SegmentationDataModule, "data")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- parse errors
def _initials(name: str) -> str:
    return "".join(word[0] for word in name.split("_") if word)


def close_names(name: str, known: list[str]) -> list[str]:
    """The known names `name` may have meant: close spellings, the same initials
    (learning_rate -> lr), or one inside the other (epochs -> max_epochs)."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    for k in known:
        short, long_ = sorted((name, k), key=len)
        if k not in close and (
            (len(short) > 1 and _initials(long_) == short and "_" in long_)
            or (len(short) >= 4 and short in long_.split("_"))
            or (len(short) >= 5 and short in long_)
        ):
            close.append(k)
    return close[:3]


def _init_options(cls: type) -> list[str]:
    """The options jsonargparse accepts for `cls`: its __init__ arguments and those its bases
    take through **kwargs."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        for name, p in inspect.signature(klass.__init__).parameters.items():
            if name not in ("self", *names) and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                names.append(name)
    return names


def parse_error(parser, args: list[str], message: str) -> ConfigError:
    """jsonargparse's error for the command line, as one or two lines: an option a class does not
    take or an unknown (or abbreviated) option names what was meant; other errors keep their
    message, without the usage that jsonargparse prints before it."""
    import importlib

    subcommand = args[0] if args and not args[0].startswith("-") else None
    prog = f"seglight {subcommand}" if subcommand else "seglight"
    nested = re.search(
        r'Parser key "([\w.]+)".*?given class_path \'([\w.]+)\':\s*Option \'(\w+)\' is not accepted',
        message,
        re.S,
    )
    if nested:
        group, class_path, option = nested.groups()
        module, _, name = class_path.rpartition(".")
        try:
            known = _init_options(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError, ValueError, TypeError):
            known = []
        close = close_names(option, known)
        hint = f" Did you mean {' or '.join(f'--{group}.{c}' for c in close)}?" if close else ""
        return ConfigError(
            f"--{group}.{option}: {name} has no option {option!r}.{hint} "
            f"(all its options: {prog} --{group}.help {name})"
        )
    if message.startswith("unrecognized arguments:"):
        given = [a for a in message.split(":", 1)[1].split() if a.startswith("--")]
        option = given[0].split("=", 1)[0] if given else ""
        sub = getattr(parser, "_subcommands_action", None)
        sub = sub._name_parser_map.get(subcommand) if sub is not None and subcommand else parser
        known = [o for o in getattr(sub, "_option_string_actions", {}) if o.startswith("--")]
        prefix = option.rpartition(".")[0]
        same_group = [k for k in known if k.rpartition(".")[0] == prefix]
        close = close_names(option, same_group or known) if option else []
        if not close and same_group:  # the last part alone: --trainer.epochs -> max_epochs
            last = {k.rpartition(".")[2]: k for k in same_group}
            close = [last[c] for c in close_names(option.rpartition(".")[2], list(last))]
        abbreviated = [k for k in known if k.startswith(option) and k != option] if option else []
        why = " (abbreviations are not taken)" if abbreviated else ""
        hint = (
            f" Did you mean {' or '.join(abbreviated[:3] or close)}?"
            if close or abbreviated
            else ""
        )
        return ConfigError(
            f"unknown option {option or message}{why}.{hint} ({prog} --help lists them)"
        )
    key = re.match(r'Parser key "([\w.]+)":', message)
    expected = re.findall(r"Expected an? <class '(\w+)'>", message)
    value = re.search(r"Given value: (.*)", message)
    if key and expected and value:  # a value of the wrong type
        types = " or ".join(dict.fromkeys("None" if t == "NoneType" else t for t in expected))
        return ConfigError(f"--{key[1]} {value[1].strip()}: expected {types}")
    return ConfigError(" ".join(line.strip() for line in message.strip().splitlines()))


# ------------------------------------------------------------------------------- run directories
def _versions(base: Path) -> list[Path]:
    return [
        p for p in base.glob("version_*") if p.is_dir() and re.fullmatch(r"version_\d+", p.name)
    ]


_CREATED_RUN_DIRS: list[Path] = []
_CREATED_FOLDERS: list[Path] = []  # deepest first


def new_run_dir(base: Path) -> Path:
    """Reserve base/version_N with N one above the highest existing (removed again by `run` if the
    run fails before writing anything into it)."""
    # the folders this makes above it (runs/, runs/<experiment>): removed too, when left empty
    _CREATED_FOLDERS.extend(p for p in [base, *base.parents] if not p.exists())
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


def find_checkpoint(base: Path, which: str, run_dir: bool = False) -> Path:
    """The newest run's last.ckpt ("last"), or the best checkpoint recorded in it ("best"): the
    newest of base/version_*/checkpoints/last.ckpt, or with `run_dir` base/checkpoints/last.ckpt
    (`--trainer.default_root_dir` names the run directory itself)."""
    runs = [base] if run_dir else _versions(base)
    lasts = sorted(
        (
            p / "checkpoints" / "last.ckpt"
            for p in runs
            if (p / "checkpoints" / "last.ckpt").is_file()
        ),
        key=lambda p: p.stat().st_mtime,
    )
    if not lasts:
        where = f"{base}/checkpoints/" if run_dir else f"{base}/version_*/checkpoints/"
        raise ConfigError(
            f"--ckpt_path {which}: no checkpoint found under {where} "
            "(train this experiment first, from this directory, or pass a checkpoint's path)"
        )
    if which == "last":
        return lasts[-1]
    from seglight.checkpoints import load_checkpoint

    last = lasts[-1]
    state = load_checkpoint(last, "--ckpt_path best: the newest last.ckpt")
    # the recorded path is where the run was written (absolute, or relative to that run's
    # working directory): in a moved or copied run folder it names another run's file. A
    # ModelCheckpoint writes last.ckpt and its best into one folder: look there, by name
    recorded = [
        Path(value["best_model_path"])
        for key, value in (state.get("callbacks") or {}).items()
        if "ModelCheckpoint" in key and value.get("best_model_path")
    ]
    for best in recorded:
        if (last.parent / best.name).is_file():
            return last.parent / best.name
    if not recorded:
        raise ConfigError(
            f"--ckpt_path best: {last} records no best checkpoint (pass a checkpoint's path)"
        )
    names = ", ".join(best.name for best in recorded)
    raise ConfigError(
        f"--ckpt_path best: {last} records best checkpoint {names}, not found beside it in "
        f"{last.parent}/ (pass a checkpoint's path instead)"
    )


def warn_data_differences(config, ckpt: str, subcommand: str) -> None:
    """One line on stderr when a checkpoint of a run is evaluated with data options that change
    the result and differ from those it was trained with (the run's config.yaml), e.g. a model
    trained at `image_scale: 0.25` evaluated at full size."""
    from seglight.config import evaluation_differences

    folder = Path(ckpt).parent
    run_dir = folder.parent if folder.name == "checkpoints" else folder
    try:
        trained = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        now = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    except (OSError, yaml.YAMLError):
        return
    differences = evaluation_differences(trained, now)
    if not differences:
        return
    said = ", ".join(f"{k} {b!r} (this {subcommand}: {a!r})" for k, (b, a) in differences.items())
    fix = " ".join(f"--{k} {_option_value(b)}" for k, (b, _) in differences.items())
    print(
        f"seglight: warning: {ckpt} was trained with {said}; to evaluate it as trained, add "
        f"{fix} (or use --config {run_dir / 'config.yaml'})",
        file=sys.stderr,
    )


def _option_value(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**6)
        .strip()
        .removesuffix("\n...")
        .strip()
    )


# ------------------------------------------------------------------------------- multi-process runs
#: environment variables in which launchers (torchrun, srun, Lightning, jsrun) give a process
#: its rank; any of them non-zero means "not the process that decides the run directory"
RANK_VARIABLES = (
    "RANK",
    "SLURM_PROCID",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "JSM_NAMESPACE_RANK",
)


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0 by its launcher's environment (True without one)."""
    return all(os.environ.get(v, "0") in ("", "0") for v in RANK_VARIABLES)


def slurm_launch_key() -> str | None:
    """The key "<job id>.<step id>" when Lightning manages this process as a SLURM task (srun),
    else None.
    A requeued job keeps its job and step ids, so it finds its run directory again (and
    Lightning its hpc_ckpt_*.ckpt there)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect() or not os.environ.get("SLURM_JOB_ID"):
        return None
    return f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"


def slurm_run_dir(base: Path, key: str) -> Path | None:
    """The run directory that SLURM launch `key` recorded under `base`, if it still exists."""
    marker = base / ".slurm" / key
    try:
        run_dir = Path(marker.read_text().strip())
    except OSError:
        return None
    return run_dir if run_dir.is_dir() else None


class RunDirectorySync(L.Callback):
    """Makes every process of a multi-process run use rank 0's run directory.

    Under torchrun or srun every process parses the command line on its own; only rank 0
    reserves runs/<experiment>/version_N (the others cannot know N: they would reserve their own).
    Once the process group exists (the Trainer's setup, before anything is written), rank 0's
    directory is broadcast and every rank adopts it. Callbacks that write into it (checkpoints,
    config, metrics) set up after this one."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run_dir = trainer.strategy.broadcast(str(trainer.default_root_dir), src=0)
        trainer._default_root_dir = run_dir  # noqa: SLF001 - Lightning keeps it here
        os.environ[RUN_DIR_ENV] = run_dir


# ------------------------------------------------------------------------------- the CLI
#: the parser mode of seglight's CLI: jsonargparse's YAML loader (config files and option values)
#: followed by resolve_network_names, so that a method's `network: {class_path: LinkNet}` takes
#: the registry's short names as `model:` does
PARSER_MODE = "seglight"
_yaml_load = get_loader("yaml")
set_loader(PARSER_MODE, lambda text: resolve_network_names(_yaml_load(text)), (yaml.YAMLError,))


class SeglightCLI(LightningCLI):
    """LightningCLI for SegmentationModel x SegmentationDataModule (see the module docstring)."""

    def __init__(
        self,
        args: list[str] | None = None,
        experiment: str | None = None,
        command: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.experiment = experiment
        self.command = command or args or []  # as typed (for the command printed after fit)
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
        kwargs.setdefault("prog", "seglight")  # not __main__.py; subcommands add their name
        kwargs.setdefault("parser_mode", PARSER_MODE)
        # a mistyped option raises (parse_error answers it in a line, without the usage), and an
        # abbreviated one is refused, not expanded (`--trainer.max_epoch` is not max_epochs)
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("allow_abbrev", False)
        if "description" in kwargs:  # a subcommand's parser: list every architecture's options
            kwargs.setdefault("epilog", _epilog())
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for key in ("num_classes", "class_names", "ignore_index", "in_channels"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="torch CPU threads (default: the usable cores minus the loader workers, per DDP "
            "rank; SEGLIGHT_THREADS, OMP_NUM_THREADS or torch.set_num_threads also win; see "
            "seglight.threads)",
        )

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # validate/test: the model's per-class table says it all, not Lightning's raw one too
        # (`verbose` is the method's argument, added after add_arguments_to_parser)
        if "verbose" in parser.get_defaults():
            parser.set_defaults(verbose=False)
        return parser

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as e:
            if user_error(e) is not None:  # raised by seglight's own checks: one line already
                raise
            raise parse_error(parser, list(args or []), str(e)) from None
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            self.user_num_classes = (
                config.model.init_args.get("num_classes") if config.get("model") else None
            )
            self._setup_run_dir(config, subcommand)
            # an evaluation of a run writes its config beside the fit's, never over it
            # (LoggerSaveConfigCallback numbers them: config_test_1.yaml, config_test_2.yaml, ...)
            filename = "config.yaml" if subcommand == "fit" else f"config_{subcommand}.yaml"
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": filename}

    def _setup_run_dir(self, config, subcommand: str) -> None:
        name = self.experiment or str(config.model.class_path).rsplit(".", 1)[-1].lower()
        base = Path("runs") / name
        root = config.trainer.get("default_root_dir")
        ckpt = config.get("ckpt_path")
        if ckpt in ("last", "best"):
            ckpt = str(find_checkpoint(Path(root) if root else base, ckpt, run_dir=bool(root)))
            config.ckpt_path = ckpt
            print(f"seglight: --ckpt_path resolved to {ckpt}", file=sys.stderr)
        elif ckpt and not Path(ckpt).is_file():
            raise ConfigError(f"--ckpt_path: no such file {ckpt!r}")
        if ckpt:
            self._check_checkpoint(config, ckpt)
            if subcommand != "fit":
                warn_data_differences(config, ckpt, subcommand)
        slurm = slurm_launch_key() if subcommand == "fit" and not ckpt else None
        if root:
            run_dir = Path(root)
        elif os.environ.get(RUN_DIR_ENV) and os.environ.get("LOCAL_RANK") not in (None, "0"):
            run_dir = Path(os.environ[RUN_DIR_ENV])  # a DDP worker: use the launcher's directory
        elif slurm and slurm_run_dir(base, slurm):
            run_dir = slurm_run_dir(base, slurm)  # a requeued SLURM job: continue its run
        elif (
            ckpt
            and Path(ckpt).parent.name == "checkpoints"
            and Path(ckpt).parent.parent.name.startswith("version_")
        ):
            run_dir = Path(
                ckpt
            ).parent.parent  # resume or evaluate in the run that made the checkpoint
        elif not launched_as_rank_zero():
            # torchrun/srun started this process on its own: rank 0 reserves the directory and
            # RunDirectorySync hands it over once the process group exists
            run_dir = base
        else:
            run_dir = new_run_dir(base)
            if slurm:
                atomic_write_text(base / ".slurm" / slurm, f"{run_dir}\n")
        config.trainer.default_root_dir = str(run_dir)
        os.environ[RUN_DIR_ENV] = str(run_dir)

    def _check_checkpoint(self, config, ckpt: str) -> None:
        """Lightning loads --ckpt_path with weights_only=True (never unpickling other objects),
        after a first read here that turns a truncated, corrupt or unsafe file into one line."""
        from seglight.checkpoints import load_checkpoint

        if config.get("weights_only") is False:
            raise ConfigError(
                "--weights_only false: seglight loads checkpoints with weights_only=True only "
                "(a checkpoint must not run code when loaded)"
            )
        config.weights_only = True
        load_checkpoint(ckpt, "--ckpt_path")

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
        # Lightning would also log the model's hyper-parameters, under short names (`lr` beside
        # `model.lr`): LoggerSaveConfigCallback logs the whole config once
        config.trainer.enable_autolog_hparams = False
        accelerator = str(config.trainer.get("accelerator") or "auto")
        on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        if config.trainer.get("sync_batchnorm") and not on_gpu:
            raise ConfigError(
                "trainer.sync_batchnorm: true needs CUDA GPUs (torch's SyncBatchNorm does not run on "
                f"the CPU, and accelerator={accelerator} gives no GPU here); set it to false"
            )
        if (
            on_gpu
            and config.trainer.get("benchmark") is None
            and not config.trainer.get("deterministic")
        ):
            # fixed training crops: cuDNN picks its fastest kernels once per shape (set
            # trainer.benchmark: false when images change size often, e.g. full-size evaluation)
            config.trainer.benchmark = True
        if config.trainer.get("num_sanity_val_steps") is None and not on_gpu:
            # one full-size validation batch, not Lightning's two: it still catches a broken
            # validation_step before the first epoch, at half the cost (13% of a short CPU run)
            config.trainer.num_sanity_val_steps = 1
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
        self._check_data()
        self._configure_threads()
        # first, so that callbacks writing into the run directory set up in rank 0's
        self.trainer.callbacks.insert(0, RunDirectorySync())
        run_dir = self.trainer.default_root_dir
        from seglight.loggers import WandbLogger, wandb_run_id

        previous = wandb_run_id(run_dir)  # the W&B run of the fit that made this run directory
        name = "/".join(Path(run_dir).parts[-2:])
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.use_dir(run_dir)
                if previous:
                    logger.resume_run(previous)
                else:
                    ckpt = self.config[self.subcommand].get("ckpt_path")
                    evaluated = f" of {ckpt}" if ckpt and self.subcommand != "fit" else ""
                    job_type = JOB_TYPES.get(self.subcommand, self.subcommand)
                    run_name = name if self.subcommand == "fit" else f"{name} {job_type}{evaluated}"
                    logger.name_run(run_name, job_type)
        print(
            f"seglight: run directory {run_dir} ({type(model).__name__} on {type(data).__name__})",
            file=sys.stderr,
        )

    def _configure_threads(self) -> None:
        """torch threads (and default loader workers) for this process: seglight.threads."""
        from seglight.threads import configure_threads, default_workers

        data, ranks = self.datamodule, max(1, self.trainer.num_devices)
        if getattr(data, "workers_by_policy", False) and ranks > 1:
            data.num_workers = default_workers(ranks)  # the rank's share of the cores
        workers = 0 if getattr(data, "gpu_resident", False) else getattr(data, "num_workers", 0)
        config = self.config[self.subcommand] if self.subcommand else self.config
        configure_threads(workers, ranks, config.get("threads"))

    def _check_data(self) -> None:
        """Find the data (and verify its masks) now, before the run directory gets files and
        the W&B run starts: a failed start leaves neither (Lightning repeats these calls later;
        the datasets are built once). Rank zero checks before launching the other ranks."""
        if os.environ.get("LOCAL_RANK") not in (None, "0"):
            return
        from lightning.pytorch.trainer.states import TrainerFn

        # the state Lightning's own setup call would see (it sets both again): checks that hold
        # only when fitting (e.g. a class with no training pixels) must see that they are
        self.datamodule.trainer = self.trainer
        self.trainer.state.fn = TrainerFn(self.subcommand)  # the stages are named as the commands
        self.datamodule.prepare_data()
        self.datamodule.setup(self.subcommand)
        check = getattr(self.model, "check_data", None)
        if check is not None:  # what the model cannot train or run on (SegmentationModel)
            check(self.datamodule, self.subcommand)

    def after_fit(self) -> None:
        checkpoint = self.trainer.checkpoint_callback
        score = getattr(checkpoint, "best_model_score", None)
        if score is not None:  # the best beside the last validation in W&B's runs table
            self._log_evaluation("best", {f"best/{checkpoint.monitor}": float(score)})
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer, self.command), file=sys.stderr)

    def after_test(self) -> None:
        self._log_evaluation("test")

    def after_predict(self) -> None:
        from seglight.callbacks import PredictionWriter

        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionWriter):
                self._log_evaluation("predict", callback.last_written)

    def _log_evaluation(self, stage: str, values: dict[str, Any] | None = None) -> None:
        """Put an evaluation's metrics into the W&B run's summary (the runs table's columns),
        beside the training's val/mIoU when the run was resumed."""
        from seglight.callbacks.wandb import _wandb_active

        values = dict(values or {})
        values.update(
            (k, float(v))
            for k, v in self.trainer.callback_metrics.items()
            if k.startswith(f"{stage}/") and v.numel() == 1
        )
        ckpt = self.config[self.subcommand].get("ckpt_path")
        if ckpt and self.subcommand != "fit":
            values[f"{stage}/ckpt_path"] = str(ckpt)
        for logger in self.trainer.loggers:
            if _wandb_active(logger) and self.trainer.is_global_zero:
                logger.experiment.summary.update(values)


#: W&B job type of each subcommand
JOB_TYPES = {"fit": "train", "validate": "validate", "test": "test", "predict": "predict"}


def test_command(command: list[str], ckpt: str) -> str:
    """`seglight test` with the options of the `fit` command `command` and `--ckpt_path ckpt`."""
    import shlex

    args, skip = [], False
    for arg in command[1:]:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        args.append(arg)
    return shlex.join(["seglight", "test", *args, "--ckpt_path", ckpt])


def _wandb_line(logger: Any) -> str | None:
    """Where a W&B logger's run is: its page, or the command that uploads an offline run."""
    from seglight.callbacks.wandb import _wandb_active

    if not _wandb_active(logger):
        return None
    run = logger.experiment
    if getattr(run, "offline", False):
        return f"offline; upload with `wandb sync {Path(run.dir).parent}`"
    return getattr(run, "url", None)


def fit_summary(trainer, command: list[str]) -> str:
    """The lines printed at the end of `fit`: the best value of the metric that chose the best
    checkpoint (val/mIoU; val/mask_mAP for instance models) and its epoch, that checkpoint,
    the run directory, and the command that tests it (`command`: the fit's, as typed)."""
    from seglight.callbacks.records import _read_summary

    run_dir = Path(trainer.default_root_dir)
    checkpoint = trainer.checkpoint_callback
    best_path = getattr(checkpoint, "best_model_path", "") or ""
    score = getattr(checkpoint, "best_model_score", None)
    monitor = getattr(checkpoint, "monitor", None) or "val/mIoU"
    epochs = trainer.current_epoch
    lines = [
        f"seglight: fit finished ({epochs} epoch{'' if epochs == 1 else 's'}, "
        f"{trainer.global_step} steps)"
    ]
    best_val = _read_summary(trainer).get("best_val") or {}
    if score is not None:
        epoch = best_val.get("epoch") if best_val.get("monitor", "val/mIoU") == monitor else None
        at = f" at epoch {epoch}" if epoch is not None else ""
        lines.append(f"  best {monitor}  {float(score):.4f}{at}")
    else:
        lines.append(f"  best {monitor}  - (no validation ran)")
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = best_path or (str(last) if last.is_file() else "")
    if ckpt:
        lines.append(f"  checkpoint     {ckpt}")
    lines.append(f"  run directory  {run_dir}  (config.yaml, metrics.json, checkpoints/)")
    for logger in trainer.loggers:
        line = _wandb_line(logger)
        if line:
            lines.append(f"  W&B run        {line}")
    if ckpt:
        lines.append(f"  test it        {test_command(command, ckpt)}")
    return "\n".join(lines)


def run(argv: list[str]) -> SeglightCLI:
    """Run LightningCLI on `argv` (a subcommand and its options); raises SeglightError on bad
    input."""
    from seglight.utils import silence_known_noise

    silence_known_noise()
    check_class_names(argv)
    command, argv = argv, network_options(with_defaults(argv))
    _CREATED_RUN_DIRS.clear()
    _CREATED_FOLDERS.clear()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            return SeglightCLI(args=argv, experiment=experiment_name(argv), command=command)
    except BaseException:
        # leave no empty version_N behind a failed start, nor an empty runs/<experiment>, nor
        # a runs/ it made
        folders = [f for d in _CREATED_RUN_DIRS for f in (d, d.parent)] + _CREATED_FOLDERS
        for folder in folders:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
