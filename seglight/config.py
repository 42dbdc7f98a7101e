"""Config files and flat config keys, shared by the CLI, `seglight compare`, `stats` and `sweep`:

- `defaults.yaml` next to the first --config file (and one in the folder above it) is applied
  first, so experiment files are short deltas over it (`with_defaults`);
- the experiment's name is the stem of the last --config (`experiment_name`: runs/<name>/...);
- unknown `model:` / `data:` classes fail early with suggestions (`check_class_names`);
- the resolved config as flat keys that W&B and `compare` group by (`flatten_config`), without
  the keys that cannot matter to a comparison (`logged_config`).
"""

from __future__ import annotations

import difflib
import importlib
import re
from pathlib import Path
from typing import Any

import yaml

from seglight.errors import ConfigError

DEFAULTS_FILE = "defaults.yaml"


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


#: flat config keys (and their sub-keys) that say where a run's files go and how the console
#: and the loggers show it, none of which changes the result: not logged to W&B, not compared
NOT_COMPARED = (
    "config",
    "ckpt_path",
    "weights_only",
    "trainer.default_root_dir",
    "trainer.logger",  # the W&B run's name, group, job type and tags are its own fields
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.enable_autolog_hparams",
    "trainer.log_every_n_steps",
    "trainer.model_registry",
    "trainer.callbacks.ModelCheckpoint.dirpath",
    "trainer.callbacks.ModelCheckpoint.filename",
    "trainer.callbacks.ModelCheckpoint.verbose",
    "trainer.callbacks.ModelCheckpoint.auto_insert_metric_name",
    "trainer.callbacks.ModelCheckpoint.enable_version_counter",
    "trainer.callbacks.ModelCheckpoint.save_on_exception",
    # which checkpoints are kept and when they are written (monitor and mode, which choose the
    # best one, stay)
    "trainer.callbacks.ModelCheckpoint.save_last",
    "trainer.callbacks.ModelCheckpoint.save_top_k",
    "trainer.callbacks.ModelCheckpoint.save_weights_only",
    "trainer.callbacks.ModelCheckpoint.every_n_train_steps",
    "trainer.callbacks.ModelCheckpoint.train_time_interval",
    "trainer.callbacks.ModelCheckpoint.every_n_epochs",
    "trainer.callbacks.ModelCheckpoint.save_on_train_epoch_end",
    "trainer.enable_checkpointing",
    # predict's options, profiling and debugging aids, the loader's processes and memory
    "trainer.limit_predict_batches",
    "trainer.profiler",
    "trainer.detect_anomaly",
    "trainer.barebones",
    "trainer.inference_mode",
    "data.num_workers",
    "data.pin_memory",
    "data.check_masks",
    "data.predict_split",
)
#: the options of callbacks that only display or log (progress bars, model summaries, W&B media)
_DISPLAY_CALLBACK = re.compile(
    r"trainer\.callbacks\.(\w*ProgressBar|\w*ModelSummary|LearningRateMonitor|LogPredictions"
    r"|LogPerClassMetrics)(\.\d+)?\."
)


def is_compared(key: str) -> bool:
    """Whether a flat config key can matter to a comparison of runs (see NOT_COMPARED)."""
    if _DISPLAY_CALLBACK.match(key):
        return False
    return not any(key == k or key.startswith(k + ".") for k in NOT_COMPARED)


def logged_config(flat: dict[str, Any]) -> dict[str, Any]:
    """The flat config without the keys that cannot matter to a comparison (W&B's run config);
    the list of callbacks without those that only display or log."""
    logged = {k: v for k, v in flat.items() if is_compared(k)}
    callbacks = logged.get("trainer.callbacks")
    if isinstance(callbacks, str):
        kept = [
            c
            for c in callbacks.split(", ")
            if not _DISPLAY_CALLBACK.match(f"trainer.callbacks.{c}.")
        ]
        logged["trainer.callbacks"] = ", ".join(kept)
    return logged


#: data options that cannot change an evaluation of a checkpoint (where the files are, how they
#: are loaded, the training's augmentation)
NOT_EVALUATED = (
    "root", "download", "num_workers", "batch_size", "val_batch_size", "unlabeled_batch_size",
    "pin_memory", "check_masks", "gpu_resident", "crop_size", "scale_range", "hflip",
    "color_jitter", "allow_empty_classes", "predict_split", "labeled", "labeled_split", "seed",
)  # fmt: skip


def evaluation_differences(trained: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple]:
    """{flat key: (trained value, value now)} of the `data` options of two configs that change an
    evaluation (an image_scale, a mask format, ...); options only one of them has (another
    dataset's) are left out."""
    before = flatten_config({"data": trained.get("data") or {}})
    after = flatten_config({"data": now.get("data") or {}})
    return {
        k: (before[k], after[k])
        for k in before
        if k in after
        and k != "data"
        and k.rsplit(".", 1)[-1] not in NOT_EVALUATED
        and _comparable(before[k]) != _comparable(after[k])
    }


def _comparable(value: Any) -> Any:
    """Lists and tuples alike, ints and floats alike (YAML's [1, 2] is the parser's (1, 2))."""
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return float(value) if _is_number(value) else value


def config_paths(argv: list[str]) -> list[tuple[int, str]]:
    found = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            found.append((i, argv[i + 1]))
        elif arg.startswith("--config="):
            found.append((i, arg.split("=", 1)[1]))
    return found


def with_defaults(argv: list[str]) -> list[str]:
    """Insert `--config .../defaults.yaml` before the first --config for each defaults file in
    that config's parent folder and in its own folder, in that order (experiments/semi/x.yaml
    gets experiments/defaults.yaml, then experiments/semi/defaults.yaml)."""
    configs = config_paths(argv)
    if not configs:
        return argv
    index, first = configs[0]
    folder = Path(first).parent
    given = {Path(p).resolve() for _, p in configs if Path(p).exists()}
    inserted: list[str] = []
    for defaults in (folder.parent / DEFAULTS_FILE, folder / DEFAULTS_FILE):
        if defaults.is_file() and defaults.resolve() not in given:
            given.add(defaults.resolve())
            inserted += ["--config", str(defaults)]
    return [*argv[:index], *inserted, *argv[index:]]


def experiment_name(argv: list[str]) -> str | None:
    """The stem of the last --config that is not a defaults file (runs/<name>/...)."""
    names = [Path(p).stem for _, p in config_paths(argv) if Path(p).name != DEFAULTS_FILE]
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


def _network_name(network: Any) -> str | None:
    """The architecture named by a `network:` value (a name or {class_path, init_args})."""
    if isinstance(network, dict):
        network = network.get("class_path")
    return network if isinstance(network, str) else None


def _check_network(init_args: Any, where: str) -> None:
    """A method's `network:` must name a registered architecture (short name or dotted path)."""
    network = init_args.get("network") if isinstance(init_args, dict) else None
    name = _network_name(network)
    if name is not None and not name.startswith("{"):
        import seglight.methods  # noqa: F401  (the methods register in MODELS too)
        from seglight.models import MODELS  # a method or Mask2Former: build_network says why

        short = name.rsplit(".", 1)[-1]
        if short not in MODELS or ("." in name and not _class_ok(name, {})):
            from seglight.methods.base import unknown_architecture

            raise unknown_architecture(name, where)


def resolve_network_names(data: Any) -> Any:
    """`network: {class_path: LinkNet, ...}` -> the class's import path, in place, anywhere in
    loaded config data. jsonargparse imports every nested `class_path` it merges (it cannot know
    seglight's registry), so the short form a method's `network:` takes, like `model:`, would
    fail there; unknown names are left for check_class_names and build_network to report."""
    if isinstance(data, dict):
        for key, value in data.items():
            name = _network_name(value) if key == "network" else None
            if isinstance(value, dict) and name is not None and "." not in name:
                from seglight.models import MODELS

                cls = MODELS.get(name)
                if cls is not None:
                    value["class_path"] = f"{cls.__module__}.{cls.__qualname__}"
            resolve_network_names(value)
    elif isinstance(data, list):
        for value in data:
            resolve_network_names(value)
    return data


def network_options(argv: list[str]) -> list[str]:
    """`--model.network NAME [--model.network.init_args.KEY VALUE ...]` (NAME short or dotted, or
    a {class_path, init_args} mapping) -> one `--model.network {class_path, init_args}` option
    with the class's import path (see resolve_network_names): jsonargparse treats a method's
    `network` as a plain mapping, so it neither resolves short names nor takes nested options."""
    out: list[str] = []
    network: dict[str, Any] | None = None
    at = -1
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in ("--model.network", "--model.init_args.network") or key.startswith(
            ("--model.network.init_args.", "--model.init_args.network.init_args.")
        ):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            i += 1
            if key.endswith(".network"):
                loaded = yaml.safe_load(value) if value.strip().startswith("{") else value
                network = loaded if isinstance(loaded, dict) else {"class_path": loaded}
                network.setdefault("init_args", {})
                at = len(out)
                out.append("")  # the option goes here, written when complete
            elif network is None:
                raise ConfigError(
                    f"{key}: give the architecture first, --model.network NAME {key} {value}, "
                    f"or --model.network '{{class_path: NAME, init_args: {{...}}}}'"
                )
            else:
                loaded = yaml.safe_load(value) if value else value
                network["init_args"][key.rsplit(".", 1)[-1]] = loaded
            continue
        out.append(arg)
        i += 1
    if network is not None:
        spec = network["class_path"]  # `network: NAME`, the string form, as it was given
        if network["init_args"]:
            spec = resolve_network_names({"network": network})["network"]
        out[at : at + 1] = [
            "--model.network",
            yaml.safe_dump(spec, default_flow_style=True, width=10**6).strip()
            if isinstance(spec, dict)
            else spec,
        ]
    return out


def check_class_names(argv: list[str]) -> None:
    """Fail early, with suggestions, on an unknown `model:` / `data:` class or a missing config file."""
    values: list[tuple[str, str, str]] = []  # (group, name, where)
    for _, path in config_paths(argv):
        if not Path(path).is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            content = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: invalid YAML: {e}") from e
        for group in ("model", "data"):
            value = content.get(group) if isinstance(content, dict) else None
            if isinstance(value, dict):
                _check_network(value.get("init_args"), path)
                value = value.get("class_path")
            if isinstance(value, str):
                values.append((group, value, path))
    for i, arg in enumerate(argv):
        if arg.startswith("--model.network") and not arg.startswith("--model.network."):
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1] if i + 1 < len(argv) else ""
            if value.startswith("{"):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    value = None
            _check_network({"network": value}, "the command line")
        for group in ("model", "data"):
            if arg == f"--{group}" and i + 1 < len(argv):
                values.append((group, argv[i + 1], "the command line"))
            elif arg.startswith(f"--{group}="):
                values.append((group, arg.split("=", 1)[1], "the command line"))
    if not values:
        return
    import seglight.methods  # noqa: F401  (the training methods register in MODELS)
    from seglight.data import DATASETS  # the registries: imported only when there is a name
    from seglight.models import MODELS

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
