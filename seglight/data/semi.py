"""SemiSupervised: any seglight dataset with only part of its training split labelled.

The labelled subset is chosen by `labeled` (a fraction in (0, 1], or a count) from a seeded
permutation of the training images, or listed in `labeled_split` (one image name per line; the
split lists published with the semi-supervised literature, e.g. UniMatch's and CPS's VOC and
Cityscapes lists, are in this form, and a line "JPEGImages/x.jpg SegmentationClassAug/x.png"
counts as image x). The choice is written to <run dir>/labeled.txt, a valid `labeled_split`, so a
run can be repeated exactly.

The rest of the training split is unlabelled, or, with `unlabeled_split`, exactly the images a
second list names (UniMatch's splits/pascal/<n>/unlabeled.txt, read as they are: one
"JPEGImages/x.jpg SegmentationClass/x.png" line per image, the last without a final newline).
Unlabelled masks are never opened: unlabelled samples
are read with no mask path, so their "mask" is all ignore_index (the label contract holds, and a
method that reads it by mistake learns nothing from it). They carry "valid", bool [H, W], False
on the padding added by cropping, so that pseudo-labels are not trained on padding.

With `monitor_unlabeled_masks: true` (off by default; for datasets whose unlabelled images have
masks, e.g. CamVid), unlabelled samples also carry their real mask as "heldout_mask" (int64
[H, W], cropped, scaled and flipped with the image; ignore_index where there is none), for the
methods' pseudo-label monitor (train/pseudo_acc, train/pseudo_mIoU) only: "mask" stays all
ignore_index and no method's loss reads "heldout_mask". Enabling it reads those masks but does not
change the images, crops or random draws.

Training batches are {"labeled": batch, "unlabeled": batch} through Lightning's CombinedLoader in
"max_size_cycle" mode (an epoch is one pass over the larger part, the smaller one cycles).
Validation, test and predict are the wrapped dataset's, unchanged.

Image-level labels (class presence, for weak supervision): every labelled sample has
"image_labels", float [num_classes], 1 for the classes present in its whole mask (before
cropping); with `image_labels: file.json` ({"image name": ["class name", ...]}) unlabelled
samples carry them too, from the file.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import Dataset, Subset

from seglight.data.base import (
    SegmentationDataModule,
    SegmentationDataset,
    collate,
    masks_optional,
    read_mask,
    verify_pairs,
)
from seglight.errors import ConfigError, DataError

LABELED_FILE = "labeled.txt"


def read_split_list(path: Path, option: str = "labeled_split") -> list[str]:
    """Image names (file stems) of a split list: one per line, the first whitespace-separated
    field, any folder and extension dropped; blank lines and '#' comments skipped. `option` names
    the setting in errors."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"{option}: cannot read {str(path)!r}: {e.strerror}") from e
    names = [Path(line.split()[0]).stem for line in lines if line.strip() and line[0] != "#"]
    if not names:
        raise ConfigError(f"{option} {str(path)!r} lists no image")
    return names


def presence(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float [num_classes]: 1 for each class with at least one pixel in mask [H, W]."""
    mask = mask.flatten().long()
    mask = mask[(mask >= 0) & (mask < num_classes)]
    return (torch.bincount(mask, minlength=num_classes)[:num_classes] > 0).float()


class SemiDataset(SegmentationDataset):
    """SegmentationDataset whose samples add image-level labels ("image_labels", float [K]):
    from the mask (labelled pairs) or from `image_labels` (name -> [K]); pairs without a mask
    add "valid" (bool [H, W], False on the crop's padding) and never open a mask file."""

    def __init__(
        self,
        base: SegmentationDataset,
        pairs: list[tuple[Path, Path | None]],
        image_labels: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(pairs, base.num_classes, base.transform, base.label_map, base.ignore_index)
        self.image_labels = image_labels
        # the unlabelled images with their masks, read for "heldout_mask" only (`hold_out`)
        self.heldout: SegmentationDataset | None = None

    def hold_out(self, masks: dict[Path, Path | None]) -> None:
        """Give unlabelled samples "heldout_mask": the mask of each image (`masks`: image path ->
        mask path or None), for the pseudo-label monitor only (see the module docstring)."""
        pairs = [(image, masks.get(image)) for image, _ in self.pairs]
        self.heldout = SegmentationDataset(
            pairs, self.num_classes, self.transform, self.label_map, self.ignore_index
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.pairs[index]
        name = image_path.stem
        if mask_path is not None:
            image, mask = self.load(index)
            labels = presence(mask, self.num_classes)  # of the whole image, before cropping
            image, mask = self.transform(image, mask)
            return {"image": image, "mask": mask, "name": name, "image_labels": labels}
        heldout = None
        if self.heldout is None:
            image, _ = self.load(index)  # mask path None: an all-ignore mask, no file read
            # a zero mask through the same transform marks where the crop padded (ignore there)
            image, inside = self.transform(image, torch.zeros(image.shape[-2:], dtype=torch.uint8))
        else:  # the real mask rides under the zero one: the same crop, scale and flip
            image, mask = self.heldout.load(index)
            image, both = self.transform(image, torch.stack([torch.zeros_like(mask), mask]))
            inside, heldout = both[0].long(), both[1].long()
        sample = {
            "image": image,
            "mask": torch.full_like(inside, self.ignore_index),
            "name": name,
            "valid": inside != self.ignore_index,
        }
        if heldout is not None:
            sample["heldout_mask"] = heldout
        if self.image_labels is not None:
            sample["image_labels"] = self.image_labels[name]
        return sample

    def load_mask_only(self, index: int) -> torch.Tensor:
        return torch.from_numpy(read_mask(self.pairs[index][1], self.label_map).astype(np.int64))


class _Generated(Dataset):
    """A generated (not file-based) dataset's samples: labelled ones with image_labels from
    their (cropped) mask, unlabelled ones with the mask replaced by ignore_index."""

    def __init__(self, subset: Subset, labeled: bool, num_classes: int, ignore_index: int) -> None:
        self.subset, self.labeled = subset, labeled
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.heldout = False  # unlabelled samples carry "heldout_mask" (the monitor's)

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.subset[index])
        if self.labeled:
            sample["image_labels"] = presence(sample["mask"], self.num_classes)
        else:
            if self.heldout:  # the pseudo-label monitor's copy (SemiSupervised's docstring)
                sample["heldout_mask"] = sample["mask"].long()
            sample["valid"] = torch.ones(sample["mask"].shape, dtype=torch.bool)
            sample["mask"] = torch.full_like(sample["mask"], self.ignore_index)
        return sample


def semi_collate(samples: list[dict[str, Any]], ignore_index: int = 255) -> dict[str, Any]:
    """seglight.data.base.collate, plus "image_labels" stacked [B, K], "valid" padded with
    False and "heldout_mask" with ignore_index to the batch's [B, H, W]."""
    batch = collate(samples, ignore_index)
    if "heldout_mask" in samples[0]:
        heldout = torch.full(batch["mask"].shape, ignore_index, dtype=torch.long)
        for i, s in enumerate(samples):
            h, w = s["heldout_mask"].shape
            heldout[i, :h, :w] = s["heldout_mask"]
        batch["heldout_mask"] = heldout
    if "image_labels" in samples[0]:
        batch["image_labels"] = torch.stack([s["image_labels"] for s in samples])
    if "valid" in samples[0]:
        valid = torch.zeros(batch["mask"].shape, dtype=torch.bool)
        for i, s in enumerate(samples):
            h, w = s["valid"].shape
            valid[i, :h, :w] = s["valid"]
        batch["valid"] = valid
    return batch


class _SemiCollate:
    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = ignore_index

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return semi_collate(samples, self.ignore_index)


class SemiSupervised(SegmentationDataModule):
    """Any seglight dataset with a labelled subset of its training split (semi-supervised data).

    Args:
        dataset: the dataset to wrap: `{class_path: CamVid, init_args: {...}}` or a short name.
        labeled: the labelled part of the training split: a fraction in (0, 1] (0.125 is 46 of
            CamVid's 367: rounded) or a count (an integer: `1` is one image, `1.0` all of them).
        labeled_split: a file listing the labelled images instead (one name per line).
        unlabeled_split: a file listing the unlabelled images (same form; e.g. UniMatch's
            unlabeled.txt); default: every training image not labelled.
        seed: seeds the choice of `labeled` images (the same seed gives the same subset).
        unlabeled_batch_size: images per unlabelled batch (default: batch_size).
        image_labels: a JSON file {image name: [class names]} giving image-level labels of the
            unlabelled images (a relative path is looked up beside the dataset's root too).
        monitor_unlabeled_masks: unlabelled samples carry their real mask as "heldout_mask" for
            the methods' pseudo-label monitor, never for training (see the module docstring).
        root, batch_size, val_batch_size, num_workers, crop_size: when given, set on the wrapped
            dataset (so `--data.root /path/to/camvid` works as for the dataset itself).
    """

    def __init__(
        self,
        dataset: SegmentationDataModule,
        labeled: int | float | None = None,
        labeled_split: str | None = None,
        unlabeled_split: str | None = None,
        seed: int = 0,
        unlabeled_batch_size: int | None = None,
        image_labels: str | None = None,
        monitor_unlabeled_masks: bool = False,
        root: str | None = None,
        batch_size: int | None = None,
        val_batch_size: int | None = None,
        num_workers: int | None = None,
        crop_size: tuple[int, int] | None = None,
    ) -> None:
        if isinstance(dataset, str):  # a short name, in Python
            if dataset not in self.registry:
                raise ConfigError(f"SemiSupervised: unknown dataset {dataset!r}")
            dataset = self.registry[dataset]()
        if isinstance(dataset, SemiSupervised):
            raise ConfigError("SemiSupervised cannot wrap another SemiSupervised dataset")
        if (labeled is None) == (labeled_split is None):
            raise ConfigError(
                "SemiSupervised: give exactly one of labeled (a fraction or a count) and "
                f"labeled_split (a file), got labeled={labeled}, labeled_split={labeled_split}"
            )
        if isinstance(labeled, bool) or (
            labeled is not None
            and (
                (isinstance(labeled, float) and not 0 < labeled <= 1)
                or (isinstance(labeled, int) and labeled < 1)
            )
        ):
            raise ConfigError(
                f"SemiSupervised: labeled={labeled!r} must be a fraction in (0, 1] or a count >= 1"
            )
        if root is not None:
            if not hasattr(dataset, "root"):
                raise ConfigError(
                    f"SemiSupervised: root given but {type(dataset).__name__} has none"
                )
            dataset.root = Path(root).expanduser()
        if dataset.gpu_resident:
            raise ConfigError("SemiSupervised does not support gpu_resident datasets yet")
        for name, value in (
            ("batch_size", batch_size),
            ("num_workers", num_workers),
            ("crop_size", tuple(crop_size) if crop_size else None),
        ):
            if value is not None:
                setattr(dataset, name, value)
        if batch_size is not None and val_batch_size is None:
            val_batch_size = batch_size
        if val_batch_size is not None:
            dataset.val_batch_size = val_batch_size
        super().__init__(
            batch_size=dataset.batch_size,
            val_batch_size=dataset.val_batch_size,
            num_workers=dataset.num_workers,
            crop_size=dataset.crop_size,
            check_masks=dataset.check_masks,
            pin_memory=dataset.pin_memory,
            predict_split=dataset.predict_split,
        )
        self.dataset = dataset
        self.labeled = labeled
        self.labeled_split = labeled_split
        self.unlabeled_split = unlabeled_split
        self.seed = seed
        self.unlabeled_batch_size = unlabeled_batch_size or dataset.batch_size
        self.image_labels = image_labels
        self.monitor_unlabeled_masks = monitor_unlabeled_masks
        self.labeled_names: list[str] = []

    # ------------------------------------------------------------------ the wrapped dataset's
    # what the model sees (linked into it by the CLI) is the wrapped dataset's
    @property
    def class_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.dataset.class_names)

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:  # type: ignore[override]
        return tuple(self.dataset.palette)

    @property
    def ignore_index(self) -> int:  # type: ignore[override]
        return self.dataset.ignore_index

    @property
    def in_channels(self) -> int:  # type: ignore[override]
        return self.dataset.in_channels

    @property
    def mean(self) -> tuple[float, ...]:  # type: ignore[override]
        return self.dataset.mean

    @property
    def std(self) -> tuple[float, ...]:  # type: ignore[override]
        return self.dataset.std

    @property
    def label_map(self) -> np.ndarray | None:  # type: ignore[override]
        return self.dataset.label_map

    @property
    def splits(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.dataset.splits)

    # ------------------------------------------------------------------ the labelled subset
    def _choose(self, names: list[str], has_mask: list[bool] | None = None) -> list[int]:
        """Indices (into `names`, the training split) of the labelled images, among those with
        a mask (`has_mask`, default all)."""
        what = f"the {type(self.dataset).__name__} train split"
        has_mask = has_mask or [True] * len(names)
        if self.labeled_split is not None:
            listed = self._listed("labeled_split", names)
            unmasked = [i for i in listed if not has_mask[i]]
            if unmasked:
                raise DataError(
                    f"labeled_split {self.labeled_split!r}: image {names[unmasked[0]]!r} has no "
                    f"mask in {what}"
                )
            return sorted(listed)
        if isinstance(self.labeled, float):
            count = max(1, round(self.labeled * len(names)))
        else:
            count = int(self.labeled)
            if count > len(names):
                raise DataError(
                    f"SemiSupervised: labeled={count} but {what} has {len(names)} images"
                )
        eligible = [i for i in range(len(names)) if has_mask[i]]
        if count > len(eligible):
            raise DataError(
                f"SemiSupervised: labeled={self.labeled} asks for {count} labelled images but "
                f"only {len(eligible)} of the {len(names)} in {what} have masks"
            )
        order = np.random.default_rng(self.seed).permutation(len(eligible))
        return sorted(eligible[int(i)] for i in order[:count])

    def _listed(self, option: str, names: list[str]) -> list[int]:
        """Indices (into `names`, the training split) of the images that the list file of
        `option` ("labeled_split" or "unlabeled_split") names, in its order."""
        path = Path(getattr(self, option))
        listed = read_split_list(path, option)
        index = {n: i for i, n in enumerate(names)}
        missing = [n for n in listed if n not in index]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5])
            raise DataError(
                f"{option} {str(path)!r}: {len(missing)} listed image(s) not in the "
                f"{type(self.dataset).__name__} train split ({len(names)} images): "
                f"{shown}{' ...' if len(missing) > 5 else ''}"
            )
        if len(set(listed)) < len(listed):
            twice = sorted({n for n in listed if listed.count(n) > 1})
            raise DataError(f"{option} {str(path)!r} lists {twice[0]!r} twice")
        return [index[n] for n in listed]

    def _read_image_labels(self, names: list[str]) -> dict[str, torch.Tensor]:
        path = Path(self.image_labels).expanduser()
        root = getattr(self.dataset, "root", None)
        if not path.is_file() and not path.is_absolute() and root is not None:
            path = Path(root) / path
        try:
            table = json.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"image_labels: cannot read {str(path)!r}: {e.strerror}") from e
        except json.JSONDecodeError as e:
            raise DataError(f"image_labels {str(path)!r} is not valid JSON: {e}") from e
        if not isinstance(table, dict):
            raise DataError(f"image_labels {str(path)!r}: expected {{image name: [class names]}}")
        classes = {n: i for i, n in enumerate(self.class_names)}
        out: dict[str, torch.Tensor] = {}
        for name, listed in table.items():
            if not isinstance(listed, list):
                raise DataError(
                    f"image_labels {str(path)!r}: {name!r} maps to {listed!r}, not a list"
                )
            unknown = [c for c in listed if c not in classes]
            if unknown:
                raise DataError(
                    f"image_labels {str(path)!r}: image {name!r} has unknown class {unknown[0]!r} "
                    f"(classes: {', '.join(self.class_names)})"
                )
            vector = torch.zeros(self.num_classes)
            vector[[classes[c] for c in listed]] = 1.0
            out[Path(name).stem] = vector
        known = self._known_names()
        foreign = [n for n in out if n not in known]
        if foreign:
            shown = ", ".join(repr(n) for n in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise DataError(
                f"image_labels {str(path)!r}: {len(foreign)} of its {len(out)} entries name no "
                f"image of {type(self.dataset).__name__} ({shown}): is it another dataset's file?"
            )
        missing = [n for n in names if n not in out]
        if missing:
            raise DataError(
                f"image_labels {str(path)!r} has no entry for {len(missing)} unlabelled image(s): "
                f"{', '.join(repr(n) for n in missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        return out

    def _known_names(self) -> set[str]:
        """The names of the wrapped dataset's images, every split."""
        known: set[str] = set()
        for split in self.dataset.splits:
            with masks_optional():
                dataset = self.dataset.build_dataset(split, train=False)
            if isinstance(dataset, SegmentationDataset):
                known.update(image.stem for image, _ in dataset.pairs)
        return known

    def _warn_missing_classes(self, labelled: SegmentationDataset) -> None:
        seen = torch.zeros(self.num_classes)
        for i in range(len(labelled)):
            seen += presence(labelled.load_mask_only(i), self.num_classes)
        absent = [self.class_names[k] for k in range(self.num_classes) if seen[k] == 0]
        if absent:
            warnings.warn(
                f"SemiSupervised: the {len(labelled)} labelled images ({self.describe_labeled()}) have no "
                f"pixel of class(es) {', '.join(repr(c) for c in absent)}",
                stacklevel=2,
            )

    def describe_labeled(self) -> str:
        """How the labelled images were chosen: "labeled=0.125, seed=0" or "labeled_split=x"."""
        if self.labeled_split is not None:
            chosen = f"labeled_split={self.labeled_split}"
        else:
            chosen = f"labeled={self.labeled}, seed={self.seed}"
        if self.unlabeled_split is not None:
            chosen += f", unlabeled_split={self.unlabeled_split}"
        return chosen

    def _build_train(self) -> None:
        """datasets["train"] (labelled) and datasets["unlabeled"] from the wrapped train split."""
        with masks_optional():  # unlabelled images may have no mask at all
            full = self.dataset.build_dataset("train", train=True)
        if len(full) == 0:
            raise DataError(f"{type(self.dataset).__name__}: the train split is empty")
        if isinstance(full, SegmentationDataset):
            names = [image.stem for image, _ in full.pairs]
            chosen = set(self._choose(names, [mask is not None for _, mask in full.pairs]))
            labelled = [full.pairs[i] for i in sorted(chosen)]
            if self.unlabeled_split is not None:
                pool = self._listed("unlabeled_split", names)
                both = [names[i] for i in pool if i in chosen]
                if both:
                    raise DataError(
                        f"unlabeled_split {self.unlabeled_split!r} lists {len(both)} labelled "
                        f"image(s) ({both[0]!r} ...): the lists must be a pair (the same split's "
                        "labeled.txt and unlabeled.txt)"
                    )
            else:
                pool = [i for i in range(len(names)) if i not in chosen]
            rest = [(full.pairs[i][0], None) for i in pool]
            image_labels = (
                self._read_image_labels([p[0].stem for p in rest]) if self.image_labels else None
            )
            self.datasets["train"] = SemiDataset(full, labelled)
            self.datasets["unlabeled"] = SemiDataset(full, rest, image_labels)
            if self.monitor_unlabeled_masks:
                self.datasets["unlabeled"].hold_out(dict(full.pairs))
            self.labeled_names = [p[0].stem for p in labelled]
            self._warn_missing_classes(self.datasets["train"])
        else:  # generated data (Synthetic): no files to keep closed
            if any(
                v is not None for v in (self.labeled_split, self.unlabeled_split, self.image_labels)
            ):
                raise ConfigError(
                    f"labeled_split, unlabeled_split and image_labels need a file-based dataset, not "
                    f"{type(self.dataset).__name__}"
                )
            chosen = self._choose([str(i) for i in range(len(full))])
            rest = [i for i in range(len(full)) if i not in set(chosen)]
            k, ignore = self.num_classes, self.ignore_index
            self.datasets["train"] = _Generated(Subset(full, chosen), True, k, ignore)
            self.datasets["unlabeled"] = _Generated(Subset(full, rest), False, k, ignore)
            self.datasets["unlabeled"].heldout = self.monitor_unlabeled_masks
            self.labeled_names = [full[i]["name"] for i in chosen]

    def build_dataset(self, split: str, train: bool) -> Dataset:
        """The labelled subset for "train" (so mask checks and class statistics see the labelled
        masks only), the wrapped dataset's split otherwise."""
        if split == "train":
            if "train" not in self.datasets:
                self._build_train()
            return self.datasets["train"]
        return self.dataset.build_dataset(split, train)

    def setup(self, stage: str | None = None) -> None:
        self.dataset.trainer = self.trainer
        super().setup(stage)  # verifies the masks of the labelled subset only
        unlabeled = self.datasets.get("unlabeled")
        if (
            self.check_masks
            and isinstance(unlabeled, SegmentationDataset)
            and not getattr(self, "_unlabeled_verified", False)
        ):  # the unlabelled images' files (no mask is opened)
            what = f"{type(self.dataset).__name__} unlabelled train"
            verify_pairs(unlabeled.pairs, self.num_classes, self.ignore_index, None, what)
            self._unlabeled_verified = True

    def _record(self) -> None:
        """Write labeled.txt into the run directory (rank zero), when the training loader is
        made: once the start-up checks passed (a failed start leaves no file behind)."""
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero or getattr(self, "_recorded", False):
            return
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        total = len(self.datasets["train"]) + len(self.datasets["unlabeled"])
        header = (
            f"# {len(self.labeled_names)} of {total} {type(self.dataset).__name__} training "
            f"images labelled ({self.describe_labeled()}); usable as labeled_split\n"
        )
        (run_dir / LABELED_FILE).write_text(header + "".join(f"{n}\n" for n in self.labeled_names))
        print(
            f"seglight: {len(self.labeled_names)} labelled and {total - len(self.labeled_names)} "
            f"unlabelled training images; the list is in {run_dir / LABELED_FILE}",
            file=sys.stderr,
        )
        self._recorded = True

    # ------------------------------------------------------------------ loaders
    def collate_fn(self):
        return _SemiCollate(self.ignore_index)

    def train_dataloader(self) -> CombinedLoader:
        self._record()
        loaders = {"labeled": self._loader("train", self.batch_size, train=True)}
        if len(self.datasets["unlabeled"]):
            loaders["unlabeled"] = self._loader("unlabeled", self.unlabeled_batch_size, train=True)
        return CombinedLoader(loaders, mode="max_size_cycle")
