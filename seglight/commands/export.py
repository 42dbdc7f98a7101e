"""Export a network for inference outside seglight: ONNX (ONNX Runtime, TensorRT, ...) or a
`torch.export` program (`.pt2`, for torch.export.load / AOTInductor).

    python -m seglight export --model UNet --option encoder=resnet18 unet.onnx
    python -m seglight export --ckpt runs/unet/version_0/checkpoints/last.ckpt --format torch out.pt2

Both go through `torch.export.export` (ONNX by torch's dynamo-based exporter, which needs
`onnxscript`). The exported graph takes images [B, C, H, W] float32 and returns the logits
[B, num_classes, H, W] of an eval-mode forward (batch-norm statistics frozen, no auxiliary heads).

With `dynamic=True` the batch, height and width are symbolic (`torch.export.Dim.AUTO`): an
architecture whose forward needs a fixed size (e.g. a pooling window computed from the input size)
has those axes fixed to the example's instead, and `export_model` warns which. The example batch is
at least 2, since torch.export would specialise a batch of 1.

Shape-dependent Python in a forward (`if x.shape == size`, as in the shortcuts of
seglight.nn.resize_to and pad_or_crop_to) becomes a guard: the torch.export program checks it and
refuses other inputs with "Guard failed", while the ONNX graph has no guards and silently keeps
the branch taken at the example size. Likewise torch.export specialises sizes 0 and 1, so a
program exported at 64x96 rejects inputs whose deepest feature map would be 1 pixel wide (for
a stride-32 encoder, H or W <= 32). tests/test_export.py checks every registered architecture at
a size other than the export's (`pytest -m slow tests/test_export.py`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from seglight.errors import ConfigError

Format = Literal["onnx", "torch"]
AXES = ("batch", "channels", "height", "width")
#: torch's exporter needs protobuf's 2 GB limit respected: larger models keep their weights in a
#: side file (PATH.data)
_ONNX_INLINE_LIMIT = 1_800_000_000


class LogitsOnly(nn.Module):
    """Wraps a network so that it always returns the logits tensor (never the training dict)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.net(image)
        return out["out"] if isinstance(out, dict) else out


def symbolic_axes(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the input axes that stayed symbolic in an exported program ("batch", ...)."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            shape = node.meta["val"].shape
            return [AXES[i] for i, d in enumerate(shape) if not isinstance(d, int)]
    return []


def to_exported_program(
    model: nn.Module, input_size: Sequence[int], dynamic: bool = True
) -> torch.export.ExportedProgram:
    """`torch.export.export` of the eval-mode logits of `model` for images of `input_size`.

    `model` is a SegmentationModel or a plain network; it is put in eval mode.
    """
    if len(input_size) != 4:
        raise ConfigError(f"input_size must be (B, C, H, W), got {tuple(input_size)}")
    net = getattr(model, "net", model)
    module = LogitsOnly(net).eval()
    b, c, h, w = input_size
    param = next(net.parameters(), None)
    example = torch.randn(
        max(b, 2) if dynamic else b, c, h, w, device=param.device if param is not None else "cpu"
    )
    auto = torch.export.Dim.AUTO
    shapes = ({0: auto, 2: auto, 3: auto},) if dynamic else None
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=shapes)


def export_model(
    model: nn.Module,
    path: str | Path,
    format: Format = "onnx",
    input_size: Sequence[int] = (1, 3, 360, 480),
    opset: int = 18,
    dynamic: bool = True,
) -> Path:
    """Export `model`'s eval-mode logits to `path` and return the path.

    Args:
        model: a SegmentationModel or a plain network (image -> logits).
        path: the output file (conventionally .onnx or .pt2).
        format: "onnx" or "torch" (`torch.export.save` of the ExportedProgram).
        input_size: (B, C, H, W) of the example input; the export's shape when not dynamic.
        opset: ONNX opset, >= 17. Default 18: torch's exporter implements 18 and up; for 17 it
            converts the model down with onnx's converter, which lacks some ops (Pad) and then
            leaves the model at 18.
        dynamic: symbolic batch, height and width where the architecture allows it.
    """
    if format not in ("onnx", "torch"):
        raise ConfigError(f"format must be 'onnx' or 'torch', got {format!r}")
    if opset < 17:
        raise ConfigError(f"opset must be >= 17, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = to_exported_program(model, input_size, dynamic)
    if dynamic:
        fixed = [a for a in ("batch", "height", "width") if a not in symbolic_axes(program)]
        if fixed:
            warnings.warn(
                f"{type(model).__name__}: input axes {', '.join(fixed)} could not stay dynamic "
                f"and are fixed to the example's {tuple(input_size)}",
                stacklevel=2,
            )
    if format == "torch":
        torch.export.save(program, path)
        return path
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    onnx_program = torch.onnx.export(
        program,
        f=None,
        opset_version=opset,
        input_names=["image"],
        output_names=["logits"],
        dynamo=True,
        verbose=False,
    )
    onnx_program.save(path, external_data=size > _ONNX_INLINE_LIMIT)
    return path


def _run_exported(path: Path, fmt: Format, x: torch.Tensor) -> torch.Tensor:
    """The exported graph's output for `x` (ONNX through ONNX Runtime)."""
    if fmt == "torch":
        with torch.no_grad():
            return torch.export.load(path).module()(x)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a refused size is an answer here, not an error to print
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _agrees(model: nn.Module, path: Path, fmt: Format, size: Sequence[int]) -> bool:
    """Whether the exported graph runs at `size` and gives the model's logits there (relative
    to their scale: untrained logits can be large)."""
    net = LogitsOnly(getattr(model, "net", model)).eval()
    x = torch.randn(*size, device=next(net.parameters()).device).cpu()
    try:
        out = _run_exported(path, fmt, x)
    except Exception:  # noqa: BLE001 - a guard or a shape error: the graph refuses this size
        return False
    with torch.no_grad():
        expected = net.to("cpu")(x)
    if out.shape != expected.shape:
        return False
    return float((out - expected).abs().max() / max(1.0, float(expected.abs().max()))) < 1e-4


def check_sizes(model: nn.Module, path: str | Path, fmt: Format, input_size: Sequence[int]) -> str:
    """Which inputs the exported graph at `path` serves, checked by running it: at a second,
    odd size (another batch, height and width) against the model's own output, and when that
    fails, at sizes rounded up to multiples of 8, 16, 32 or 64. Torch's ONNX exporter drops
    torch.export's shape guards, so an ONNX graph that froze a size-dependent branch runs at
    other sizes but computes something else: only running it tells.

    Returns a description, e.g. "dynamic B, H, W (checked at 2x3x77x101)"."""
    path = Path(path)
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "sizes other than the example's not checked (pip install onnxruntime)"
    b, c, h, w = input_size
    odd = (b + 1, c, h // 2 * 2 + 13, w // 2 * 2 + 21)  # odd height and width, larger
    shown = "x".join(map(str, odd))
    if _agrees(model, path, fmt, odd):
        return f"dynamic B, H, W (checked at {shown})"
    for multiple in (8, 16, 32, 64):
        size = (odd[0], c, -(-odd[2] // multiple) * multiple, -(-odd[3] // multiple) * multiple)
        if _agrees(model, path, fmt, size):
            return (
                f"dynamic B and H, W multiples of {multiple} (checked at "
                f"{'x'.join(map(str, size))}; wrong or refused at {shown})"
            )
    if _agrees(model, path, fmt, (odd[0], c, h, w)):
        return f"dynamic B, fixed H x W = {h} x {w} (other sizes wrong or refused, e.g. {shown})"
    return f"fixed input {b}x{c}x{h}x{w} (other sizes wrong or refused, e.g. {shown})"


def load_checkpoint(path: str | Path, model: str | None = None) -> nn.Module:
    """A SegmentationModel from a Lightning checkpoint written by seglight.

    The class is `model` (a registered name) or the `_class_path` that LightningCLI records in the
    checkpoint's hyper-parameters. Pretrained encoder weights are not fetched again (the
    checkpoint holds the trained ones).
    """
    import seglight.methods  # noqa: F401  (a method's checkpoint exports its network)
    from seglight.checkpoints import check_state_dict
    from seglight.checkpoints import load_checkpoint as load_checkpoint_file
    from seglight.models import MODELS

    checkpoint = load_checkpoint_file(path, "--ckpt")
    hparams, state_dict = checkpoint.get("hyper_parameters"), checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state_dict, dict):
        raise ConfigError(
            f"--ckpt {str(path)!r} is not a seglight checkpoint (it has no hyper_parameters "
            "and state_dict)"
        )
    name = model or str(hparams.get("_class_path", "")).rsplit(".", 1)[-1]
    if name not in MODELS:
        raise ConfigError(
            f"--ckpt {str(path)!r}: cannot tell the architecture ({name or 'not recorded'}); "
            f"pass --model, one of {', '.join(sorted(MODELS))}"
        )
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if kwargs.get("encoder_weights") is not None:
        kwargs["encoder_weights"] = None
    kwargs.pop("ema_decay", None)  # no average to keep: an EMA run exports its averaged weights
    net = MODELS[name](**kwargs)
    # a run with compile: true saved the compiled wrapper's names
    state_dict = {k.replace("._orig_mod.", "."): v for k, v in state_dict.items()}
    net._match_ema_state(state_dict)
    check_state_dict(net, state_dict, f"--ckpt {str(path)!r}")
    net.load_state_dict(state_dict)
    return net


def main(argv: list[str]) -> None:
    """`python -m seglight export (--model NAME | --ckpt PATH) [options] OUT`."""
    import argparse

    import yaml

    from seglight.models import MODELS
    from seglight.profile import count_parameters, parse_size

    parser = argparse.ArgumentParser(
        prog="seglight export",
        description="Export a model's logits to ONNX or a torch.export program (.pt2).",
    )
    parser.add_argument("out", type=Path, help="output file (.onnx or .pt2)")
    parser.add_argument("--model", help=f"architecture: {', '.join(sorted(MODELS))}")
    parser.add_argument("--ckpt", help="a seglight checkpoint (its architecture and weights)")
    parser.add_argument("--format", choices=["onnx", "torch"], help="default: from OUT's suffix")
    parser.add_argument("--size", type=parse_size, default=(360, 480), help="HxW (360x480)")
    parser.add_argument("--batch", type=int, default=1, help="batch size when --static")
    parser.add_argument("--num-classes", type=int, default=11, help="without --ckpt (11)")
    parser.add_argument("--in-channels", type=int, default=3, help="without --ckpt (3)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option without --ckpt, e.g. --option encoder=resnet18 (repeatable)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (18)")
    parser.add_argument("--static", action="store_true", help="fixed batch, height and width")
    args = parser.parse_args(argv)

    if args.ckpt:
        model = load_checkpoint(args.ckpt, args.model)
    elif args.model:
        if args.model not in MODELS:
            raise ConfigError(f"unknown model {args.model!r}; one of {', '.join(sorted(MODELS))}")
        options = {}
        for item in args.option:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
            options[key] = yaml.safe_load(value)
        model = MODELS[args.model](
            num_classes=args.num_classes, in_channels=args.in_channels, **options
        )
    else:
        raise ConfigError("export: pass --model NAME or --ckpt PATH")
    fmt = args.format or ("torch" if args.out.suffix in (".pt2", ".pt") else "onnx")
    size = (args.batch, getattr(model, "in_channels", args.in_channels), *args.size)
    path = export_model(model, args.out, fmt, size, opset=args.opset, dynamic=not args.static)
    shapes = f"fixed input {'x'.join(map(str, size))}" if args.static else None
    print(
        f"exported {type(model).__name__} ({count_parameters(model) / 1e6:.2f}M parameters) to "
        f"{path} ({fmt}; input image [B, {size[1]}, H, W] float32, output logits "
        f"[B, {getattr(model, 'num_classes', '?')}, H, W]; "
        f"{shapes or check_sizes(model, path, fmt, size)})"
    )
