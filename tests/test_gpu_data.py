"""The GPU-resident data path (seglight.data.gpu), run here on the CPU as its device: the same
batches as the DataLoader path (shapes, dtypes, ranges; exactly the same for evaluation and for
training without augmentation), masks aligned with their images after the batched augmentation,
repeatable given a seed, every sample once per epoch, and a Trainer fits on it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from seglight.data import CamVid, Synthetic
from seglight.data.gpu import ResidentLoader, load_split
from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from seglight.errors import ConfigError
from seglight.models import UNet

# colours of the block data's classes: far apart, so a resampled pixel's class can be read back
COLOURS = np.array(
    [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], np.uint8
)


def make_block_camvid(root: Path, n: int = 4, size: tuple[int, int] = (48, 64)) -> Path:
    """CamVid layout whose masks are 8x8-pixel blocks of classes 0..5 and whose images are the
    classes' colours: a pixel's class can be derived from the image alone."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 1), ("test", 1)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir(parents=True)
        for i in range(count):
            blocks = rng.integers(0, len(COLOURS), (size[0] // 8, size[1] // 8))
            mask = np.kron(blocks, np.ones((8, 8), int)).astype(np.uint8)
            Image.fromarray(COLOURS[mask]).save(root / split / f"s{i}.png")
            Image.fromarray(mask, mode="L").save(root / f"{split}annot" / f"s{i}.png")
    return root


def datamodule(root: Path, **kwargs) -> CamVid:
    kwargs = {"batch_size": 2, "num_workers": 0, "crop_size": (16, 20), **kwargs}
    dm = CamVid(root=str(root), **kwargs)
    dm.setup("fit")
    return dm


def test_eval_batches_equal_the_loader_path(fake_camvid):
    dm = datamodule(fake_camvid)
    expected = list(dm.val_dataloader())
    dm.gpu_resident = True
    got = list(dm.val_dataloader())
    assert isinstance(dm.val_dataloader(), ResidentLoader)
    assert len(got) == len(expected) == 3  # 5 samples, batches of 2, the last one kept
    for a, b in zip(got, expected, strict=True):
        assert a["name"] == b["name"]
        assert a["image"].dtype == torch.float32 and a["mask"].dtype == torch.int64
        torch.testing.assert_close(a["image"], b["image"], atol=1e-5, rtol=0)
        assert torch.equal(a["mask"], b["mask"])


def test_train_batches_have_the_loader_paths_shapes_dtypes_and_ranges(fake_camvid):
    dm = datamodule(fake_camvid, scale_range=(0.5, 2.0), color_jitter=0.4)
    loader_batch = next(iter(dm.train_dataloader()))
    dm.gpu_resident = True
    resident = dm.train_dataloader()
    assert len(resident) == 3  # 6 samples, batches of 2
    low = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    high = ((1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    for batch in resident:
        for key in ("image", "mask"):
            assert batch[key].shape == loader_batch[key].shape
            assert batch[key].dtype == loader_batch[key].dtype
        assert len(batch["name"]) == 2
        assert ((batch["image"] >= low - 1e-5) & (batch["image"] <= high + 1e-5)).all()
        values = set(batch["mask"].unique().tolist())
        assert values <= set(range(11)) | {255}
        assert len(values - {255}) > 1


def test_training_without_augmentation_reproduces_the_stored_images(fake_camvid):
    dm = datamodule(fake_camvid, crop_size=(24, 32), scale_range=(1.0, 1.0), color_jitter=0.0)
    dm.gpu_resident = True
    eval_by_name = {}
    for batch in dm.resident_loader("train", 2, train=False):
        for name, image, mask in zip(batch["name"], batch["image"], batch["mask"], strict=True):
            eval_by_name[name] = (image, mask)
    flipped = 0
    for batch in dm.train_dataloader():
        for name, image, mask in zip(batch["name"], batch["image"], batch["mask"], strict=True):
            ref_image, ref_mask = eval_by_name[name]
            if not torch.equal(mask, ref_mask):  # a flipped sample: both flipped
                ref_image, ref_mask = ref_image.flip(-1), ref_mask.flip(-1)
                flipped += 1
            assert torch.equal(mask, ref_mask)
            torch.testing.assert_close(image, ref_image, atol=1e-4, rtol=0)
    assert len(eval_by_name) == 6


def class_of_pixels(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class [B, H, W] derived from a normalised image's colour, and whether the colour is pure
    (not a blend of two classes' colours at a block boundary)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (image * std + mean) * 255
    dist = (rgb[:, None] - torch.tensor(COLOURS).float().view(1, -1, 3, 1, 1)).abs().amax(2)
    best, cls = dist.min(1)
    return cls, best < 2.0


def test_masks_stay_aligned_with_images_after_scale_crop_and_flip(tmp_path):
    root = make_block_camvid(tmp_path / "blocks")
    dm = datamodule(root, crop_size=(40, 40), scale_range=(0.5, 2.0), color_jitter=0.0)
    dm.gpu_resident = True
    loader = dm.train_dataloader()
    checked = shifted_wrong = padded = 0
    for _ in range(5):
        for batch in loader:
            cls, pure = class_of_pixels(batch["image"])
            mask = batch["mask"]
            labelled = mask != 255
            use = pure & labelled
            assert (cls[use] == mask[use]).all(), "a mask pixel disagrees with its image's colour"
            checked += int(use.sum())
            # the same comparison against a mask moved by 3 pixels fails often: the check has teeth
            moved = mask.roll(3, dims=-1)
            shifted_wrong += int(((cls != moved) & use & (moved != 255)).sum())
            # padding (the scaled image is smaller than the crop): mean colour, ignore label
            pad = ~labelled
            padded += int(pad.sum())
            if pad.any():
                assert batch["image"].permute(1, 0, 2, 3)[:, pad].abs().max() < 0.02
    assert checked > 10_000 and shifted_wrong > checked // 20 and padded > 0


def test_batched_colour_jitter_equals_the_per_image_one():
    from seglight.data.transforms import adjust_colour

    images = torch.rand(3, 3, 8, 9) * 255
    factors = torch.tensor([[0.8, 1.1, 1.2], [1.0, 1.0, 1.0], [1.3, 0.7, 0.9]])
    batched = adjust_colour(images, factors[:, 0], factors[:, 1], factors[:, 2])
    for i in range(3):
        single = adjust_colour(images[i], *factors[i].tolist())
        torch.testing.assert_close(batched[i], single)
    torch.testing.assert_close(batched[1], images[1].clamp(0, 255))


def test_repeatable_given_a_seed_and_new_draws_each_epoch(fake_camvid):
    dm = datamodule(fake_camvid, scale_range=(0.5, 2.0), color_jitter=0.3)
    data = load_split(dm.datasets["train"], "cpu", (124, 116, 104))

    def epochs(seed: int, n: int = 2) -> list[list[dict]]:
        loader = ResidentLoader(data, 2, dm.train_transform(), seed=seed)
        return [list(loader) for _ in range(n)]

    a, b, c = epochs(3), epochs(3), epochs(4)
    for batch_a, batch_b in zip(a[0] + a[1], b[0] + b[1], strict=True):
        assert batch_a["name"] == batch_b["name"]
        assert torch.equal(batch_a["image"], batch_b["image"])
        assert torch.equal(batch_a["mask"], batch_b["mask"])
    assert not torch.equal(a[0][0]["image"], a[1][0]["image"])  # the next epoch draws anew
    assert not torch.equal(a[0][0]["image"], c[0][0]["image"])  # another seed draws otherwise


def test_an_epoch_covers_every_sample_once(fake_camvid):
    dm = datamodule(fake_camvid)
    data = load_split(dm.datasets["train"], "cpu", (124, 116, 104))
    names = sorted(data.names)
    assert len(names) == 6

    def seen(loader: ResidentLoader) -> list[str]:
        return [n for batch in loader for n in batch["name"]]

    train = ResidentLoader(data, 2, dm.train_transform(), seed=0)
    for _ in range(2):
        assert len(train) == 3 and sorted(seen(train)) == names
    assert sorted(seen(ResidentLoader(data, 4, dm.eval_transform()))) == names  # 4 + 2
    dropped = ResidentLoader(data, 4, dm.train_transform(), seed=0)
    assert len(dropped) == 1 and len(set(seen(dropped))) == 4  # drop_last, as the DataLoader
    # DDP: two ranks share each epoch without overlap
    ranks = [
        ResidentLoader(data, 1, dm.train_transform(), seed=5, rank=r, world_size=2) for r in (0, 1)
    ]
    shares = [seen(r) for r in ranks]
    assert len(shares[0]) == len(shares[1]) == 3
    assert sorted(shares[0] + shares[1]) == names


def test_a_trainer_fits_on_the_resident_path(fake_camvid, tmp_path):
    dm = CamVid(
        root=str(fake_camvid), batch_size=2, num_workers=0, crop_size=(16, 16), gpu_resident=True
    )
    model = UNet(num_classes=11, encoder="original", base_channels=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3  # 6 samples, batches of 2
    assert isinstance(trainer.train_dataloader, ResidentLoader)
    assert "val/mIoU" in trainer.callback_metrics


def test_unsupported_dataset_or_transform_is_a_clear_error():
    dm = Synthetic(num_train=4, num_val=2, batch_size=2, gpu_resident=True)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="no load.index. method.*gpu_resident: false"):
        dm.train_dataloader()
    with pytest.raises(
        ConfigError, match="supports TrainTransform and EvalTransform, not function"
    ):
        ResidentLoader(None, 2, lambda image, mask: (image, mask))  # type: ignore[arg-type]


@pytest.mark.gpu
def test_resident_batches_on_the_gpu_need_no_host_sync(fake_camvid):
    dm = datamodule(fake_camvid, scale_range=(0.5, 2.0), color_jitter=0.3)
    data = load_split(dm.datasets["train"], "cuda", (124, 116, 104))
    for transform in (dm.train_transform(), dm.eval_transform()):
        loader = ResidentLoader(data, 2, transform, seed=0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            batches = list(loader)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(b["image"].is_cuda and b["mask"].is_cuda for b in batches)
