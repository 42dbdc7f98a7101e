"""FolderInstances' edge cases: a folder without any instance stops fit in one line (as a Folder
class without pixels does), predict without a test split names --data.predict_split, and a
predict that detected nothing says so."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fakes_instances import make_folder_instances
from test_start_checks import TRAINER, assert_nothing_written, cli_error

from seglight.callbacks import PredictionWriter
from seglight.data import FolderInstances
from seglight.errors import DataError


def test_an_instance_folder_without_instances_stops_fit(tmp_path, capsys):
    root = tmp_path / "cells"
    make_folder_instances(root, n=6, per_image_json=False, instances_per_image=0)
    argv = ["fit", "--model", "UNet", "--model.encoder", "original", "--model.base_channels", "4",
            *TRAINER, "--data", "FolderInstances", "--data.root", str(root),
            "--data.num_workers", "0"]  # fmt: skip
    error = cli_error(capsys, argv)
    assert "1 (cell)" in error and "2 (nucleus)" in error and "no instance" in error, error
    assert "allow_empty_classes" in error
    assert_nothing_written(Path.cwd())


def test_predict_without_a_test_split_names_predict_split(tmp_path):
    make_folder_instances(tmp_path / "cells", n=4, splits={"train": [0, 1], "val": [2, 3]})
    dm = FolderInstances(root=str(tmp_path / "cells"), num_workers=0)
    with pytest.raises(DataError, match=r"no split 'test' .*--data.predict_split val"):
        dm.setup("predict")


def test_a_predict_without_any_detection_says_so(tmp_path, capsys):
    writer = PredictionWriter(output_dir=str(tmp_path / "out"), overlays=False, original_size=False)
    trainer = SimpleNamespace(
        is_global_zero=True, default_root_dir=str(tmp_path), datamodule=None,
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t),
    )  # fmt: skip
    module = SimpleNamespace(num_classes=3, class_names=["background", "cell", "nucleus"])
    none = {
        "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
        "masks": torch.zeros(0, 1, 8, 8), "boxes": torch.zeros(0, 4),
    }  # fmt: skip
    writer.on_predict_start(trainer, module)
    prediction = {"pred": torch.zeros(3, 8, 8), "name": ["a", "b", "c"], "instances": [none] * 3}
    writer.write_on_batch_end(trainer, module, prediction, None, None, 0)
    writer.on_predict_end(trainer, module)
    out = capsys.readouterr().out
    assert "wrote 3 masks" in out and "no instance detected in any of the 3 images" in out, out
    assert writer.last_written["predict/detections"] == 0
