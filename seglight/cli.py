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
def _class_name(value: dict[str, Any]) -> str:
    return str(value["class_path"]).rsplit(".", 1)[-1]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved config as flat keys W&B (and `seglight compare`) can group and filter by:

    - a class: {"model": {"class_path": "x.UNet", "init_args": {"encoder": "r34"}}} ->
      {"model": "UNet", "model.encoder": "r34"};
    - a list of classes (callbacks): their names, "ModelCheckpoint, LearningRateMonitor", and
      each one's options, "trainer.callbacks.ModelCheckpoint.monitor" (".1", ".2" ... after the
      name of a class listed twice);
    - a mapping of names to numbers, such as a weighted loss {ce: 1.0, dice: 0.5}: one value in
      YAML flow style, "{ce: 1.0, dice: 0.5}", so that runs group by it whatever its form
      (`loss: ce` gives "ce" under the same key);
    - other mappings: one key per entry ("model.inference.mode"); lists of plain values stay lists.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "class_path" in value:
            flat[name] = _class_name(value)
            flat.update(flatten_config(value.get("init_args") or {}, f"{name}."))
        elif isinstance(value, dict) and value and all(map(_is_number, value.values())):
            flat[name] = yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
        elif isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            items = [
                _class_name(v) if isinstance(v, dict) and "class_path" in v else v for v in value
            ]
            flat[name] = ", ".join(str(v) for v in items)
            seen: dict[str, int] = {}
            for item, v in zip(items, value, strict=True):
                if isinstance(v, dict) and "class_path" in v:
                    seen[item] = seen.get(item, 0) + 1
                    label = item if seen[item] == 1 else f"{item}.{seen[item] - 1}"
                    flat.update(flatten_config(v.get("init_args") or {}, f"{name}.{label}."))
        else:
            flat[name] = value
    return flat


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves config.yaml in the run directory and logs the resolved config (flattened), the git
    revision, and the architecture and dataset as tags to every logger (W&B's run config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        flat = flatten_config(config)
        flat.update({f"git.{k}": v for k, v in git_revision().items()})
        tags = [type(pl_module).__name__]
        if trainer.datamodule is not None:
            tags.append(type(trainer.datamodule).__name__)
        for logger in trainer.loggers:
            logger.log_hyperparams(flat)
            if hasattr(logger, "add_tags"):
                logger.add_tags(tags)


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
        if (
            on_gpu
            and config.trainer.get("benchmark") is None
            and not config.trainer.get("deterministic")
        ):
            # fixed training crops: cuDNN picks its fastest kernels once per shape (set
            # trainer.benchmark: false when images change size often, e.g. full-size evaluation)
            config.trainer.benchmark = True
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
    """List every architecture (or those named) with its parameters for 11 classes beside the
    paper's figures; `--flops` adds GFLOPs at `--size` (default 360x480), `--markdown` prints a
    markdown table: `python -m seglight models [NAME ...] [--flops] [--size HxW] [--markdown]`."""
    import argparse

    from seglight.profile import model_cost, parse_size

    parser = argparse.ArgumentParser(
        prog="python -m seglight models", description=cmd_models.__doc__
    )
    parser.add_argument("names", nargs="*", help="architectures to list (default: all)")
    parser.add_argument("--flops", action="store_true", help="count GFLOPs (= 2 x GMACs)")
    parser.add_argument("--size", type=parse_size, default=(360, 480), help="HxW for --flops")
    parser.add_argument("--num-classes", type=int, default=11, help="classes (11, CamVid's)")
    parser.add_argument("--markdown", action="store_true", help="a markdown table for the README")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        raise ConfigError(f"unknown model(s) {unknown}. Known: {', '.join(sorted(MODELS))}")
    h, w = args.size
    header = ["model", "params", "paper params"]
    if args.flops:
        header += [f"GFLOPs {h}x{w}", "paper GFLOPs"]
    header.append("description")
    rows = []
    for name in args.names or sorted(MODELS):
        cls = MODELS[name]
        try:  # on the meta device when possible: no memory, no compute
            params, flops = model_cost(
                cls, (1, 3, h, w) if args.flops else None, num_classes=args.num_classes
            )
            ours = [f"{params / 1e6:.2f}M", f"{flops / 1e9:.1f}" if args.flops else ""]
        except Exception as e:  # noqa: BLE001 - show the row anyway
            ours = [f"error: {type(e).__name__}: {e}", ""]
        row = [name, ours[0], f"{cls.paper_params:g}M" if cls.paper_params else "-"]
        if args.flops:
            row += [ours[1], f"{cls.paper_gflops:g}" if cls.paper_gflops else "-"]
        # the docstring's first paragraph: some summaries wrap onto a second line
        summary = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        rows.append([*row, summary])
    title = f"seglight architectures ({args.num_classes} classes, default options)"
    if args.markdown:
        aligned = ["---", *["---:"] * (len(header) - 2), "---"]
        for line in (header, aligned, *rows):
            print("| " + " | ".join(c.replace("|", "/") for c in line) + " |")
        if args.flops:
            print(
                f"\nGFLOPs: one forward pass of a 1x3x{h}x{w} image, 2 FLOPs per multiply-"
                "accumulate, convolutions and matrix products only (torch.utils.flop_counter). "
                "Paper figures as printed, at each paper's own input size; papers often count "
                "multiply-adds (half of these FLOPs)."
            )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in header:
        table.add_column(col, justify="left" if col in ("model", "description") else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _layout(cls: type) -> list[str]:
    """The first indented block after a line mentioning "layout" in the dataset's module
    docstring (the file tree every dataset module documents)."""
    lines = (inspect.getdoc(sys.modules.get(cls.__module__)) or "").splitlines()
    start = next((i for i, line in enumerate(lines) if "layout" in line.lower()), None)
    if start is None:
        return []
    block: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("    "):
            block.append(line.rstrip())
        elif block and line.strip():
            break
    return block


def _default_root(name: str, cls: type) -> str:
    from seglight.data.base import dataset_root

    param = inspect.signature(cls.__init__).parameters.get("root")
    if param is None:
        return "(generated, no files)"
    if param.default is inspect.Parameter.empty:
        return "--data.root PATH (required)"
    try:
        return f"--data.root, default {cls().root}"
    except Exception:  # noqa: BLE001 - constructing may need files; fall back to the convention
        return f"--data.root, default {dataset_root(None, name.lower())}"


def cmd_datasets(argv: list[str]) -> None:
    """List every dataset (or those named in argv) with its classes and where it expects its
    files: `python -m seglight datasets [NAME ...]`."""
    from rich.console import Console

    unknown = [n for n in argv if n not in DATASETS]
    if unknown:
        raise ConfigError(f"unknown dataset(s) {unknown}. Known: {', '.join(sorted(DATASETS))}")
    console = Console(highlight=False, soft_wrap=True)  # long lines wrap in the terminal
    for name, cls in sorted(DATASETS.items()):
        if argv and name not in argv:
            continue
        if cls.class_names:
            classes = f"{len(cls.class_names)}: {', '.join(cls.class_names)}"
        else:
            classes = "set by the data (see its layout and options)"
        console.print(f"[bold]{name}[/bold]  {_first_doc_line(cls)}", markup=True)
        console.print(f"  classes  {classes}", markup=False)
        console.print(f"  root     {_default_root(name, cls)}", markup=False)
        layout = _layout(cls)
        if layout:
            console.print("  layout", markup=False)
            for line in layout:
                console.print(f"  {line}", markup=False)
        console.print()


COMMANDS = {
    "models": cmd_models,
    "datasets": cmd_datasets,
    "stats": lambda argv: importlib.import_module("seglight.stats").main(argv),
    "bench": lambda argv: importlib.import_module("seglight.bench").main(argv),
    "export": lambda argv: importlib.import_module("seglight.export").main(argv),
    "compare": lambda argv: importlib.import_module("seglight.compare").main(argv),
    "sweep": lambda argv: importlib.import_module("seglight.sweep").main(argv),
}


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


def find_cause(exc: BaseException | None, types: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of `types` in the chain behind `exc` (its causes and contexts)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, types):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def user_error(exc: BaseException | None) -> SeglightError | None:
    """The SeglightError behind `exc`, if any (jsonargparse re-raises errors from constructors as
    ValueErrors chained to the original)."""
    return find_cause(exc, SeglightError)


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
