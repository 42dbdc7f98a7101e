"""SyntheticInstances: the procedural instance set (no files): determinism, the instance contract,
instances consistent with the semantic mask, and flips through the loader keeping image, masks
and boxes aligned."""

from __future__ import annotations

import pytest
import torch

from seglight.data import DATASETS, SyntheticInstances
from seglight.data.synthetic_instances import make_instances
from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, mask_boxes
from seglight.errors import DataError


def tiny(**kwargs) -> SyntheticInstances:
    options = {"num_train": 6, "num_val": 4, "num_test": 2, "image_size": (40, 48)}
    return SyntheticInstances(**{**options, **kwargs})


def test_registered_by_its_short_name():
    assert DATASETS["SyntheticInstances"] is SyntheticInstances
    assert SyntheticInstances.has_instances
    assert tiny().num_classes == 4 == len(tiny().palette)


def test_samples_are_deterministic_and_splits_differ():
    dm = tiny()
    dm.setup("fit")
    a, b = dm.datasets["val"][1], dm.datasets["val"][1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    for key in ("boxes", "labels", "masks"):
        assert torch.equal(a["instances"][key], b["instances"][key])
    assert a["name"] == b["name"] != dm.datasets["val"][2]["name"]
    dm.setup("test")
    assert not torch.equal(dm.datasets["test"][1]["image"], a["image"])


def test_samples_follow_the_instance_contract():
    dm = tiny()
    dm.setup("fit")
    seen = set()
    for i in range(4):
        sample = dm.datasets["val"][i]
        inst = sample["instances"]
        n = len(inst["labels"])
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 40, 48)
        assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (40, 48)
        assert inst["boxes"].dtype == torch.float32 and inst["boxes"].shape == (n, 4)
        assert inst["labels"].dtype == torch.int64 and inst["masks"].dtype == torch.uint8
        assert inst["masks"].shape == (n, 40, 48) and n >= 1
        assert ((inst["labels"] >= 1) & (inst["labels"] < dm.num_classes)).all()
        assert torch.equal(inst["boxes"], mask_boxes(inst["masks"]))
        seen.update(inst["labels"].tolist())
    assert len(seen) >= 2


def test_instance_masks_are_disjoint_and_make_the_semantic_mask():
    for seed in range(30):
        image, mask, masks, labels = make_instances((64, 64), seed, max_instances=4)
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
        assert 1 <= len(labels) <= 4 and masks.flatten(1).any(1).all()
        assert masks.sum(0).max() <= 1, "instances overlap"
        semantic = (masks * labels.view(-1, 1, 1)).sum(0)
        assert torch.equal(semantic.to(torch.uint8), mask)
        # separable: boxes grown by one pixel do not meet (no two instances touch)
        boxes = mask_boxes(masks)
        for i in range(len(boxes)):
            for j in range(i):
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[i].tolist(), boxes[j].tolist()
                assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0


def test_flip_through_the_loader_keeps_image_masks_and_boxes_aligned():
    dm = tiny(batch_size=3, hflip=True, color_jitter=0.0, crop_size=None)
    dm.setup("fit")
    torch.manual_seed(0)
    raw = [make_instances((40, 48), 0 + i) for i in range(6)]  # the train split's seeds: 0..5
    flipped = kept = 0
    for batch in dm.train_dataloader():
        assert batch["image"].shape[0] == len(batch["instances"]) == batch["mask"].shape[0]
        samples = zip(batch["name"], batch["image"], batch["mask"], batch["instances"], strict=True)
        for name, image, mask, inst in samples:
            raw_image, raw_mask, raw_masks, raw_labels = raw[int(name.split("_")[-1])]
            is_flipped = not torch.equal(mask, raw_mask.long())
            if is_flipped:
                raw_image, raw_mask, raw_masks = (
                    x.flip(-1) for x in (raw_image, raw_mask, raw_masks)
                )
            flipped, kept = flipped + is_flipped, kept + (not is_flipped)
            assert torch.equal(denormalize(image, IMAGENET_MEAN, IMAGENET_STD), raw_image)
            assert torch.equal(mask, raw_mask.long())
            assert torch.equal(inst["masks"], raw_masks) and torch.equal(inst["labels"], raw_labels)
            assert torch.equal(inst["boxes"], mask_boxes(raw_masks))
    assert flipped and kept, "the seeded flips were all alike: the test saw no flip"


def test_bad_options_are_one_line_errors():
    with pytest.raises(DataError, match="image_size must be"):
        SyntheticInstances(image_size=(8, 64))
    with pytest.raises(DataError, match="max_instances must be >= 1"):
        SyntheticInstances(max_instances=0)
