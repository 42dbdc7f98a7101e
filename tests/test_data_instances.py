"""Instance data: FolderInstances (8/16-bit ids, JSON classes, instance_class, bad input),
COCOInstances and CityscapesInstances on fakes in their real layouts, joint augmentation of image,
semantic mask, instance masks and boxes, and the collation of instances."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fakes_instances import CLASSES, make_folder_instances
from fakes_zoo import make_fake_cityscapes, make_fake_coco
from PIL import Image

from seglight.data import DATASETS, CityscapesInstances, COCOInstances, FolderInstances
from seglight.data.base import collate
from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, mask_boxes
from seglight.errors import ConfigError, DataError


def folder(root, **kwargs) -> FolderInstances:
    return FolderInstances(root=str(root), num_workers=0, batch_size=2, **kwargs)


@pytest.mark.parametrize("bits,per_image_json", [(8, True), (16, True), (8, False)])
def test_folder_instances_read_ids_classes_and_semantic_mask(tmp_path, bits, per_image_json):
    expected = make_folder_instances(
        tmp_path, n=4, bits=bits, per_image_json=per_image_json,
        splits={"train": [0, 1, 2], "val": [3]},
    )  # fmt: skip
    dm = folder(tmp_path)
    assert DATASETS["FolderInstances"] is FolderInstances
    assert dm.class_names == tuple(CLASSES) and dm.num_classes == 3
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 1}
    for split in ("train", "val"):
        dataset = dm.datasets[split]
        for k, (image_path, _) in enumerate(dataset.pairs):
            ids, classes = expected[image_path.stem]
            _, semantic, masks, labels = dataset.load_instances(k)
            present = sorted(classes)
            assert len(present) >= 2
            assert labels.tolist() == [CLASSES.index(classes[i]) for i in present]
            for mask, i in zip(masks, present, strict=True):
                assert torch.equal(mask, torch.from_numpy((ids == i).astype(np.uint8)))
            lut = {0: 0, **{i: CLASSES.index(c) for i, c in classes.items()}}
            assert np.array_equal(semantic.numpy(), np.vectorize(lut.get)(ids))
    sample = dm.datasets["val"][0]  # evaluation: normalised, boxes are the masks' tight boxes
    boxes = sample["instances"]["boxes"]
    assert boxes.dtype == torch.float32 and sample["instances"]["masks"].dtype == torch.uint8
    ids, classes = expected["img003"]
    first = min(classes)
    ys, xs = np.nonzero(ids == first)
    assert boxes[0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_augmentation_keeps_boxes_masks_and_image_aligned(tmp_path):
    expected = make_folder_instances(tmp_path, n=3, size=(40, 48), instances_per_image=5)
    colours = (np.arange(256)[:, None] * np.array([23, 71, 113]) % 256).astype(int)
    torch.manual_seed(0)
    dropped = checked = 0
    for scale, min_agree in (((1.0, 1.0), 1.0), ((0.7, 1.6), 0.8)):
        dm = folder(tmp_path, val_fraction=0.0 + 1e-9, crop_size=(24, 28), scale_range=scale,
                    color_jitter=0.0, hflip=True)  # fmt: skip
        dm.setup("fit")
        dataset = dm.datasets["train"]
        for k in range(12):
            sample = dataset[k % len(dataset)]
            ids, classes = expected[dataset.pairs[k % len(dataset)][0].stem]
            image = denormalize(sample["image"], IMAGENET_MEAN, IMAGENET_STD).permute(1, 2, 0)
            # the id each pixel's colour encodes (image_from_mask: one colour per id, +-6 noise)
            dist = (image[:, :, None, :].int() - torch.from_numpy(colours)[None, None]) ** 2
            decoded = dist.sum(-1).argmin(-1)
            # pixels whose colour is one id's (+- the noise); rescaling blends colours at edges
            clean = dist.sum(-1).amin(-1) <= 3 * 6**2
            inst = sample["instances"]
            assert inst["masks"].shape[-2:] == sample["mask"].shape == (24, 28)
            assert torch.equal(inst["boxes"], mask_boxes(inst["masks"]))
            assert bool(inst["masks"].flatten(1).any(1).all()), "an empty instance was kept"
            dropped += len(classes) - len(inst["masks"])
            for mask, label in zip(inst["masks"].bool(), inst["labels"], strict=True):
                # the semantic mask moved with them, exactly (the same nearest-exact resampling)
                assert (sample["mask"][mask] == label).all()
                if (mask & clean).sum() < 4:  # shrunk to its blended edges: nothing to decode
                    continue
                checked += 1
                values, counts = decoded[mask & clean].unique(return_counts=True)
                instance_id = int(values[counts.argmax()])
                assert counts.max() / counts.sum() >= min_agree
                assert CLASSES.index(classes[instance_id]) == label
    assert checked >= 30
    assert dropped > 0, "no instance ever left a crop: the test does not exercise dropping"


def test_folder_instances_bad_input_is_a_clear_error(tmp_path):
    make_folder_instances(tmp_path, n=3, splits={"train": [0, 1], "val": [2]})
    inst = tmp_path / "instances"

    def error(match: str) -> None:
        with pytest.raises(DataError, match=match):
            folder(tmp_path).setup("fit")

    # an instance image of another size than its image
    good = Image.open(inst / "img000.png")
    Image.new("L", (good.width + 1, good.height)).save(inst / "img000.png")
    error(r"img000.png' is 32x41 but its image is 32x40")
    good.save(inst / "img000.png")
    # an id that the image's JSON does not map
    spec = json.loads((inst / "img001.json").read_text())
    missing = next(iter(spec))
    (inst / "img001.json").write_text(json.dumps({k: v for k, v in spec.items() if k != missing}))
    error(rf"img001.png': ids \[{missing}\] have no class in .*img001.json")
    # a class name that is not an instance class, or the background
    (inst / "img001.json").write_text(json.dumps({**spec, missing: "tumour"}))
    error(r"class\(es\) \['tumour'\] are not instance classes")
    (inst / "img001.json").write_text(json.dumps({**spec, missing: "background"}))
    error(r"\['background'\] are not instance classes .* class 0, background, is the background")
    (inst / "img001.json").write_text(json.dumps(spec))
    # more instances than an 8-bit file holds
    (inst / "img002.json").write_text(json.dumps({"1": "cell", "300": "cell"}))
    error(r"maps ids above 255 but .*img002.png' is an 8-bit image.*16-bit PNGs \(mode I;16\)")
    # no JSON and no instance_class
    (inst / "img002.json").unlink()
    error(r"img002.png' has instances but neither img002.json nor `instance_class`")
    # a colour instance image
    Image.new("RGB", (40, 32)).save(inst / "img002.png")
    error(r"img002.png' is a RGB image; expected single-channel 8- or 16-bit instance ids")
    # an empty instance image is allowed: no instances, all background
    Image.new("L", (40, 32)).save(inst / "img002.png")
    dm = folder(tmp_path)
    dm.setup("fit")
    sample = dm.datasets["val"][0]
    assert len(sample["instances"]["labels"]) == 0
    assert sample["instances"]["boxes"].shape == (0, 4)
    assert sample["instances"]["masks"].shape == (0, 32, 40)
    assert (sample["mask"] == 0).all()
    # classes.yaml: instance_class must be an instance class
    (tmp_path / "classes.yaml").write_text("classes: [background, cell]\ninstance_class: dog\n")
    with pytest.raises(ConfigError, match="instance_class 'dog' is not one of"):
        folder(tmp_path)


def test_folder_instances_checks_every_file_when_loaded_unchecked(tmp_path):
    make_folder_instances(tmp_path, n=2, splits={"train": [0], "val": [1]})
    (tmp_path / "instances" / "img001.json").write_text("{}")
    dm = folder(tmp_path, check_masks=False)
    dm.setup("fit")  # not checked up front: the error comes when the file is read
    with pytest.raises(DataError, match=r"img001.png': ids \[\d(, \d)*\] have no class"):
        dm.datasets["val"][0]


def test_coco_instances_exclude_crowds_and_zero_area(tmp_path):
    root = tmp_path / "coco"
    make_fake_coco(root)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    degenerate = {"id": 999, "image_id": 139, "category_id": 5, "iscrowd": 0, "area": 0.0,
                  "bbox": [3, 3, 0, 0], "segmentation": [[3.0, 3.0, 3.0, 3.0, 3.0, 3.0]]}  # fmt: skip
    data["annotations"].append(degenerate)  # a zero-area box: dropped
    path.write_text(json.dumps(data))
    dm = COCOInstances(root=str(root), num_workers=0, crop_size=None)
    dm.setup("validate")
    sample = dm.datasets["val"][0]
    names = [COCOInstances.class_names[k] for k in sample["instances"]["labels"]]
    assert names == ["dog", "person", "toothbrush", "car"]  # the crowd is no instance
    boxes = sample["instances"]["boxes"].tolist()
    assert (
        boxes[0] == [6, 6, 14, 14] and boxes[1] == [2, 2, 30, 22] and boxes[3] == [10, 30, 16, 36]
    )
    assert int(sample["instances"]["masks"][0].sum()) == 64
    assert sample["mask"][27, 2] == 255  # the semantic mask is COCO's: crowd ignored
    empty = dm.datasets["val"][1]
    assert len(empty["instances"]["labels"]) == 0 and (empty["mask"] == 0).all()


def test_cityscapes_instances_from_instance_ids(tmp_path):
    root = make_fake_cityscapes(tmp_path / "cityscapes")
    dm = CityscapesInstances(root=str(root), num_workers=0, crop_size=None)
    assert dm.num_classes == 9 and dm.class_names[1] == "person"
    dm.setup("validate")
    dataset = dm.datasets["val"]
    for k, (_, labels_path) in enumerate(dataset.pairs):
        label_ids = np.array(Image.open(labels_path))
        sample = dataset[k]
        things = {24: 1, 25: 2, 26: 3, 27: 4, 28: 5, 31: 6, 32: 7, 33: 8}
        present = [v for v in sorted(np.unique(label_ids)) if v in things]
        assert sample["instances"]["labels"].tolist() == [things[v] for v in present]
        for mask, v in zip(sample["instances"]["masks"], present, strict=True):
            assert np.array_equal(mask.numpy(), (label_ids == v).astype(np.uint8))
        semantic = sample["mask"].numpy()
        assert (semantic[label_ids == 7] == 0).all()  # road: background
        assert (semantic[label_ids == 0] == 255).all()  # unlabeled: ignored
        assert (semantic[label_ids == 26] == 3).all()  # car


def test_collate_pads_instance_masks_with_the_images():
    def sample(h, w, n):
        masks = torch.ones((n, h, w), dtype=torch.uint8)
        return {"image": torch.zeros(3, h, w), "mask": torch.zeros(h, w, dtype=torch.long),
                "name": "x", "instances": {"boxes": torch.zeros(n, 4), "labels": torch.ones(n,
                dtype=torch.long), "masks": masks}}  # fmt: skip

    batch = collate([sample(10, 12, 2), sample(14, 9, 0)])
    assert batch["image"].shape == (2, 3, 14, 12)
    assert [t["masks"].shape for t in batch["instances"]] == [(2, 14, 12), (0, 14, 12)]
    assert batch["instances"][0]["masks"][:, 10:].sum() == 0
    assert batch["instances"][0]["masks"][:, :10, :12].all()
