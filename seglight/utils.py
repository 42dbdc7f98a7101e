"""Small helpers used in several places."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; on success flush it to the disk and
    rename it over `path`. Readers, and a process killed at any moment (kill -9, power loss),
    see the old content or the new one, never a part: the rename is atomic because the temporary
    file is in the same directory, hence on the same filesystem (unlike $TMPDIR, from where a
    "move" is a copy that truncates the target first). On an error the temporary file is removed;
    after a kill it stays, named `.<name>.<random>.tmp` (see `remove_stale_temporaries`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on the disk before the name points to it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # persist the rename itself (the directory entry)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Remove the temporary files that a killed `atomic_open(path)` left beside `path` (call it
    only where one process writes `path`, e.g. rank zero's checkpoints)."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a part of it."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def git_revision(cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"commit": sha, "dirty": bool} of the git checkout at `cwd` (or the package's), else {}."""
    for where in (cwd or os.getcwd(), Path(__file__).resolve().parent):
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=where,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=where, capture_output=True, text=True, timeout=5, check=True,
            ).stdout  # fmt: skip
            return {"commit": commit, "dirty": bool(status.strip())}
        except (OSError, subprocess.SubprocessError):
            continue
    return {}


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours for datasets without a palette (the Pascal VOC bit-interleaving scheme)."""
    palette = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def first_doc_line(obj: object) -> str:
    """The first line of an object's docstring ("" without one): its one-line summary."""
    import inspect

    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


#: Lightning's info lines that are not the user's business: an advertisement, a note on our own
#: model-summary callback, and a step of its own bookkeeping
_LIGHTNING_NOISE = (
    "💡 Tip: For seamless cloud logging",
    "Trainer already configured with model summary callbacks",
    "Loading `train_dataloader` to estimate number of stepping batches",
)


class _DropMessages:
    """A logging filter dropping records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def silence_known_noise() -> None:
    """Silence messages of the libraries that say nothing about the user's run (each one by its
    text, nothing else): Lightning's litlogger tip and two notes on its internals, and the
    deprecation warning torch raises inside Lightning's own pytree helper (Lightning's code, not
    the user's, uses the deprecated LeafSpec), and tqdm's complaint in Jupyter without ipywidgets
    when timm's hub helper imports tqdm.auto (seglight shows no tqdm bars). Idempotent."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(_LIGHTNING_NOISE))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message="IProgress not found. Please update jupyter")
