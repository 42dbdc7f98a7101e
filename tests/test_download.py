"""Tests for seglight.data.download against a real local HTTP server.

Nothing here touches the internet: a ThreadingHTTPServer bound to 127.0.0.1 (port 0) serves
small files written into ``tmp_path``. Its handler implements ``Range`` requests, can cut a
response short to simulate a dropped connection, and records every request it receives.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from seglight.data.download import (
    DownloadError,
    download_and_extract,
    download_url,
    extract_archive,
    file_digest,
    parse_checksum,
    sha256sum,
)

# --------------------------------------------------------------------------------------------
# Local HTTP server
# --------------------------------------------------------------------------------------------


@dataclass
class ServedRequest:
    path: str
    range: str | None
    status: int = 0
    body_bytes: int = 0


@dataclass
class FileServer:
    """State shared between the test and the request handler threads."""

    root: Path
    base_url: str = ""
    requests: list[ServedRequest] = field(default_factory=list)
    #: If set, the next response advertises the full Content-Length but sends only this many
    #: body bytes and then closes the connection (one-shot).
    cut_after: int | None = None
    #: If False, Range headers are ignored and the whole file is sent with 200.
    support_range: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def add(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return self.url(name)


class RangeRequestHandler(BaseHTTPRequestHandler):
    """Serves files from ``server.state.root`` with single-range ``Range`` support."""

    # HTTP/1.0: one request per connection, so closing early is an unambiguous "cut".
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - name required by BaseHTTPRequestHandler
        state: FileServer = self.server.state  # type: ignore[attr-defined]
        record = ServedRequest(self.path, self.headers.get("Range"))
        with state.lock:
            state.requests.append(record)
            cut, state.cut_after = state.cut_after, None

        file = state.root / self.path.lstrip("/")
        if "/" in self.path.lstrip("/") or not file.is_file():
            record.status = 404
            self.send_error(404)
            return
        data = file.read_bytes()
        size = len(data)

        match = re.fullmatch(r"bytes=(\d+)-(\d*)", record.range or "")
        if match and state.support_range:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else size - 1
            if start >= size:
                record.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start : end + 1]
            record.status = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{size}")
        else:
            body = data
            record.status = 200
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut is not None:
            body = body[:cut]
        self.wfile.write(body)
        record.body_bytes = len(body)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "served"
    root.mkdir()
    state = FileServer(root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeRequestHandler)
    httpd.daemon_threads = True
    httpd.state = state  # type: ignore[attr-defined]
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing is listening (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/data.tar.gz"


# --------------------------------------------------------------------------------------------
# Archive helpers
# --------------------------------------------------------------------------------------------

FILES = {
    "camvid/train/0001.png": b"fake image bytes",
    "camvid/trainannot/0001.png": b"fake label bytes",
    "camvid/README.txt": b"hello\n",
}


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --------------------------------------------------------------------------------------------
# 1. Download + verify + extract
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "filename", ["data.tar.gz", "data.tgz", "data.zip", "data.tar", "data.tar.bz2", "data.tar.xz"]
)
def test_download_and_extract_archive(server: FileServer, tmp_path: Path, filename: str) -> None:
    archive = tmp_path / filename
    if filename.endswith(".zip"):
        make_zip(archive, FILES)
    else:
        suffix = filename.rsplit(".", 1)[1]
        mode = {"gz": "w:gz", "tgz": "w:gz", "bz2": "w:bz2", "xz": "w:xz", "tar": "w"}[suffix]
        make_tar(archive, FILES, mode)
    data = archive.read_bytes()
    url = server.add(filename, data)

    root = tmp_path / "datasets"
    out = download_and_extract(url, root, filename, f"sha256:{sha256(data)}", progress=False)

    assert out == root
    assert (root / filename).read_bytes() == data
    for name, content in FILES.items():
        assert (root / name).read_bytes() == content
    assert not (root / (filename + ".part")).exists()
    assert [r.status for r in server.requests] == [200]
    # no temporary extraction directories left behind
    assert sorted(p.name for p in root.iterdir()) == sorted(["camvid", filename])


def test_download_and_extract_can_remove_archive(server: FileServer, tmp_path: Path) -> None:
    data = make_tar(tmp_path / "a.tar.gz", FILES).read_bytes()
    url = server.add("a.tar.gz", data)
    root = tmp_path / "root"
    download_and_extract(url, root, "a.tar.gz", sha256(data), remove_archive=True, progress=False)
    assert not (root / "a.tar.gz").exists()
    assert (root / "camvid/README.txt").read_bytes() == b"hello\n"


def test_download_with_md5_checksum_and_progress_enabled(server: FileServer, tmp_path: Path):
    data = b"x" * 5000
    url = server.add("blob.bin", data)
    md5 = hashlib.md5(data).hexdigest()
    # progress=True outside a terminal must simply not draw anything (and not fail)
    path = download_url(url, tmp_path / "out" / "blob.bin", f"md5:{md5}", progress=True)
    assert path.read_bytes() == data
    assert file_digest(path, "md5") == md5
    assert sha256sum(path) == sha256(data)


def test_extract_archive_returns_top_level_paths(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "x.zip", {"a/1.txt": b"1", "b.txt": b"2", "a/c/3.txt": b"3"})
    dest = tmp_path / "dest"
    assert extract_archive(archive, dest) == [dest / "a", dest / "b.txt"]
    assert (dest / "a/c/3.txt").read_bytes() == b"3"


def test_extract_archive_replaces_existing_top_level_entries(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "a").mkdir(parents=True)
    (dest / "a" / "stale.txt").write_text("old")
    (dest / "unrelated.txt").write_text("keep me")
    extract_archive(make_tar(tmp_path / "x.tar.gz", {"a/new.txt": b"new"}), dest)
    assert listing(dest) == ["a", "a/new.txt", "unrelated.txt"]


# --------------------------------------------------------------------------------------------
# 2. Checksum mismatch
# --------------------------------------------------------------------------------------------


def test_checksum_mismatch_is_refused(server: FileServer, tmp_path: Path) -> None:
    data = b"the real content"
    url = server.add("file.bin", data)
    wrong = "0" * 64
    path = tmp_path / "file.bin"

    with pytest.raises(DownloadError) as exc:
        download_url(url, path, f"sha256:{wrong}", progress=False)

    message = str(exc.value)
    assert wrong in message
    assert sha256(data) in message
    assert url in message
    assert str(path) in message
    assert not path.exists()
    assert not path.with_name("file.bin.part").exists()
    # the bad download is kept aside for inspection, never at the final path
    assert path.with_name("file.bin.bad").read_bytes() == data


def test_existing_file_with_wrong_checksum_is_downloaded_again(
    server: FileServer, tmp_path: Path
) -> None:
    data = b"fresh"
    url = server.add("f.bin", data)
    path = tmp_path / "f.bin"
    path.write_bytes(b"stale")
    assert download_url(url, path, sha256(data), progress=False).read_bytes() == data
    assert len(server.requests) == 1
    assert path.with_name("f.bin.bad").read_bytes() == b"stale"


# --------------------------------------------------------------------------------------------
# 3. Interrupted download + resume
# --------------------------------------------------------------------------------------------


def test_interrupted_download_is_resumed_with_range(server: FileServer, tmp_path: Path) -> None:
    data = bytes(range(256)) * 400  # 102_400 bytes
    cut = 30_000
    url = server.add("big.bin", data)
    path = tmp_path / "big.bin"
    part = tmp_path / "big.bin.part"

    server.cut_after = cut
    with pytest.raises(DownloadError) as exc:
        download_url(url, path, sha256(data), progress=False)
    assert url in str(exc.value)
    assert str(part) in str(exc.value)  # tells the user the partial data is kept
    assert not path.exists()
    assert part.stat().st_size == cut
    assert server.requests[0].range is None

    assert download_url(url, path, sha256(data), progress=False) == path

    assert len(server.requests) == 2
    resumed = server.requests[1]
    assert resumed.range == f"bytes={cut}-"
    assert resumed.status == 206
    assert resumed.body_bytes == len(data) - cut
    assert path.read_bytes() == data
    assert sha256sum(path) == sha256(data)
    assert not part.exists()


def test_complete_part_file_answered_416_is_verified(server: FileServer, tmp_path: Path) -> None:
    data = b"complete already"
    url = server.add("done.bin", data)
    path = tmp_path / "done.bin"
    path.with_name("done.bin.part").write_bytes(data)

    download_url(url, path, sha256(data), progress=False)

    assert [(r.range, r.status) for r in server.requests] == [(f"bytes={len(data)}-", 416)]
    assert path.read_bytes() == data


def test_part_file_larger_than_remote_restarts(server: FileServer, tmp_path: Path) -> None:
    data = b"short"
    url = server.add("s.bin", data)
    path = tmp_path / "s.bin"
    path.with_name("s.bin.part").write_bytes(b"much longer stale partial content")

    download_url(url, path, None, progress=False)

    assert [r.status for r in server.requests] == [416, 200]
    assert path.read_bytes() == data


def test_server_without_range_support_starts_over(server: FileServer, tmp_path: Path) -> None:
    data = b"abcdefghij" * 100
    url = server.add("r.bin", data)
    path = tmp_path / "r.bin"
    path.with_name("r.bin.part").write_bytes(b"XXXX")  # garbage that must not be kept
    server.support_range = False

    download_url(url, path, sha256(data), progress=False)

    assert [(r.range, r.status) for r in server.requests] == [("bytes=4-", 200)]
    assert path.read_bytes() == data


# --------------------------------------------------------------------------------------------
# 4. Malicious archives
# --------------------------------------------------------------------------------------------


def _tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        good = tarfile.TarInfo("good.txt")
        good.size = 2
        tf.addfile(good, io.BytesIO(b"ok"))  # a harmless member first: must not be written
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("dotdot", "outside the destination"),
        ("absolute", "absolute path"),
        ("symlink_abs", "symlink pointing outside"),
        ("symlink_rel", "symlink pointing outside"),
        ("hardlink", "hard link pointing outside"),
        ("device", "device file"),
        ("through_symlink", "inside a symlinked directory"),
    ],
)
def test_malicious_tar_is_refused(tmp_path: Path, case: str, fragment: str) -> None:
    work = tmp_path / "work"
    dest = work / "dest"
    work.mkdir()
    outside_abs = tmp_path / "abs_evil.txt"
    members = {
        "dotdot": [(_info("../evil.txt"), b"evil")],
        "absolute": [(_info(str(outside_abs)), b"evil")],
        "symlink_abs": [(_info("passwd", tarfile.SYMTYPE, "/etc/passwd"), b"")],
        "symlink_rel": [(_info("sub/up", tarfile.SYMTYPE, "../../.."), b"")],
        "hardlink": [(_info("hard", tarfile.LNKTYPE, "/etc/passwd"), b"")],
        "device": [(_info("null", tarfile.CHRTYPE), b"")],
        "through_symlink": [
            (_info("a", tarfile.SYMTYPE, "."), b""),
            (_info("a/b", tarfile.SYMTYPE, ".."), b""),
        ],
    }[case]
    archive = _tar_with(tmp_path / f"{case}.tar.gz", *members)
    before = listing(tmp_path)

    with pytest.raises(DownloadError) as exc:
        extract_archive(archive, dest)

    message = str(exc.value)
    assert str(archive) in message
    assert members[-1][0].name in message
    assert fragment in message
    assert not dest.exists()  # nothing written at dest, not even good.txt
    assert listing(tmp_path) == before  # nothing outside (no evil.txt, no temp dirs)
    assert not (tmp_path / "evil.txt").exists()
    assert not outside_abs.exists()


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("../evil.txt", "outside the destination"), ("/abs_evil.txt", "absolute path")],
)
def test_malicious_zip_is_refused(tmp_path: Path, name: str, fragment: str) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good.txt", b"ok")
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    dest = tmp_path / "work" / "dest"
    dest.parent.mkdir()
    before = listing(tmp_path)

    with pytest.raises(DownloadError) as exc:
        extract_archive(archive, dest)

    assert str(archive) in str(exc.value)
    assert name in str(exc.value)
    assert fragment in str(exc.value)
    assert not dest.exists()
    assert listing(tmp_path) == before
    assert not (tmp_path / "evil.txt").exists()
    assert not Path("/abs_evil.txt").exists()


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("fake_root", "outside the destination"),
        ("link_chain", "symlink pointing outside"),
        ("relinked", "symlink pointing outside"),
        ("hardlink_via_link", "hard link pointing outside"),
        ("write_through_link", "inside a symlinked directory"),
    ],
)
def test_tar_escapes_are_refused_without_the_stdlib_filter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, fragment: str
) -> None:
    """Paths are resolved as the filesystem would, following the archive's own symlinks, so
    these are refused on Pythons without tarfile's `data` filter (3.10.0-3.10.11, 3.11.0-3.11.3)
    where nothing else would stop them."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    work = tmp_path / "work"
    dest = work / "dest"
    work.mkdir()
    members = {
        # normalised against the old check's fake root "/__dest__", this looked inside
        "fake_root": [(_info("../__dest__/evil.txt"), b"evil")],
        # d/l is dest itself, so d/l/.. is dest's parent (a lexical normpath says "d")
        "link_chain": [
            (_info("d", tarfile.DIRTYPE), b""),
            (_info("d/l", tarfile.SYMTYPE, ".."), b""),
            (_info("e", tarfile.SYMTYPE, "d/l/.."), b""),
        ],
        # a -> b/.. is dest while b is a plain name; the later b -> . sends a outside
        "relinked": [
            (_info("a", tarfile.SYMTYPE, "b/.."), b""),
            (_info("b", tarfile.SYMTYPE, "."), b""),
        ],
        "hardlink_via_link": [
            (_info("d", tarfile.DIRTYPE), b""),
            (_info("d/l", tarfile.SYMTYPE, ".."), b""),
            (_info("h", tarfile.LNKTYPE, "d/l/../evil.txt"), b""),
        ],
        "write_through_link": [
            (_info("d", tarfile.DIRTYPE), b""),
            (_info("d/l", tarfile.SYMTYPE, ".."), b""),
            (_info("d/l/x.txt"), b"evil"),
        ],
    }[case]
    (work / "evil.txt").write_text("outside")
    archive = _tar_with(tmp_path / f"{case}.tar.gz", *members)
    before = listing(tmp_path)

    with pytest.raises(DownloadError) as exc:
        extract_archive(archive, dest)

    assert fragment in str(exc.value)
    assert str(archive) in str(exc.value)
    assert not dest.exists()
    assert listing(tmp_path) == before


def test_zip_member_through_the_fake_root_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../__dest__/x", b"evil")
    with pytest.raises(DownloadError, match="outside the destination"):
        extract_archive(archive, tmp_path / "dest")


def test_symlinks_that_stay_inside_are_extracted(tmp_path: Path, monkeypatch) -> None:
    """Links between the archive's own folders (d/up -> .., e -> d/up/d) stay allowed."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = _tar_with(
        tmp_path / "ok.tar.gz",
        (_info("d", tarfile.DIRTYPE), b""),
        (_info("d/f.txt"), b"abc"),
        (_info("d/up", tarfile.SYMTYPE, ".."), b""),
        (_info("e", tarfile.SYMTYPE, "d/up/d"), b""),
    )
    dest = tmp_path / "dest"
    extract_archive(archive, dest)
    assert (dest / "e" / "f.txt").read_bytes() == b"abc"


def test_zip_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("passwd")
        info.external_attr = (0o120777 << 16) | 0  # S_IFLNK | 0777, as written by `zip -y`
        zf.writestr(info, "/etc/passwd")
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="symlink pointing outside"):
        extract_archive(archive, dest)
    assert not dest.exists()


def test_safe_relative_symlink_is_allowed(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("d/real.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
        tf.addfile(_info("d/alias.txt", tarfile.SYMTYPE, "real.txt"))
    dest = tmp_path / "dest"
    extract_archive(archive, dest)
    assert (dest / "d/alias.txt").is_symlink()
    assert (dest / "d/alias.txt").read_bytes() == b"abc"


def test_truncated_archive_leaves_nothing_at_dest(tmp_path: Path) -> None:
    big = {f"dir/file{i}.bin": bytes([i]) * 20_000 for i in range(10)}
    data = make_tar(tmp_path / "full.tar.gz", big).read_bytes()
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    dest = tmp_path / "dest"

    with pytest.raises(DownloadError, match="corrupt or incomplete"):
        extract_archive(archive, dest)

    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tar.gz", "full.tar.gz"]


def test_unknown_archive_format_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "notes.txt"
    archive.write_text("not an archive")
    with pytest.raises(DownloadError, match="unsupported archive format"):
        extract_archive(archive, tmp_path / "dest")


# --------------------------------------------------------------------------------------------
# 5. Unreachable server / HTTP errors
# --------------------------------------------------------------------------------------------


def test_unreachable_url_gives_actionable_error(dead_url: str, tmp_path: Path) -> None:
    path = tmp_path / "data" / "data.tar.gz"
    checksum = "sha256:" + "ab" * 32

    with pytest.raises(DownloadError) as exc:
        download_url(dead_url, path, checksum, timeout=5, progress=False)

    message = str(exc.value)
    assert dead_url in message
    assert str(path) in message
    assert "ab" * 32 in message
    assert "offline" in message
    assert "refused" in message.lower()  # the underlying reason is shown
    assert "root" in message  # points to using an existing copy instead
    assert not path.exists()


def test_network_error_keeps_part_for_later_resume(
    server: FileServer, dead_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "data.tar.gz"
    part = tmp_path / "data.tar.gz.part"
    part.write_bytes(b"12345")
    with pytest.raises(DownloadError, match="resumes"):
        download_url(dead_url, path, None, timeout=5, progress=False)
    assert part.read_bytes() == b"12345"


def test_http_404_is_reported(server: FileServer, tmp_path: Path) -> None:
    url = server.url("missing.zip")
    with pytest.raises(DownloadError, match="HTTP 404") as exc:
        download_url(url, tmp_path / "missing.zip", None, progress=False)
    assert str(tmp_path / "missing.zip") in str(exc.value)
    assert not (tmp_path / "missing.zip").exists()


# --------------------------------------------------------------------------------------------
# 6. Existing verified files are not downloaded again
# --------------------------------------------------------------------------------------------


def test_existing_file_with_right_checksum_is_not_downloaded(
    server: FileServer, tmp_path: Path
) -> None:
    data = b"already here"
    url = server.add("have.bin", data)
    path = tmp_path / "have.bin"
    path.write_bytes(data)

    assert download_url(url, path, f"sha256:{sha256(data)}", progress=False) == path
    assert download_url(url, path, hashlib.md5(data).hexdigest(), progress=False) == path
    assert server.requests == []


def test_existing_file_needs_no_network_at_all(dead_url: str, tmp_path: Path) -> None:
    data = b"offline but fine"
    path = tmp_path / "data.tar.gz"
    path.write_bytes(data)
    assert download_url(dead_url, path, sha256(data), progress=False) == path


# --------------------------------------------------------------------------------------------
# Checksum parsing
# --------------------------------------------------------------------------------------------


def test_parse_checksum_forms() -> None:
    h64, h32 = "AB" * 32, "cd" * 16
    assert parse_checksum(f"sha256:{h64}") == ("sha256", h64.lower())
    assert parse_checksum(h64) == ("sha256", h64.lower())
    assert parse_checksum(f"MD5:{h32}") == ("md5", h32)
    assert parse_checksum(h32) == ("md5", h32)
    assert parse_checksum(f"sha1:{'0' * 40}") == ("sha1", "0" * 40)


@pytest.mark.parametrize("bad", ["abc", "sha256:1234", "md5:" + "z" * 32, "nope:" + "0" * 64])
def test_parse_checksum_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_checksum(bad)


def test_malformed_checksum_fails_before_any_request(server: FileServer, tmp_path: Path):
    url = server.add("x.bin", b"x")
    with pytest.raises(ValueError):
        download_url(url, tmp_path / "x.bin", "sha256:123", progress=False)
    assert server.requests == []
