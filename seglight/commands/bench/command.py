"""`seglight bench`'s options and its runs: a model (training and inference against the peers,
then the data paths), `--losses`, or `--loader`."""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from seglight.commands.bench.data import bench_data, bench_loader
from seglight.commands.bench.inference import bench_inference
from seglight.commands.bench.losses import bench_losses
from seglight.commands.bench.measure import CLOCKS, use_clock
from seglight.commands.bench.peers import (
    PRECISIONS,
    TORCHVISION_PEERS,
    Peer,
    Runner,
    build_peers,
    cpu_precision_notes,
    random_batches,
    raw_variants,
    variant_label,
)
from seglight.commands.bench.report import (
    print_loader_report,
    print_loss_report,
    print_report,
    summarise,
    variant_rows,
)
from seglight.commands.bench.training import bench_training
from seglight.errors import ConfigError
from seglight.threads import configure_threads


def _resolve(spec: Any, registry: dict[str, type], group: str) -> tuple[type, dict]:
    """(class, init_args) from a short name, a class_path or {class_path, init_args}."""
    if isinstance(spec, dict):
        name, kwargs = spec.get("class_path"), dict(spec.get("init_args") or {})
    else:
        name, kwargs = spec, {}
    if not isinstance(name, str):
        raise ConfigError(f"--{group}: expected a class name, got {spec!r}")
    cls = registry.get(name) or registry.get(name.rsplit(".", 1)[-1])
    if cls is None:
        raise ConfigError(f"--{group}: unknown {name!r} (known: {', '.join(sorted(registry))})")
    return cls, kwargs


def _set_dotted(target: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, dict]]:
    """The bench's options, and the --model.X / --data.X overrides as {group: {X: value}}."""
    parser = argparse.ArgumentParser(
        prog="seglight bench",
        description="Training and inference speed and peak memory of a seglight architecture "
        "next to the same network in a raw PyTorch loop, smp and torchvision, interleaved in one "
        "process; and a dataset's loader throughput. Options of the model: --model.OPTION VALUE; "
        "of the data: --data.OPTION VALUE.",
    )
    add = parser.add_argument
    add("--config", help="a YAML file with model: and data: sections (e.g. experiments/unet.yaml)")
    add("--model", help="architecture (see python -m seglight models)")
    add("--data", help="dataset whose training loader to measure (e.g. CamVid)")
    add("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"), help="input size")
    add("--batch-size", type=int, help="batch size of the model runs (default: --data.batch_size, "
        "as fit spells it, else 2)")  # fmt: skip
    add("--num-classes", type=int, help="default: the data's, else 11")
    add("--precision", help="comma-separated, of " + ", ".join(PRECISIONS) + " (default: bf16-mixed "
        "on a GPU, else 32); with several, seglight runs at the first and the raw loop at each")  # fmt: skip
    add("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda, cuda:N")
    add("--rounds", type=int, default=10, help="timed rounds per peer (10: a 95%% CI of the "
        "median ratio from the 2nd to the 9th round)")  # fmt: skip
    add("--steps", type=int, default=3, help="steps per round")
    add("--warmup", type=int, default=2, help="untimed steps of each peer first")
    add("--peers", default="auto", help="comma-separated: raw, smp, torchvision, none "
        "(auto: raw, smp, and torchvision for the DeepLab and FCN families)")  # fmt: skip
    add("--skip", default="", help="comma-separated parts to skip: train, infer, data")
    add("--data-rounds", type=int, default=3, help="epochs timed per data path")
    add("--data-batches", type=int, help="batches per data round (default: the whole epoch; "
        "with --loader: 20)")  # fmt: skip
    add("--loader", metavar="WORKERS", help="without a model: the training loader's per-sample "
        "costs (decode, transform) and its images/s with these worker counts, e.g. 0,1,2")  # fmt: skip
    add("--loader-samples", type=int, default=200, help="samples timed one by one for --loader")
    add("--compile", nargs="?", const="true", default="false", help="torch.compile every network "
        "(--compile, or --compile true); --compile false,true: the raw loop both ways")  # fmt: skip
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="channels_last memory format for every network (on CUDA)")  # fmt: skip
    add("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
        help="torch.backends.cudnn.benchmark (autotuned convolutions for the fixed size)")  # fmt: skip
    add("--threads", type=int, help="torch CPU threads (default: the usable cores, "
        "seglight.threads; use 1 on a shared machine)")  # fmt: skip
    add("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or the process's CPU "
        "time (with --threads 1 on a shared CPU: the work each step does, not the waiting)")  # fmt: skip
    add("--memory", action=argparse.BooleanOptionalAction, default=True,
        help="a memory pass of each peer after the timed rounds")  # fmt: skip
    add("--profile", action="store_true", help="a profiled training pass of each peer after the "
        "timed rounds: where each one's step goes (top operators, Lightning's hooks, the plain "
        "loops' phases), side by side")  # fmt: skip
    add("--losses", help="comma-separated loss names (seglight.losses: ce, dice, focal, lovasz, "
        "ohem, ...): time forward+backward of each")  # fmt: skip
    add("--loss-sizes", default="256,512,1024", help="square sizes for --losses")
    add("--json", help="also write the results to this JSON file")
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, dict] = {"model": {}, "data": {}}
    i = 0
    while i < len(rest):
        arg = rest[i]
        group = arg[2:].split(".", 1)[0] if arg.startswith("--") and "." in arg else None
        if group not in overrides:
            raise ConfigError(
                f"bench: unknown argument {arg!r} (see python -m seglight bench --help)"
            )
        key = arg[len(group) + 3 :]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(rest):
            i += 1
            value = rest[i]
        else:
            raise ConfigError(f"bench: {arg} needs a value")
        _set_dotted(overrides[group], key, yaml.safe_load(value))
        i += 1
    if args.batch_size is None:  # `--data.batch_size 8` as for fit: the model runs' batch too
        args.batch_size = int(overrides["data"].get("batch_size") or 2)
    return args, overrides


def run(argv: list[str]) -> dict:
    """Run the bench for command-line arguments `argv`; prints the tables, returns the results.
    Lightning's info lines and warnings are quieted for the bench only: the process's logging
    and warning filters are as before afterwards (a notebook or test that benches goes on)."""
    from seglight.utils import silence_known_noise

    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    with warnings.catch_warnings():
        silence_known_noise()  # Lightning's litlogger tip on each Trainer, as in fit
        warnings.filterwarnings("ignore", module="lightning")
        lightning_log.setLevel(logging.WARNING)
        try:
            return _run(argv)
        finally:
            lightning_log.setLevel(level)


def _run(argv: list[str]) -> dict:
    from seglight.data.base import DATASETS
    from seglight.models.base import MODELS
    from seglight.profile import count_flops

    args, overrides = parse_args(argv)
    config: dict = {}
    if args.config:
        if not Path(args.config).is_file():
            raise ConfigError(f"--config {args.config}: no such file")
        config = yaml.safe_load(Path(args.config).read_text()) or {}
    if args.losses and not (args.model or config.get("model")):
        return _run_losses(args, argv)
    if args.loader:
        return _run_loader(args, argv, config, overrides["data"])
    if not (args.model or config.get("model")):
        raise ConfigError(
            "bench: give --model NAME (or a --config file with a model: section) or --losses"
        )
    model_cls, model_kwargs = _resolve(args.model or config["model"], MODELS, "model")
    model_kwargs.update(overrides["model"])
    shown_options = dict(model_kwargs)
    skip = {s for s in args.skip.split(",") if s}
    datamodule = None
    if (args.data or config.get("data")) and "data" not in skip:
        data_cls, data_kwargs = _resolve(args.data or config["data"], DATASETS, "data")
        datamodule = data_cls(**{**data_kwargs, **overrides["data"]})

    device = _device(args.device)
    precisions = _choices(args.precision or ("bf16-mixed" if device.type == "cuda" else "32"),
                          "--precision", list(PRECISIONS))  # fmt: skip
    if "16-mixed" in precisions and device.type != "cuda":
        raise ConfigError("--precision 16-mixed needs a CUDA GPU; use bf16-mixed or 32 on the CPU")
    compiles = [c == "true" for c in _choices(args.compile, "--compile", ["false", "true"])]
    precision, compiled = precisions[0], compiles[0]
    variants = [(p, c) for p in precisions for c in compiles]
    wanted = {"raw", "smp", "torchvision"} if args.peers == "auto" else set(args.peers.split(","))
    if wanted - {"raw", "smp", "torchvision", "none"}:
        raise ConfigError(
            f"--peers: unknown {sorted(wanted - {'raw', 'smp', 'torchvision', 'none'})}"
        )
    if args.peers == "auto" and model_cls.__name__ not in TORCHVISION_PEERS:
        wanted.discard("torchvision")
    if {"train", "infer"} <= skip:
        wanted = set()
    model_kwargs.update(channels_last=args.channels_last, compile=compiled)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    num_classes = args.num_classes or (datamodule.num_classes if datamodule is not None else 11)
    in_channels = datamodule.in_channels if datamodule is not None else 3
    runners = {
        p: Runner(device, p, args.channels_last, args.warmup + args.rounds * args.steps + 1)
        for p in precisions
    }
    runner = runners[precision]
    configure_threads(0, requested=args.threads, watch=False)
    use_clock(args.clock)

    model, peers, notes = build_peers(
        runner, model_cls, model_kwargs, num_classes, in_channels, wanted, compiled,
        variant_label(precision, compiled) if len(variants) > 1 else "",
    )  # fmt: skip
    if len(variants) > 1 and "raw" in wanted:  # the raw loop at the other variants, after it
        others = [(runners[p], c) for p, c in variants[1:]]
        peers[1:1] = raw_variants(others, model_cls, model_kwargs, num_classes, in_channels)
    notes += cpu_precision_notes(device, precisions)
    batches = random_batches(2, args.batch_size, in_channels, args.size, num_classes, runner)
    own = Peer(f"seglight {model_cls.__name__}", model.net, model.forward)
    for peer in [own, *peers]:
        peer.gflops = count_flops(peer.module.to(device), (1, in_channels, *args.size)) / 1e9
    if "train" not in skip:
        trained = bench_training(
            model,
            peers,
            batches,
            runner,
            args.rounds,
            args.steps,
            args.warmup,
            args.cudnn_benchmark,
            args.memory,
            args.profile,
        )
        own.train, own.profile = trained.train, trained.profile
    if "infer" not in skip:
        model.to(device)  # Trainer.fit hands the model back on the CPU
        own.predict = lambda image: model.predict_step({"image": image}, 0)["pred"]
        images = batches[0]["image"]
        bench_inference(
            [own, *peers], images, device, args.rounds, args.steps, args.warmup, args.memory
        )
    results: dict[str, Any] = summarise(own, peers, args.batch_size, args.steps, device)
    results["notes"] = notes
    if len(variants) > 1 and "raw" in wanted:
        results["variants"] = variant_rows(peers[: len(variants)], args.batch_size, args.steps)
    if own.profile is not None:
        results["profile"] = {p.name: p.profile for p in [own, *peers] if p.profile is not None}
    results["setup"] = {
        "model": model_cls.__name__,
        "model_options": shown_options,
        "size": list(args.size),
        "batch_size": args.batch_size,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "precision": precision,
        "compile": compiled,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "clock": args.clock,
        "command": "python -m seglight bench " + " ".join(argv),
    }
    if datamodule is not None:
        results["data_name"] = type(datamodule).__name__
        results["data"] = bench_data(datamodule, device, args.data_rounds, args.data_batches)
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _choices(value: str, option: str, known: list[str]) -> list[str]:
    """A comma-separated list of values of `option`, each one of `known`."""
    values = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in values if v not in known]
    if bad or not values:
        raise ConfigError(f"{option}: expected one or more of {', '.join(known)}, got {value!r}")
    return values


def _ints(value: str, option: str, expected: str) -> list[int]:
    """A comma-separated list of integers, or a ConfigError naming the option."""
    try:
        return [int(v) for v in value.split(",") if v]
    except ValueError:
        raise ConfigError(f"{option}: expected {expected}, got {value!r}") from None


def _run_losses(args: argparse.Namespace, argv: list[str]) -> dict:
    """`bench --losses ...` without a model: the loss table only."""
    from seglight.losses import LOSSES

    names = [n for n in args.losses.split(",") if n]
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise ConfigError(f"--losses: unknown {unknown} (known: {', '.join(LOSSES)})")
    sizes = _ints(args.loss_sizes, "--loss-sizes", "sizes like 256,512")
    device = _device(args.device)
    threads = configure_threads(0, requested=args.threads, watch=False)
    use_clock(args.clock)
    num_classes = args.num_classes or 11
    rows = bench_losses(
        names, sizes, args.batch_size, num_classes, device, args.rounds, args.steps, args.warmup
    )
    print_loss_report(
        rows,
        f"{args.batch_size}x{num_classes}xSxS, {device.type}, {threads} "
        f"thread(s), median of {args.rounds} rounds x {args.steps}",
    )
    results = {"losses": rows, "command": "python -m seglight bench " + " ".join(argv)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def _run_loader(args: argparse.Namespace, argv: list[str], config: dict, overrides: dict) -> dict:
    """`bench --loader 0,1,2 --data NAME ...` (or a --config's data: section): the loader only."""
    from seglight.data.base import DATASETS

    if not (args.data or config.get("data")):
        raise ConfigError(
            "bench --loader: give --data NAME (or a --config file with a data: section)"
        )
    workers = _ints(args.loader, "--loader", "worker counts like 0,1,2")
    data_cls, data_kwargs = _resolve(args.data or config["data"], DATASETS, "data")
    datamodule = data_cls(**{**data_kwargs, **overrides})
    threads = configure_threads(0, requested=args.threads, watch=False)
    use_clock(args.clock)
    results = bench_loader(
        datamodule, workers, None, args.loader_samples, args.data_rounds, args.data_batches or 20
    )
    crop = "x".join(map(str, datamodule.crop_size)) if datamodule.crop_size else "full images"
    scale = getattr(datamodule, "scale_range", None)
    title = (
        f"{data_cls.__name__} train, crop {crop}, scale {scale}, batch {datamodule.batch_size}; "
        f"{args.clock} clock, {threads} torch thread(s)"
    )
    print_loader_report(results, title)
    results["setup"] = {"title": title, "command": "python -m seglight bench " + " ".join(argv)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str]) -> None:
    """Entry point of `python -m seglight bench` (seglight.cli.COMMANDS)."""
    run(argv)
