"""Mask R-CNN: the instance -> semantic conversion, COCO mask/box AP against pycocotools' COCOeval
run directly, the network in training and evaluation, torchvision's COCO weights from a local
file, the CLI (fit, test, predict) on tiny instance data, and DDP."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_fake_camvid, run_cli
from fakes_instances import make_folder_instances
from fakes_zoo import make_fake_coco
from PIL import Image
from torch import nn

from seglight.cli import run
from seglight.data import COCOInstances
from seglight.errors import ConfigError
from seglight.models import MODELS, MaskRCNN, MaskRCNNNetwork
from seglight.models.maskrcnn import instances_to_semantic

#: a cheap configuration for tests: a small timm encoder, 64-pixel images, fewer RoIs
SMALL = {
    "encoder": "resnet18",
    "min_size": 64,
    "max_size": 96,
    "detections_per_img": 10,
    "detector_options": {
        "rpn_pre_nms_top_n_train": 200,
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 100,
        "rpn_post_nms_top_n_test": 50,
        "box_batch_size_per_image": 32,
    },
}
SMALL_ARGS = [
    "--model.encoder", "resnet18", "--model.min_size", "64",
    "--model.max_size", "96", "--model.detections_per_img", "10", "--model.detector_options", json.dumps(SMALL["detector_options"]),
]  # fmt: skip


def test_instances_to_semantic_hand_built_case():
    # 3 instances on a 2x4 image, classes: 0 background, 1 cat, 2 dog
    probs = torch.tensor(
        [
            [[0.9, 0.9, 0.2, 0.0], [0.6, 0.0, 0.0, 0.0]],  # cat, score 0.8
            [[0.0, 0.7, 0.9, 0.0], [0.0, 0.0, 0.0, 0.0]],  # dog, score 0.9
            [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]],  # cat, score 0.4 (below 0.5: unused)
        ]
    )
    out = instances_to_semantic(
        probs[:, None], torch.tensor([1, 2, 1]), torch.tensor([0.8, 0.9, 0.4]), 3
    )
    cat = [[0.72, 0.72, 0.0, 0.0], [0.48, 0.0, 0.0, 0.0]]  # 0.8 x prob where prob >= 0.5
    dog = [[0.0, 0.63, 0.81, 0.0], [0.0, 0.0, 0.0, 0.0]]
    background = [[0, 0, 0, 1], [0, 1, 1, 1]]
    assert torch.allclose(out, torch.tensor([background, cat, dog]).float())
    # at (0, 1) cat 0.72 beats dog 0.63: the higher score x probability wins
    assert out.argmax(0).tolist() == [[1, 1, 2, 0], [1, 0, 0, 0]]
    # with a lower score threshold the third instance counts, in its own (max) way
    low = instances_to_semantic(
        probs, torch.tensor([1, 2, 1]), torch.tensor([0.8, 0.9, 0.4]), 3, score_threshold=0.3
    )
    assert low.argmax(0).tolist() == [[1, 1, 2, 0], [1, 1, 1, 0]]
    assert low[1, 1, 0] == pytest.approx(max(0.48, 0.4))
    # no instances: all background
    empty = instances_to_semantic(torch.zeros(0, 1, 2, 4), torch.zeros(0).long(), torch.zeros(0), 3)
    assert (empty.argmax(0) == 0).all()


# ----------------------------------------------------------------------------- COCO AP
def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _random_scene(rng: np.random.Generator, h: int, w: int, n: int) -> list[tuple[int, np.ndarray]]:
    objects = []
    for _ in range(n):
        bh, bw = int(rng.integers(3, h // 2)), int(rng.integers(3, w // 2))
        top, left = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        mask = np.zeros((h, w), bool)
        mask[top : top + bh, left : left + bw] = True
        mask[top, left] = False  # not exactly a box: mask and box AP differ
        objects.append((int(rng.integers(1, 3)), mask))
    return objects


class _FixedDetections(nn.Module):
    """A stand-in network that returns given detections (the model's evaluation path is real)."""

    def __init__(self, detections: list[list[dict]], num_classes: int) -> None:
        super().__init__()
        self.detections = detections
        self.num_classes = num_classes
        self.calls = 0

    def forward(self, images: torch.Tensor) -> dict:
        dets = self.detections[self.calls]
        self.calls += 1
        semantic = torch.stack(
            [
                instances_to_semantic(d["masks"], d["labels"], d["scores"], self.num_classes)
                for d in dets
            ]
        )
        return {"out": semantic, "detections": dets}


def test_mask_and_box_map_match_pycocotools_cocoeval():
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    h, w = 48, 64
    gt_json = {"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 2}]}
    dt_json = []
    batches = []
    for image_id in range(4):
        truth = _random_scene(rng, h, w, 4)
        dets = []
        for label, mask in truth:  # detections: shifted, some relabelled, plus false positives
            shifted = np.roll(mask, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), (0, 1))
            dets.append((label if rng.random() > 0.2 else 3 - label, shifted, float(rng.random())))
        dets += [(lab, m, float(rng.random()) * 0.5) for lab, m in _random_scene(rng, h, w, 2)]
        gt_json["images"].append({"id": image_id, "height": h, "width": w})
        for label, mask in truth:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x0, y0, x1, y1 = _box(mask)
            gt_json["annotations"].append(
                {"id": len(gt_json["annotations"]) + 1, "image_id": image_id, "category_id": label,
                 "segmentation": rle, "area": float(mask.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0],
                 "iscrowd": 0}
            )  # fmt: skip
        for label, mask, score in dets:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x0, y0, x1, y1 = _box(mask)
            dt_json.append(
                {"image_id": image_id, "category_id": label, "segmentation": rle, "score": score,
                 "bbox": [x0, y0, x1 - x0, y1 - y0]}
            )  # fmt: skip
        instances = {
            "boxes": torch.tensor([_box(m) for _, m in truth]),
            "labels": torch.tensor([lab for lab, _ in truth]),
            "masks": torch.from_numpy(np.stack([m for _, m in truth]).astype(np.uint8)),
        }
        detections = {
            "boxes": torch.tensor([_box(m) for _, m, _ in dets]),
            "labels": torch.tensor([lab for lab, _, _ in dets]),
            "scores": torch.tensor([s for _, _, s in dets]),
            # probabilities: 0.7 inside, 0.2 outside (the model thresholds them at 0.5)
            "masks": torch.from_numpy(np.stack([m for _, m, _ in dets]) * 0.5 + 0.2)[:, None],
        }
        batches.append(({"image": torch.zeros(1, 3, h, w), "mask": torch.zeros(1, h, w).long(),
                         "instances": [instances]}, [detections]))  # fmt: skip

    model = MaskRCNN(num_classes=3, class_names=["background", "a", "b"], **SMALL)
    model.net = _FixedDetections([d for _, d in batches], 3)
    model.eval()
    with torch.no_grad():
        for batch, _ in batches:
            model._eval_step(batch, "test")
    logs = model._log_metrics("test")

    coco = COCO()
    coco.dataset = gt_json
    coco.createIndex()
    for iou_type, name in (("segm", "mask"), ("bbox", "bbox")):
        evaluator = COCOeval(coco, coco.loadRes(dt_json), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        stats = evaluator.stats
        keys = ["", "50", "75", "_small", "_medium", "_large"]
        for k, suffix in enumerate(keys):
            ours = float(logs[f"test/{name}_mAP{suffix}"])
            if stats[k] < 0:
                assert np.isnan(ours), (name, suffix)
            else:
                assert ours == pytest.approx(stats[k], abs=1e-6), (name, suffix)
        assert 0.05 < stats[0] < 0.95  # a non-trivial case
    # per-class AP, as the test table shows it
    assert {k for k in logs if "_AP/" in k} == {
        "test/mask_AP/a", "test/mask_AP/b", "test/bbox_AP/a", "test/bbox_AP/b"
    }  # fmt: skip


# ----------------------------------------------------------------------------- the network
def test_network_semantic_output_at_odd_sizes_and_training_losses():
    torch.manual_seed(0)
    model = MaskRCNN(num_classes=3, **SMALL)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 131)).shape == (1, 3, 97, 131)
        out = model.net(torch.randn(1, 3, 33, 47))
    assert set(out["detections"][0]) == {"boxes", "labels", "scores", "masks"}
    gray = MaskRCNN(num_classes=3, in_channels=1, **SMALL).eval()
    with torch.no_grad():
        assert gray(torch.randn(1, 1, 45, 61)).shape == (1, 3, 45, 61)
    model.train()
    masks = torch.zeros(2, 40, 48, dtype=torch.uint8)
    masks[0, 5:20, 4:30] = 1
    masks[1, 22:38, 10:20] = 1
    batch = {
        "image": torch.randn(2, 3, 40, 48),
        "mask": torch.zeros(2, 40, 48).long(),
        "instances": [
            {"boxes": torch.tensor([[4.0, 5, 30, 20], [10, 22, 20, 38]]),
             "labels": torch.tensor([1, 2]), "masks": masks},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long(),
             "masks": torch.zeros(0, 40, 48, dtype=torch.uint8)},  # an image without instances
        ],
    }  # fmt: skip
    losses = model.net(batch["image"], model._targets(batch))
    assert set(losses) == {
        "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"
    }  # fmt: skip
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    heads = model.net.detector.roi_heads
    for module in (heads.mask_predictor, heads.box_predictor, model.net.detector.rpn.head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    # the backbone is the `encoder` (encoder_lr_mult), registered once
    assert model.net.encoder is model.net.detector.backbone.body
    assert not any(k.startswith("net.encoder") for k in model.state_dict())
    with pytest.raises(ConfigError, match="trains on instance targets"):
        model.net(batch["image"])


def test_bad_options_are_clear():
    with pytest.raises(ConfigError, match="needs the background and at least one object class"):
        MaskRCNN(num_classes=1)
    with pytest.raises(ConfigError, match="inference recipes .* do not apply"):
        MaskRCNN(num_classes=3, inference={"flip": True}, **SMALL)
    with pytest.raises(ConfigError, match="encoder_weights is for timm encoders"):
        MaskRCNNNetwork(3, encoder_weights="imagenet")
    with pytest.raises(
        ConfigError, match=r"detector_options: unknown option\(s\) \['unknown_option'\]"
    ):
        MaskRCNN(num_classes=3, detector_options={"unknown_option": 1})


def test_coco_weights_from_a_local_file(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    torch.manual_seed(0)
    reference = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "maskrcnn_resnet50_fpn_v2_coco.pth"
    torch.save(reference.state_dict(), path)
    names = ["background", "person", "rider", "car"]  # rider is no COCO category
    model = MaskRCNN(num_classes=4, class_names=names, weights=str(path), min_size=64, max_size=96)
    ours, theirs = model.net.detector.state_dict(), reference.state_dict()
    assert torch.equal(
        ours["backbone.body.layer4.2.conv3.weight"], theirs["backbone.body.layer4.2.conv3.weight"]
    )
    cls, box = (
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.bbox_pred.weight",
    )
    mask = "roi_heads.mask_predictor.mask_fcn_logits.weight"
    for row, coco in ((0, 0), (1, 1), (3, 3)):  # background, person, car: COCO's rows
        assert torch.equal(ours[cls][row], theirs[cls][coco])
        assert torch.equal(ours[box][4 * row : 4 * row + 4], theirs[box][4 * coco : 4 * coco + 4])
        assert torch.equal(ours[mask][row], theirs[mask][coco])
    assert not any(torch.equal(ours[cls][2], theirs[cls][k]) for k in range(91))  # rider: new
    # torchvision's recipe with COCO weights: the first two stages stay frozen
    assert not model.net.detector.backbone.body.layer1[0].conv1.weight.requires_grad
    assert model.net.detector.backbone.body.layer2[0].conv1.weight.requires_grad
    # a missing file, another network's file, a timm encoder: one clear line each
    with pytest.raises(ConfigError, match=r"weights: no such file .*never downloads") as e:
        MaskRCNN(num_classes=4, weights=str(tmp_path / "absent.pth"))
    assert "\n" not in str(e.value)
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"other.pth' is not a state dict of torchvision's Mask"):
        MaskRCNN(num_classes=4, weights=str(tmp_path / "other.pth"))
    with pytest.raises(ConfigError, match="for encoder resnet50 on 3-channel images"):
        MaskRCNN(num_classes=4, weights=str(path), encoder="resnet18")


# ----------------------------------------------------------------------------- the CLI
def test_cli_fit_predict_on_tiny_coco_and_test_on_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_fake_coco(tmp_path / "coco")
    common = ["--config", str(REPO / "experiments" / "maskrcnn.yaml"), *SMALL_ARGS,
              "--data.root", str(tmp_path / "coco"), "--data.num_workers", "0",
              "--data.allow_empty_classes", "true",
              "--trainer.accelerator", "cpu"]  # fmt: skip
    run_dir = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run(
            ["fit", *common, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(run_dir)]
        )
    assert cli.trainer.global_step == 1
    # no evaluation loss to average: none computed, none logged as nan, nothing to warn about
    assert not [w for w in caught if "was called before the ``update``" in str(w.message)]
    assert "val/loss" not in cli.trainer.callback_metrics
    logged = cli.trainer.callback_metrics
    for key in ("train/loss_mask", "train/loss_classifier", "train/loss_objectness"):
        assert key in logged or f"{key}_epoch" in logged, key
    summary = json.loads((run_dir / "metrics.json").read_text())
    for key in ("mIoU", "mask_mAP", "mask_mAP50", "bbox_mAP", "bbox_mAP75", "mask_mAP_small"):
        assert key in summary["val"], key
    # the history records AP at each validation; the best is chosen on mask AP
    assert {"mask_mAP", "mask_mAP50", "mIoU", "step"} <= set(summary["history"][-1])
    assert summary["best_val"]["monitor"] == "val/mask_mAP"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "predictions"
    run(["predict", *common, "--ckpt_path", str(ckpt), "--model.semantic_score_thresh", "0.0",
         "--trainer.callbacks+=seglight.callbacks.PredictionWriter",
         "--trainer.callbacks.output_dir", str(out)])  # fmt: skip
    for stem in ("000000000139", "000000000285"):
        assert Image.open(out / f"{stem}.png").mode == "P"  # the semantic mask
        ids = Image.open(out / "instances" / f"{stem}.png")
        assert ids.mode == "I;16" and ids.size == (48, 40)
        mapping = json.loads((out / "instances" / f"{stem}.json").read_text())
        assert set(mapping) == {str(i) for i in np.unique(np.array(ids)) if i} or not mapping
        assert set(mapping.values()) <= set(COCOInstances.class_names[1:])
        assert (out / "overlays" / f"{stem}_instances.jpg").is_file()
        assert (out / "overlays" / f"{stem}.jpg").is_file()
    # test (COCO has no labelled test split): FolderInstances, per-class AP in the table
    make_folder_instances(tmp_path / "cells", n=3, splits={"train": [0], "val": [1], "test": [2]})
    # the README's form for users' data: the COCO experiment with --data FolderInstances
    cells = tmp_path / "cells"
    run(["test", "--config", str(REPO / "experiments" / "maskrcnn.yaml"), *SMALL_ARGS,
         "--data", "FolderInstances", "--data.root", str(cells), "--data.num_workers", "0",
         "--data.batch_size", "1", "--trainer.accelerator", "cpu", "--model.box_score_thresh",
         "0.0", "--trainer.default_root_dir", str(tmp_path / "t")])  # fmt: skip
    summary = json.loads((tmp_path / "t" / "metrics.json").read_text())
    test = next(e["metrics"] for e in summary["evaluations"] if e["stage"] == "test")
    assert {"mask_AP/cell", "mask_AP/nucleus", "bbox_AP/cell", "mIoU"} <= set(test)


def test_instance_models_choose_their_best_checkpoint_on_mask_map(tmp_path):
    import lightning as L
    import yaml

    from seglight.callbacks import ModelCheckpoint
    from seglight.callbacks.checkpoints import best_metric

    defaults = yaml.safe_load((REPO / "experiments" / "defaults.yaml").read_text())
    (options,) = [
        c["init_args"]
        for c in defaults["trainer"]["callbacks"]
        if "ModelCheckpoint" in c["class_path"]
    ]
    assert options["monitor"] == "auto" and "mode" not in options and "filename" not in options
    checkpoint = ModelCheckpoint(**options)
    trainer = L.Trainer(
        default_root_dir=str(tmp_path), callbacks=[checkpoint], logger=False, accelerator="cpu"
    )
    model = MaskRCNN(num_classes=3, **SMALL)
    checkpoint.setup(trainer, model, "fit")
    assert (checkpoint.monitor, checkpoint.mode) == ("val/mask_mAP", "max")
    assert checkpoint.filename == "epoch{epoch:03d}-mask_map{val/mask_mAP:.4f}"
    assert best_metric(trainer, model) == ("val/mask_mAP", "max")  # best_val's, the summary's


@pytest.mark.slow
def test_study_config_chooses_on_mask_map_and_records_its_curve(tmp_path, capsys):
    """experiments/cpu/maskrcnn_synthetic.yaml as scripts/study.py runs it (step-based validation,
    max_epochs -1): the best checkpoint and best_val are chosen on val/mask_mAP, and the history
    holds mask_mAP and mask_mAP50 at every validation."""
    run_dir = tmp_path / "run"
    cli = run(
        ["fit", "--config", str(REPO / "experiments" / "cpu" / "maskrcnn_synthetic.yaml"),
         *SMALL_ARGS, "--data.num_val", "2", "--data.image_size", "[48, 48]",
         "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
         "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(run_dir)]
    )  # fmt: skip
    checkpoint = cli.trainer.checkpoint_callback
    assert (checkpoint.monitor, checkpoint.mode) == ("val/mask_mAP", "max")
    assert Path(checkpoint.best_model_path).name.startswith("epoch000-mask_map")
    summary = json.loads((run_dir / "metrics.json").read_text())
    history = summary["history"]
    assert [h["step"] for h in history] == [2, 4]
    assert all(h["mask_mAP"] is not None and h["mask_mAP50"] is not None for h in history)
    best = summary["best_val"]
    assert best["monitor"] == "val/mask_mAP"
    assert best["mask_mAP"] == max(h["mask_mAP"] for h in history)
    assert float(checkpoint.best_model_score) == pytest.approx(best["mask_mAP"])
    assert f"best val/mask_mAP  {best['mask_mAP']:.4f}" in capsys.readouterr().err


def test_maskrcnn_on_semantic_data_is_a_clear_error(tmp_path):
    root = make_fake_camvid(tmp_path / "camvid", {"train": 2, "val": 1, "test": 1})
    args = ["fit", "--model", "MaskRCNN", *SMALL_ARGS, "--data", "CamVid", "--data.root",
            str(root), "--data.num_workers", "0", "--trainer.max_steps", "1",
            "--trainer.accelerator", "cpu", "--trainer.logger", "false"]  # fmt: skip
    with pytest.raises(
        ConfigError, match="MaskRCNN trains on instance data; CamVid has no instances"
    ):
        run(args)


@pytest.mark.slow
def test_ddp_validation_gives_the_same_map_as_one_process(tmp_path):
    # 5 val images on 2 ranks (one rank gets 3): each counted exactly once
    root = tmp_path / "cells"
    make_folder_instances(root, n=7, splits={"train": [0, 1], "val": [2, 3, 4, 5, 6]})
    common = ["--config", str(REPO / "experiments" / "maskrcnn.yaml"), *SMALL_ARGS,
              "--data", "FolderInstances", "--data.root", str(root),
              "--data.num_workers", "0", "--data.val_batch_size", "1", "--trainer.accelerator", "cpu",
              "--model.box_score_thresh", "0.0"]  # fmt: skip
    run_cli(["fit", *common, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "fit")],
            cwd=tmp_path)  # fmt: skip
    ckpt = str(tmp_path / "fit" / "checkpoints" / "last.ckpt")
    results = {}
    for devices in ("1", "2"):
        out = tmp_path / f"val{devices}"
        run_cli(["validate", *common, "--ckpt_path", ckpt, "--trainer.strategy", "ddp",
                 "--trainer.devices", devices, "--trainer.default_root_dir", str(out)],
                cwd=tmp_path)  # fmt: skip
        (evaluation,) = json.loads((out / "metrics.json").read_text())["evaluations"]
        results[devices] = evaluation["metrics"]
    single, ddp = results["1"], results["2"]
    # acc is the background share over all 5 images: a lost or repeated image changes it (after
    # 2 steps the AP may be 0; test_map_gather_over_two_processes checks non-zero AP)
    for key in ("mask_mAP", "mask_mAP50", "bbox_mAP", "bbox_mAP50", "mIoU", "acc"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key


def _map_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from seglight.models.maskrcnn import _gather_states, _mean_ap

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    preds, targets = _ap_fixture()
    metric = _mean_ap(class_metrics=False)
    share = [0, 1, 2] if rank == 0 else [3, 4]  # uneven, as seglight's evaluation sampler gives
    for i in share:
        metric.update([preds[i]], [targets[i]])
    _gather_states(metric)
    values = metric.compute()
    torch.save({k: v for k, v in values.items() if k.endswith(("map", "map_50"))}, f"{out}.{rank}")
    dist.destroy_process_group()


def _ap_fixture() -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(1)
    preds, targets = [], []
    for _ in range(5):
        truth = _random_scene(rng, 40, 48, 3)
        masks = np.stack([m for _, m in truth])
        shifted = np.roll(masks, 1, axis=2)
        targets.append({"boxes": torch.tensor([_box(m) for m in masks]),
                        "labels": torch.tensor([lab for lab, _ in truth]),
                        "masks": torch.from_numpy(masks)})  # fmt: skip
        preds.append({"boxes": torch.tensor([_box(m) for m in shifted]),
                      "labels": torch.tensor([lab for lab, _ in truth]),
                      "scores": torch.from_numpy(rng.random(len(truth))).float(),
                      "masks": torch.from_numpy(shifted)})  # fmt: skip
    return preds, targets


@pytest.mark.slow
def test_map_gather_over_two_processes_matches_one(tmp_path):
    import socket

    from seglight.models.maskrcnn import _mean_ap

    preds, targets = _ap_fixture()
    single = _mean_ap(class_metrics=False)
    single.update(preds, targets)
    expected = single.compute()
    assert 0.1 < float(expected["segm_map"]) < 1.0  # non-trivial
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_map_worker, args=(2, port, str(tmp_path / "map")), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"map.{rank}", weights_only=True)
        for key, value in got.items():
            assert float(value) == pytest.approx(float(expected[key]), abs=1e-6), (rank, key)


def test_registry_declares_the_instance_model():
    assert MODELS["MaskRCNN"] is MaskRCNN and MaskRCNN.instance_model
    assert not MODELS["UNet"].instance_model
