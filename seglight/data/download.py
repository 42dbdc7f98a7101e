"""Downloading and unpacking dataset archives, safely and resumably.

Every dataset that supports ``download: true`` goes through this module, so it is written to
behave well in the situations that actually happen on research machines:

* **Flaky or slow networks.** Data is streamed into ``<file>.part`` and an interrupted download
  is resumed with an HTTP ``Range`` request on the next call instead of starting over.
* **Offline compute nodes.** A network failure raises :class:`DownloadError` whose message says
  exactly which URL to fetch by hand, where to put the file and which checksum it must have,
  so the user can copy the file over (or point the dataset at an existing copy) and move on.
* **Corrupt or changed files.** An optional checksum (``"sha256:<hex>"`` or ``"md5:<hex>"``) is
  verified after every download; a file that does not match never appears at the final path.
* **Crashes half-way.** Files and extracted directories are created under temporary names and
  moved into place with :func:`os.replace`, so a killed process never leaves something at the
  final location that looks complete but is not.
* **Hostile archives.** :func:`extract_archive` refuses members that would escape the
  destination (absolute paths, ``..``, links pointing outside, device files) *before* writing
  anything.

Only the standard library is used for HTTP (:mod:`urllib.request`), so this works wherever
Python does; :mod:`rich` (already a dependency) draws the progress bar.

Concurrency note: two processes downloading the same file at the same time would write the
same ``.part`` file. Lightning runs ``LightningDataModule.prepare_data`` on one process per
node, which is where downloads belong.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from seglight.errors import SeglightError

__all__ = [
    "DownloadError",
    "download_and_extract",
    "download_url",
    "extract_archive",
    "file_digest",
    "parse_checksum",
    "sha256sum",
]

#: Read/write block size for downloads and hashing: large enough to be fast, small enough to
#: keep memory flat for multi-gigabyte archives.
CHUNK_SIZE = 1 << 20

#: Some servers (and CDNs) reject requests without a User-Agent.
USER_AGENT = "seglight-downloader/0.1 (+https://pypi.org/project/seglight/)"

# Hex digest length -> algorithm, for checksums given without an "algo:" prefix.
_BARE_HEX_ALGOS = {64: "sha256", 32: "md5"}
_HEX_RE = re.compile(r"[0-9a-f]+")

# Archive suffixes we know how to open, longest first so ".tar.gz" wins over ".gz".
_TAR_SUFFIXES = {
    ".tar.gz": "r:gz",
    ".tgz": "r:gz",
    ".tar.bz2": "r:bz2",
    ".tbz2": "r:bz2",
    ".tbz": "r:bz2",
    ".tar.xz": "r:xz",
    ".txz": "r:xz",
    ".tar": "r:",
}


class DownloadError(SeglightError, RuntimeError):
    """A download, checksum verification or archive extraction failed.

    The message is meant for humans: it names the URL / file involved and says what to do next.
    """


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike[str], algo: str = "sha256") -> str:
    """Return the hex digest of the file at ``path`` using hash algorithm ``algo``.

    The file is read in :data:`CHUNK_SIZE` blocks, so memory use does not depend on file size.

    Args:
        path: File to hash.
        algo: Any algorithm known to :mod:`hashlib` (``"sha256"``, ``"md5"``, ...).

    Returns:
        The lowercase hexadecimal digest.
    """
    # usedforsecurity=False: md5 is only an integrity check here, and this keeps it usable on
    # FIPS-restricted systems where plain hashlib.md5() raises.
    h = hashlib.new(algo, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_SIZE), b""):
            h.update(block)
    return h.hexdigest()


def sha256sum(path: str | os.PathLike[str]) -> str:
    """Return the SHA-256 hex digest of the file at ``path`` (see :func:`file_digest`)."""
    return file_digest(path, "sha256")


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split a checksum string into ``(algorithm, lowercase hex digest)``.

    Accepted forms: ``"sha256:<64 hex>"``, ``"md5:<32 hex>"`` (any :mod:`hashlib` algorithm
    works with a prefix, e.g. ``"sha1:..."``), or a bare hex string, which is taken as SHA-256
    if it has 64 digits and MD5 if it has 32.

    Raises:
        ValueError: if the string is not a well-formed checksum. This is a programming/config
            error rather than a download failure, hence not :class:`DownloadError`.
    """
    text = checksum.strip()
    if ":" in text:
        algo, _, digest = text.partition(":")
        algo, digest = algo.strip().lower(), digest.strip().lower()
    else:
        digest = text.lower()
        algo = _BARE_HEX_ALGOS.get(len(digest), "")
        if not algo:
            raise ValueError(
                f"Cannot tell the hash algorithm of checksum {checksum!r}: use "
                "'sha256:<hex>' or 'md5:<hex>' (a bare 64-digit hex string means sha256, "
                "32 digits means md5)."
            )
    try:
        expected_len = hashlib.new(algo, usedforsecurity=False).digest_size * 2
    except (ValueError, TypeError):
        raise ValueError(f"Unknown hash algorithm {algo!r} in checksum {checksum!r}.") from None
    if len(digest) != expected_len or not _HEX_RE.fullmatch(digest):
        raise ValueError(
            f"Malformed {algo} checksum {checksum!r}: expected {expected_len} hex digits."
        )
    return algo, digest


# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------


def download_url(
    url: str,
    path: str | os.PathLike[str],
    checksum: str | None = None,
    *,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``path``, resuming partial downloads and verifying the checksum.

    Behaviour, in order:

    1. If ``path`` exists and matches ``checksum``, return at once without touching the
       network. If it exists and no checksum is given, it is trusted and returned as-is. If it
       exists but does *not* match, it is renamed to ``<path>.bad`` and downloaded again.
    2. Data is written to ``<path>.part``. If that file already exists (an earlier download was
       interrupted), a ``Range: bytes=<size>-`` request asks only for the rest: a ``206`` reply
       is appended, a ``200`` reply (server ignores ranges) starts over, and ``416`` (range not
       satisfiable) means the part file is already complete and is just verified.
    3. The finished ``.part`` file is checked against ``checksum``. On a mismatch it is moved
       to ``<path>.bad`` (kept for inspection, never used) and :class:`DownloadError` is raised
       naming the URL, the file and both digests; the next call starts from scratch.
    4. The verified file is moved to ``path`` with :func:`os.replace`, which is atomic, so a
       half-written file never sits at ``path``.

    Network failures raise :class:`DownloadError` with manual-download instructions; the
    ``.part`` file is kept so that the next call resumes where this one stopped.

    Args:
        url: HTTP(S) URL to fetch.
        path: Final location of the file. Parent directories are created.
        checksum: Expected checksum, see :func:`parse_checksum`. ``None`` skips verification.
        timeout: Seconds to wait for connecting and for each read before giving up.
        progress: Show a progress bar (bytes, speed, ETA) when writing to a terminal.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DownloadError: the server could not be reached, answered with an HTTP error, the
            transfer broke off, or the checksum did not match.
        ValueError: ``checksum`` is malformed.
    """
    path = Path(path)
    # Parse first: a typo in a dataset's checksum should fail before any network traffic.
    expected = parse_checksum(checksum) if checksum else None

    if path.is_dir():
        raise DownloadError(f"Cannot download {url} to {path}: that path is a directory.")
    if path.exists():
        if expected is None:
            return path
        actual = file_digest(path, expected[0])
        if actual == expected[1]:
            return path
        # Don't silently overwrite: a stale or truncated copy may be useful to look at, but it
        # must not stay at the path where datasets would pick it up.
        os.replace(path, _bad_path(path))

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")

    # At most two rounds: the second only happens when the server tells us the part file
    # cannot be resumed (it is larger than the remote file), and then we start from zero.
    for _ in range(2):
        if _fetch_into_part(url, path, part, expected, timeout=timeout, progress=progress):
            break
        part.unlink(missing_ok=True)
    else:  # pragma: no cover - would need a server that keeps contradicting itself
        raise DownloadError(f"Could not download {url}: the server's answers were inconsistent.")

    if expected is not None:
        algo, want = expected
        got = file_digest(part, algo)
        if got != want:
            bad = _bad_path(path)
            os.replace(part, bad)
            raise DownloadError(
                f"Checksum mismatch for {url}\n"
                f"  file:     {path}\n"
                f"  expected: {algo}:{want}\n"
                f"  actual:   {algo}:{got}\n"
                f"The downloaded data was moved to {bad} and will not be used. Run again to "
                "download it afresh; if the mismatch persists, the file on the server has "
                f"changed or is corrupt: fetch a correct copy by hand and put it at {path}."
            )

    # fsync before the rename so that after a power loss we have either no file at `path` or a
    # complete one, never a correctly named file with missing blocks.
    _fsync(part)
    os.replace(part, path)
    return path


def _fetch_into_part(
    url: str,
    path: Path,
    part: Path,
    expected: tuple[str, str] | None,
    *,
    timeout: float,
    progress: bool,
) -> bool:
    """Bring ``part`` up to the complete remote content of ``url``.

    Returns ``False`` if the existing part file cannot be resumed and must be discarded (the
    caller deletes it and calls again); ``True`` once ``part`` holds the whole file.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {
        "User-Agent": USER_AGENT,
        # Byte ranges refer to the encoded representation; ask for none so offsets into the
        # .part file and the server's byte positions are the same thing.
        "Accept-Encoding": "identity",
    }
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)

    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        try:
            if err.code == 416 and offset:
                # "Range not satisfiable": we already have every byte, unless the server tells
                # us the file is shorter than what we have (then the remote file changed).
                total = _total_from_content_range(err.headers.get("Content-Range"))
                return total is None or total == offset
            raise DownloadError(
                f"Downloading {url} failed: the server answered HTTP {err.code} {err.reason}.\n"
                + _manual_instructions(url, path, expected)
            ) from None
        finally:
            err.close()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        # URLError wraps DNS failures and refused connections; TimeoutError/OSError cover
        # connect timeouts and resets. (A malformed URL raises ValueError, which is a bug in
        # the caller rather than a network problem, so it is deliberately not caught.)
        raise _offline_error(url, path, part, expected, err) from err

    with response:
        status = response.status
        if status == 206:
            start = _start_from_content_range(response.headers.get("Content-Range"))
            if start is not None and start != offset:
                # The server sent a different range than we asked for; appending it would
                # corrupt the file, so start over rather than guess.
                return False
            mode = "ab"
        else:
            # 200: the server ignored the Range header (or there was none) and sends the whole
            # file, so whatever we had in the .part file is replaced.
            offset, mode = 0, "wb"

        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        total = offset + remaining if remaining is not None else None

        received = 0
        with open(part, mode) as out, _progress_bar(path.name, total, offset, progress) as bar:
            try:
                while block := response.read(CHUNK_SIZE):
                    out.write(block)
                    received += len(block)
                    bar(len(block))
            except (OSError, http.client.HTTPException) as err:
                out.flush()
                raise _offline_error(url, path, part, expected, err, interrupted=True) from err

    if remaining is not None and received < remaining:
        # The connection closed before Content-Length bytes arrived. http.client does not
        # raise for this when reading in chunks, so we check ourselves.
        raise _offline_error(
            url,
            path,
            part,
            expected,
            f"the connection closed after {offset + received} of {total} bytes",
            interrupted=True,
        )
    return True


def _offline_error(
    url: str,
    path: Path,
    part: Path,
    expected: tuple[str, str] | None,
    reason: object,
    *,
    interrupted: bool = False,
) -> DownloadError:
    """Build the actionable error for "the network did not cooperate"."""
    if isinstance(reason, urllib.error.URLError) and not isinstance(reason.reason, str):
        reason = reason.reason  # unwrap to e.g. "[Errno 111] Connection refused"
    kept = ""
    if part.exists() and part.stat().st_size:
        kept = (
            f"\nThe {part.stat().st_size} bytes downloaded so far are kept in {part}; running "
            "again resumes from there."
        )
    return DownloadError(
        f"Could not download {url}\n"
        f"  reason: {reason}\n"
        + (
            "The transfer was interrupted (unstable network, or the server closed the "
            "connection).\n"
            if interrupted
            else "This machine seems to be offline, or the server could not be reached.\n"
        )
        + _manual_instructions(url, path, expected)
        + kept
    )


def _manual_instructions(url: str, path: Path, expected: tuple[str, str] | None) -> str:
    """The "here is how to do it by hand" part shared by the network error messages."""
    checksum = f"    (it must have {expected[0]} checksum {expected[1]})\n" if expected else ""
    return (
        "To continue without network access, either\n"
        f"  * download {url}\n"
        "    on a machine with internet access and copy it to\n"
        f"    {path}\n"
        f"{checksum}"
        "    then run again (an existing file with the right checksum is used as-is), or\n"
        "  * point the dataset at an existing copy of the data (its `root` setting) and turn\n"
        "    `download` off."
    )


def _bad_path(path: Path) -> Path:
    return path.with_name(path.name + ".bad")


def _start_from_content_range(header: str | None) -> int | None:
    """First byte position of a ``Content-Range: bytes a-b/n`` header, if parseable."""
    match = re.match(r"\s*bytes\s+(\d+)-", header or "")
    return int(match.group(1)) if match else None


def _total_from_content_range(header: str | None) -> int | None:
    """Complete length ``n`` of a ``Content-Range: bytes .../n`` header, if known."""
    match = re.search(r"/(\d+)\s*$", header or "")
    return int(match.group(1)) if match else None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def _progress_bar(
    name: str, total: int | None, completed: int, enabled: bool
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)`` that feeds a rich progress bar (a no-op when disabled).

    The bar is only drawn on an interactive terminal or notebook: in log files and CI output a
    live bar turns into thousands of lines of noise.
    """
    if enabled:
        from rich.console import Console

        console = Console(file=sys.stderr)
        enabled = console.is_terminal or console.is_jupyter
    if not enabled:
        yield lambda n: None
        return

    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(name, total=total, completed=completed)
        yield lambda n: bar.advance(task, n)


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[Path]:
    """Safely extract a ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2`` or ``.tar.xz``.

    Every member is checked *before* anything is written. The archive is refused with
    :class:`DownloadError` (naming the archive and the member) if any member

    * has an absolute path (``/etc/x``, ``C:\\x``),
    * has ``..`` components that lead outside ``dest``,
    * is a symbolic or hard link whose target lies outside ``dest`` (or is absolute),
    * is a device file or FIFO.

    The archive is unpacked into a temporary directory next to ``dest`` and each top-level entry
    is then moved into ``dest`` with :func:`os.replace`. An interrupted or failed extraction
    therefore leaves nothing half-written in ``dest``. A top-level entry that already exists in
    ``dest`` is *replaced* by the archive's version (so re-extracting repairs a damaged copy);
    other contents of ``dest`` are left alone.

    Args:
        archive: The archive file; its format is taken from the file name, falling back to
            sniffing the content.
        dest: Directory to extract into (created if missing).

    Returns:
        The top-level paths created in ``dest``, sorted.

    Raises:
        DownloadError: unsafe member, unknown format, or a corrupt/truncated archive.
    """
    archive, dest = Path(archive), Path(dest)
    kind = _archive_kind(archive)

    # `dest` itself is only created once the archive has been validated and unpacked, so a
    # refused or corrupt archive leaves no trace there. The temporary directory shares dest's
    # parent => same filesystem => the os.replace calls below are atomic renames.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    try:
        try:
            if kind == "zip":
                with zipfile.ZipFile(archive) as zf:
                    for info in zf.infolist():
                        _check_zip_member(archive, zf, info)
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive, kind) as tf:
                    members = tf.getmembers()  # reads the whole index: detects truncation early
                    _check_tar_members(archive, members)
                    if hasattr(tarfile, "data_filter"):
                        # Defence in depth on Pythons that have it (3.12, and 3.8-3.11 security
                        # releases): also drops setuid bits and similar.
                        tf.extractall(tmp, members=members, filter="data")
                    else:  # pragma: no cover - depends on the Python patch release
                        tf.extractall(tmp, members=members)
        except DownloadError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
            raise DownloadError(
                f"Could not extract {archive}: {err}. The archive is probably corrupt or "
                f"incomplete; delete it and download it again."
            ) from err

        dest.mkdir(exist_ok=True)
        entries = sorted(os.listdir(tmp))
        # Replaced directories are renamed into this (uniquely named) folder inside tmp rather
        # than deleted in place: a rename is instant, so `target` is missing only for a moment,
        # and the old copy is removed together with tmp at the end.
        trash = Path(tempfile.mkdtemp(prefix=".replaced-", dir=tmp))
        placed = []
        for entry in entries:
            target = dest / entry
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.exists():
                os.replace(target, trash / entry)
            os.replace(tmp / entry, target)
            placed.append(target)
        return placed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _archive_kind(archive: Path) -> str:
    """Return ``"zip"`` or a :func:`tarfile.open` mode for ``archive``."""
    name = archive.name.lower()
    if name.endswith(".zip"):
        return "zip"
    for suffix, mode in _TAR_SUFFIXES.items():
        if name.endswith(suffix):
            return mode
    # Unknown name (e.g. a GitHub archive saved without extension): look at the content.
    if archive.is_file():
        if zipfile.is_zipfile(archive):
            return "zip"
        if tarfile.is_tarfile(archive):
            return "r:*"
    raise DownloadError(
        f"Cannot extract {archive}: unsupported archive format (expected .zip, .tar, "
        ".tar.gz/.tgz, .tar.bz2 or .tar.xz)."
    )


# Member paths are resolved as lists of components relative to dest, following the archive's own
# symlinks as the filesystem would at the moment each member is written (a link is followed
# before a ".." after it, as the kernel does; a lexical normpath would not). The real filesystem
# is never consulted: dest may not exist yet, and following real symlinks would defeat the check.
_MAX_LINK_DEPTH = 40  # like the kernel's ELOOP limit


class _Escape(Exception):
    """A path resolves outside the destination (or loops)."""


def _split(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _resolve(
    parts: list[str], links: dict[str, str], follow_last: bool, depth: int = 0
) -> list[str]:
    """The components (relative to dest) that `parts` names once the archive's symlinks seen so
    far (`links`: path -> target) are followed; raises _Escape if it leaves dest.

    `follow_last`: whether a symlink in the last component is followed too (writing a file or
    a hard link at a symlink's path writes through it; a new symlink replaces it)."""
    current: list[str] = []
    for i, part in enumerate(parts):
        if part == "..":
            if not current:
                raise _Escape
            current.pop()
            continue
        current.append(part)
        target = links.get("/".join(current))
        if target is not None and (follow_last or i < len(parts) - 1):
            if depth >= _MAX_LINK_DEPTH or _is_absolute(target):
                raise _Escape
            current = _resolve(current[:-1] + _split(target), links, True, depth + 1)
    return current


def _is_absolute(name: str) -> bool:
    # Archives made on Windows may use backslashes and drive letters; treat them as absolute
    # too, since that is how they would be interpreted there.
    return name.startswith(("/", "\\")) or bool(re.match(r"[A-Za-z]:", name))


def _refuse(archive: Path, member: str, why: str) -> DownloadError:
    return DownloadError(
        f"Refusing to extract {archive}: member {member!r} {why}. Nothing was extracted; the "
        "archive is malformed or malicious, do not unpack it by hand either."
    )


def _check_tar_members(archive: Path, members: list[tarfile.TarInfo]) -> None:
    """Refuse the archive if any member, or any link's target, resolves outside dest.

    Every member is resolved against the symlinks of the members before it (the state of the
    destination when tarfile writes it), and at the end every symlink is resolved again against
    all of them, since a later link can change where an earlier one points."""
    links: dict[str, str] = {}
    for member in members:
        if _is_absolute(member.name):
            raise _refuse(archive, member.name, "has an absolute path")
        if member.ischr() or member.isblk() or member.isfifo():
            raise _refuse(archive, member.name, "is a device file or FIFO")
        try:
            lexical = _resolve(_split(member.name), {}, follow_last=False)
            where = _resolve(lexical, links, follow_last=not member.issym())
        except _Escape:
            raise _refuse(
                archive, member.name, "would be written outside the destination ('..')"
            ) from None
        # A member written *through* a symlink (e.g. "a" -> "." and then "a/b" -> ".."): archives
        # of real datasets never need that, so it is refused even when it stays inside.
        if where != lexical:
            raise _refuse(
                archive, member.name, "lies inside a symlinked directory (or replaces a symlink)"
            )
        if member.issym():
            kind, target = "symlink", member.linkname
            base = where[:-1]  # a symlink's target is relative to the link's directory
        elif member.islnk():
            kind, target = "hard link", member.linkname
            base = []  # a hard link's target is relative to the archive root
        else:
            links.pop("/".join(where), None)
            continue
        try:
            if _is_absolute(target):
                raise _Escape
            _resolve(base + _split(target), links, follow_last=True)
        except _Escape:
            raise _refuse(
                archive, member.name, f"is a {kind} pointing outside ({target!r})"
            ) from None
        if member.issym():
            links["/".join(where)] = target
    for name, target in links.items():
        try:
            _resolve(_split(name), links, follow_last=True)
        except _Escape:
            raise _refuse(archive, name, f"is a symlink pointing outside ({target!r})") from None


def _check_zip_member(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    if _is_absolute(info.filename):
        raise _refuse(archive, info.filename, "has an absolute path")
    parts = _split(info.filename)
    try:
        _resolve(parts, {}, follow_last=False)
    except _Escape:
        raise _refuse(
            archive, info.filename, "would be written outside the destination ('..')"
        ) from None
    mode = info.external_attr >> 16  # Unix mode bits, present when the zip was made on Unix
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
        raise _refuse(archive, info.filename, "is a device file or FIFO")
    if stat.S_ISLNK(mode):
        # zipfile never creates real symlinks (it writes the target path into a small regular
        # file), so such a member cannot escape. One pointing outside is still refused: the
        # archive is plainly not a dataset, and other unzip tools *would* follow it.
        target = zf.read(info).decode("utf-8", "replace")
        try:
            if _is_absolute(target):
                raise _Escape
            _resolve(parts[:-1] + _split(target), {}, follow_last=True)
        except _Escape:
            raise _refuse(
                archive, info.filename, f"is a symlink pointing outside ({target!r})"
            ) from None


# --------------------------------------------------------------------------------------------
# Convenience
# --------------------------------------------------------------------------------------------


def download_and_extract(
    url: str,
    root: str | os.PathLike[str],
    filename: str,
    checksum: str | None,
    *,
    remove_archive: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``root / filename`` (see :func:`download_url`) and extract it there.

    Args:
        url: Archive URL.
        root: Directory that receives both the archive and its extracted contents.
        filename: Name to save the archive under (its suffix selects the archive format).
        checksum: Expected checksum of the archive, or ``None``.
        remove_archive: Delete the archive after a successful extraction to save disk space
            (the next ``download: true`` would then have to fetch it again).
        timeout: Passed to :func:`download_url`.
        progress: Passed to :func:`download_url`.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    archive = download_url(url, root / filename, checksum, timeout=timeout, progress=progress)
    extract_archive(archive, root)
    if remove_archive:
        archive.unlink()
    return root
