"""The suite's disk use: a passed test's tmp_path is removed at its teardown (pyproject's
tmp_path_retention_policy). The experiment tests write real checkpoints; kept, one run of the
suite left 22 GB and filled CI's disk mid-run."""

from __future__ import annotations

from pathlib import Path

_written: list[Path] = []


def test_passed_test_writes_into_tmp_path(tmp_path):
    marker = tmp_path / "checkpoint.bin"
    marker.write_bytes(b"\0" * 1024)
    _written.append(tmp_path)
    assert marker.exists()


def test_passed_test_tmp_path_is_gone(request):
    assert request.config.getini("tmp_path_retention_policy") == "failed"
    assert _written, "the writing test above did not run first"
    assert not _written[0].exists(), f"{_written[0]} was kept after its test passed"
