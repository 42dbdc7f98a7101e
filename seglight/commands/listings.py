"""`seglight models` and `seglight datasets`: what is registered, with its options' sources
(parameter counts beside the papers', each dataset's classes, root and on-disk layout).

Each command imports only its own registry: `datasets` does not load the model zoo (timm and
every architecture), `models` does not load the datasets.
"""

from __future__ import annotations

import inspect
import sys

from seglight.errors import ConfigError
from seglight.utils import first_doc_line


def _paper_cost_cells(cls: type) -> list[str]:
    """[the paper's setting, our count there, the paper's figure] (units included), or dashes."""
    cost = cls.paper_cost
    if cost is None:
        return ["-", "-", "-"]
    try:
        ours = f"{cost.ours(cls):.2f} {cost.unit}"
    except Exception as e:  # noqa: BLE001 - show the row anyway
        ours = f"error: {type(e).__name__}: {e}"
    return [cost.setting(), ours, f"{cost.value:g} {cost.unit}"]


def cmd_models(argv: list[str]) -> None:
    """List every architecture (or those named) with its parameters for 11 classes beside the
    paper's figures; `--flops` adds GFLOPs at `--size` (default 360x480), `--markdown` prints a
    markdown table: `python -m seglight models [NAME ...] [--flops] [--size HxW] [--markdown]`."""
    import argparse

    import seglight.methods  # noqa: F401  (the training methods are listed with the models)
    from seglight.models import MODELS
    from seglight.profile import model_cost, parse_size

    parser = argparse.ArgumentParser(prog="seglight models", description=cmd_models.__doc__)
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
        header += [f"GFLOPs {h}x{w}", "paper's setting", "ours there", "paper"]
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
            row += [ours[1], *_paper_cost_cells(cls)]
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
                "Paper figures as printed, in the paper's unit (GMACs: multiply-adds, half of "
                "the FLOPs), beside our count at the paper's own setting (input size, classes, "
                "backbone) in the same unit."
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


def _wrapped(cls: type) -> bool:
    """Whether a DataModule wraps another one given as its `dataset` option (SemiSupervised):
    its classes, files and root are the wrapped dataset's."""
    from seglight.data.base import SegmentationDataModule

    hints = inspect.signature(cls.__init__).parameters
    hint = hints["dataset"].annotation if "dataset" in hints else None
    if isinstance(hint, str):  # postponed annotations (`from __future__ import annotations`)
        return hint.split("|")[0].strip() == SegmentationDataModule.__name__
    return isinstance(hint, type) and issubclass(hint, SegmentationDataModule)


def _default_root(name: str, cls: type) -> str:
    from seglight.data.base import dataset_root

    if _wrapped(cls):
        return "the wrapped dataset's (--data.dataset NAME; --data.root is passed on to it)"
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

    from seglight.data import DATASETS

    unknown = [n for n in argv if n not in DATASETS]
    if unknown:
        raise ConfigError(f"unknown dataset(s) {unknown}. Known: {', '.join(sorted(DATASETS))}")
    console = Console(highlight=False, soft_wrap=True)  # long lines wrap in the terminal
    for name, cls in sorted(DATASETS.items()):
        if argv and name not in argv:
            continue
        if _wrapped(cls):
            classes = "the wrapped dataset's (wraps any dataset above: --data.dataset NAME)"
        elif isinstance(cls.class_names, (list, tuple)) and cls.class_names:  # not a property
            classes = f"{len(cls.class_names)}: {', '.join(cls.class_names)}"
        else:
            classes = "set by the data (see its layout and options)"
        console.print(f"[bold]{name}[/bold]  {first_doc_line(cls)}", markup=True)
        console.print(f"  classes  {classes}", markup=False)
        console.print(f"  root     {_default_root(name, cls)}", markup=False)
        layout = _layout(cls)
        if layout:
            console.print("  layout", markup=False)
            for line in layout:
                console.print(f"  {line}", markup=False)
        console.print()
