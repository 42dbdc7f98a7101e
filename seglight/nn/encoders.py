"""timm backbones as feature pyramids, and the loading of their pretrained weights.

`encoder_weights` (the YAML option of every architecture with a backbone) is one of:
- ``None`` / ``"none"``: random initialisation (train from scratch);
- ``"imagenet"``: timm's default pretrained weights for that encoder, read from the local
  Hugging Face cache, downloaded when the hub is reachable, and otherwise a clear error;
- a path to a weights file (``.pth``, ``.pt``, ``.bin`` or ``.safetensors``) holding the state dict
  of the full timm model (classifier included or not), as saved by ``torch.save(m.state_dict())``;
- an ``http(s)://`` URL of such a file, downloaded once into ``~/.cache/seglight/weights``.

A file is checked against the architecture before it is loaded: a missing, unexpected or
mis-shaped tensor is an error that names the file, rather than a silently half-loaded encoder.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from seglight.errors import ConfigError, SeglightError


class EncoderWeightsError(SeglightError, RuntimeError):
    """Pretrained weights could not be found, fetched, or do not fit the encoder."""


# timm families whose models need options or input sizes beyond a CNN's (keyed by timm module):
# ViTs take any size only with `dynamic_img_size` (position embeddings interpolated per input) and
# a multiple of the patch size; Swin needs `strict_img_size=False`; HRNet's fuse layers upsample
# by exact factors (so its input must divide by 32); PVTv2's spatial-reduction convs need each
# stage to be at least as large as their kernel (8 at stride 4: inputs of >= 32 that divide by 32)
_SIZE_OPTIONS: dict[str, dict] = {
    "vision_transformer": {"dynamic_img_size": True},
    "vision_transformer_hybrid": {"dynamic_img_size": True},
    "deit": {"dynamic_img_size": True},
    "eva": {"dynamic_img_size": True},
    "swin_transformer": {"strict_img_size": False},
}
_MULTIPLE_OF_STRIDE = ("swin_transformer", "hrnet", "pvt_v2")


def _timm_family(name: str) -> str:
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _cache_dir() -> Path:
    return Path(os.environ.get("SEGLIGHT_CACHE", Path.home() / ".cache" / "seglight"))


class TimmEncoder(nn.Module):
    """Any timm model as a list of feature maps, shallow to deep.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``resnet34``.
        weights: see the module docstring.
        in_channels: input channels; pretrained stems are adapted by timm when not 3.
        output_stride: 32 (plain), 16 or 8: the last stages use dilation instead of striding.
        out_indices: which feature levels to return (timm's default: all of them; for a plain
            ViT, the blocks).
        timm_options: more options of the timm model (e.g. ``drop_path_rate``, ``mlp_ratios``);
            ``final_norm: true`` applies a ViT's final norm to every returned block.

    Attributes:
        channels: channels of each returned feature map.
        reductions: the stride of each feature map relative to the input.
        input_multiple: the input's height and width must divide by this (1: any size): a ViT's
            patch size, 32 for Swin, HRNet and PVTv2 (see `_SIZE_OPTIONS`); `pad_to_multiple`
            pads an input to it.

    Features are NCHW whatever timm's format (Swin's NHWC is permuted). A plain ViT returns
    several maps at the patch stride, all of `reductions` equal.

    Shapes: [B, in_channels, H, W] -> list of [B, channels[i], ~H/reductions[i], ~W/reductions[i]].
    """

    def __init__(
        self,
        name: str,
        weights: str | None = None,
        in_channels: int = 3,
        output_stride: int = 32,
        out_indices: tuple[int, ...] | None = None,
        timm_options: dict | None = None,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            close = timm.list_models(f"*{name[:4]}*")[:8]
            raise ConfigError(
                f"unknown timm encoder {name!r}"
                + (f" (similar: {', '.join(close)})" if close else "")
                + "; list them with: python -c \"import timm; print(timm.list_models('*resnet*'))\""
            )
        if output_stride not in (8, 16, 32):
            raise ConfigError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        family = _timm_family(name)
        options = {**_SIZE_OPTIONS.get(family, {}), **(timm_options or {})}
        final_norm = bool(options.pop("final_norm", False))
        kwargs: dict = {"features_only": True, "in_chans": in_channels, **options}
        if out_indices is None and "dynamic_img_size" in options:
            out_indices = vit_levels(name)
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        weights_file = resolve_encoder_weights(name, weights)
        if weights_file is not None:
            check_weights_file(
                name,
                weights_file,
                in_channels,
                **{k: v for k, v in (timm_options or {}).items() if k != "final_norm"},
            )
            kwargs["pretrained"] = True
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file)}
        try:
            if final_norm:  # a ViT's final LayerNorm on every block's tokens (DINOv2's probes)
                from timm.models._features import FeatureGetterNet

                kwargs.pop("features_only")
                indices = kwargs.pop("out_indices", 4)
                self.model = FeatureGetterNet(timm.create_model(name, **kwargs), indices, norm=True)
            else:
                self.model = timm.create_model(name, **kwargs)
        except (AssertionError, TypeError, NotImplementedError) as e:
            raise ConfigError(
                f"timm encoder {name!r} cannot be built with output_stride={output_stride}"
                f"{f', out_indices={out_indices}' if out_indices else ''}: {e}"
            ) from e
        self.name = name
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())
        self.nhwc = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")
        patch = getattr(getattr(self.model, "model", self.model), "patch_embed", None)
        if "dynamic_img_size" in options and patch is not None:
            self.input_multiple = int(max(patch.patch_size))
        elif family in _MULTIPLE_OF_STRIDE:
            self.input_multiple = max(self.reductions)
        else:
            self.input_multiple = 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = list(self.model(x))
        return [f.permute(0, 3, 1, 2) for f in features] if self.nhwc else features


def vit_levels(name: str, levels: int = 4) -> tuple[int, ...]:
    """Blocks a plain ViT's multi-level features come from: evenly spaced, the last included
    ((2, 5, 8, 11) of 12 blocks, as in mmsegmentation's UPerNet-ViT configs; (5, 11, 17, 23) of 24)."""
    with torch.device("meta"):  # only the depth is needed: no memory, no init
        depth = len(timm.create_model(name, pretrained=False).blocks)
    return tuple(depth * (i + 1) // levels - 1 for i in range(levels))


def resolve_encoder_weights(name: str, weights: str | os.PathLike | None) -> Path | None:
    """Turn an ``encoder_weights`` value into a local file (or None for random init)."""
    if weights is None or str(weights).lower() in ("", "none", "null", "scratch"):
        return None
    spec = str(weights)
    if spec.lower() == "imagenet":
        return imagenet_weights_file(name)
    if spec.startswith(("http://", "https://")):
        from seglight.data.download import download_url

        target = _cache_dir() / "weights" / Path(urlparse(spec).path).name
        return download_url(spec, target)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise EncoderWeightsError(
            f"encoder_weights: no such file {str(path)!r} (expected 'imagenet', null, a URL, or the "
            f"path of a state-dict file for the timm model {name!r})"
        )
    return path


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Return None if a TCP connection to the hub opens, else the reason it did not."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return str(e) or type(e).__name__


def imagenet_weights_file(name: str) -> Path:
    """timm's default pretrained weights for `name`: from the local cache, else from the hub.

    Fails fast (one TCP connect, a few seconds) instead of the hub client's minute of retries
    when the machine is offline, with instructions for passing a local file instead.
    """
    from huggingface_hub import constants, hf_hub_download

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise EncoderWeightsError(f"timm has no pretrained weights for encoder {name!r}")
    cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    filenames = (
        [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    )
    if cfg.hf_hub_id:
        for filename in filenames:
            try:
                return Path(
                    hf_hub_download(
                        cfg.hf_hub_id, filename, cache_dir=cache_dir, local_files_only=True
                    )
                )
            except Exception:  # noqa: BLE001 - not cached under this name; try the next
                pass
    if cfg.url:  # timm's older torch.hub cache
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if cached.is_file():
            return cached

    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    reason = "HF_HUB_OFFLINE is set" if offline else _hub_reachable(endpoint)
    if reason is None and cfg.hf_hub_id:
        errors = []
        for filename in filenames:
            try:
                return Path(hf_hub_download(cfg.hf_hub_id, filename, cache_dir=cache_dir))
            except Exception as e:  # noqa: BLE001 - report every attempt below
                errors.append(f"{filename}: {e}")
        reason = "; ".join(errors)
    raise EncoderWeightsError(
        f"cannot load ImageNet weights for encoder {name!r}: they are not in the local cache "
        f"({cache_dir}) and {endpoint} cannot be used ({reason}).\n"
        "Either fetch them once on a machine with network access and copy the cache folder here:\n"
        f"    python -c \"import timm; timm.create_model('{name}', pretrained=True)\"\n"
        "or pass a local weights file (a state dict of the timm model, .pth or .safetensors):\n"
        "    --model.encoder_weights /path/to/weights.safetensors\n"
        "or train from scratch: --model.encoder_weights null"
    )


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(n + "." for n in names)


def check_weights_file(name: str, path: Path, in_channels: int = 3, **options) -> None:
    """Raise EncoderWeightsError unless `path` holds weights for every layer of timm model `name`
    (built with `options`, e.g. another ``mlp_ratios``).

    The classifier may be present or absent; the stem may have another number of input channels
    (timm adapts it). Anything else missing, unexpected or mis-shaped is an error.
    """
    try:
        state_dict = timm.models.load_state_dict(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise EncoderWeightsError(f"encoder_weights: cannot read {str(path)!r}: {e}") from e
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise EncoderWeightsError(f"encoder_weights: {str(path)!r} does not hold a state dict")
    ref = timm.create_model(name, pretrained=False, **options)
    filter_fn = getattr(importlib.import_module(type(ref).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own conversion of older checkpoint formats
        try:
            state_dict = filter_fn(state_dict, ref)
        except TypeError:
            state_dict = filter_fn(state_dict)
        except Exception:  # noqa: BLE001 - a foreign file may break the filter; compare as is
            pass
    heads = _classifier_prefixes(ref)
    first_conv = ref.pretrained_cfg.get("first_conv") or ()
    stems = {c + ".weight" for c in ((first_conv,) if isinstance(first_conv, str) else first_conv)}
    expected = ref.state_dict()

    def skip(key: str) -> bool:
        return key.startswith(heads) or key.endswith("num_batches_tracked")

    missing = [k for k in expected if not skip(k) and k not in state_dict]
    unexpected = [k for k in state_dict if not skip(k) and k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict
        and not skip(k)
        and state_dict[k].shape != v.shape
        and not (k in stems and state_dict[k].shape[0] == v.shape[0])
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", mismatched),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise EncoderWeightsError(
            f"encoder_weights: {str(path)!r} does not fit timm model {name!r}: {'; '.join(parts)}. "
            "Is it a checkpoint of another architecture?"
        )
