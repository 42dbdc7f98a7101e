"""Loading checkpoints safely: every checkpoint seglight reads goes through `load_checkpoint`.

`torch.load(weights_only=True)` unpickles tensors and plain data (dicts, lists, tuples, strings,
numbers) only, so a crafted checkpoint cannot run code when it is loaded. What seglight and
Lightning write needs nothing more, so nothing is added to torch's allow-list: the state dict, optimizer and scheduler states, loop and
callback states, and the hyper-parameters recorded by LightningCLI (class paths as strings).
The `fit`/`validate`/`test`/`predict` commands pass `weights_only=True` to Lightning as well
(seglight.commands.train), which loads the checkpoint again with the same rule.

A file that cannot be read (truncated, corrupt, not written by torch.save) or that holds other
objects is a CheckpointError: one line naming the file, not a traceback from inside torch.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seglight.errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """The dict in a torch.save file, loaded on the CPU with weights_only=True.

    Args:
        path: the file.
        what: how to name it in errors (e.g. "--ckpt_path", "--ckpt").

    Raises:
        CheckpointError: no such file; truncated or corrupt; not a dict; holds objects other than
            tensors and plain data (a crafted pickle: it is not run).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r}: no such file")
    try:
        # mmap reads only the tensors that are used (e.g. the callbacks' state of a large
        # checkpoint); it needs torch.save's zip format, older files are read whole
        checkpoint = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler refused an object: name it (the line of torch's
        # message that says what), never load it
        lines = [ln.strip() for ln in str(e).split("WeightsUnpickler error:")[-1].splitlines()]
        named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
        detail = (named or [ln for ln in lines if ln] or [""])[0]
        detail = detail.split(" was not an allowed global")[0].rstrip(".")
        raise CheckpointError(
            f"{what} {str(path)!r} holds Python objects other than tensors and plain data, which "
            f"are not loaded (loading could run code){f': {detail}' if detail else ''}. "
            "seglight writes no such objects: was this file made by seglight?"
        ) from e
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ... for bad files
        raise CheckpointError(
            f"{what} {str(path)!r} cannot be read: it is truncated, corrupt or not a PyTorch "
            f"checkpoint ({type(e).__name__})"
        ) from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{what} {str(path)!r} is not a checkpoint: it holds a {type(checkpoint).__name__}, "
            "not a dict"
        )
    return checkpoint


def check_state_dict(module: nn.Module, state_dict: dict[str, Any], where: str) -> None:
    """Raise CheckpointError unless `state_dict` has exactly `module`'s tensors (names and shapes),
    with one line that says what differs, instead of torch's "Error(s) in loading state_dict".

    Names are compared without torch.compile's `_orig_mod.` (a compiled run saves those)."""

    def plain(key: str) -> str:
        return key.replace("_orig_mod.", "")

    ours = {plain(k): tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {
        plain(k): tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)
    }
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    reshaped = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    if not (missing or unexpected or reshaped):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(
                f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            )
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape ({k}: {theirs[k]} here {ours[k]})")
    raise CheckpointError(
        f"{where} does not fit {type(module).__name__} with these options: tensors "
        f"{'; '.join(parts)}. Was it trained with another architecture or options?"
    )


def network_state(checkpoint: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The network weights of a seglight model checkpoint (a `load_checkpoint` dict), keyed as in
    the network: its averaged weights (`ema.module.*`, the weights it was validated with) when it
    kept an EMA, else `net.*`; torch.compile's `_orig_mod.` dropped.

    Raises:
        CheckpointError: the checkpoint holds no network weights.
    """
    state = checkpoint.get("state_dict")
    state = state if isinstance(state, dict) else {}
    found: dict[str, torch.Tensor] = {}
    for prefix in ("ema.module.", "net."):
        found = {
            k[len(prefix) :].replace("_orig_mod.", ""): v
            for k, v in state.items()
            if k.startswith(prefix) and isinstance(v, torch.Tensor)
        }
        if found:
            break
    if not found:
        raise CheckpointError(
            f"{where} holds no network weights (no net.* tensors in its state_dict): is it a "
            "seglight model checkpoint?"
        )
    return found


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix` ("encoder."), with the prefix dropped."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_network(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy `state` (keys as in the plain module) into `module` (a torch.compile'd one too), after
    `check_state_dict` has found that it fits: one line naming `where` and what differs if not."""
    plain = getattr(module, "_orig_mod", module)
    check_state_dict(plain, state, where)
    plain.load_state_dict(state)
