"""Losses against independent references (formulas evaluated pixel by pixel, brute-force
enumerations), ignored pixels, all-ignored batches and bf16 autocast for every loss."""

import itertools
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seglight.errors import ConfigError
from seglight.losses import (
    LOSSES,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LovaszSoftmaxLoss,
    OhemCrossEntropyLoss,
    UNetWeightedLoss,
    WeightedSumLoss,
    build_loss,
    load_class_weights,
    set_class_weights,
    unet_weight_map,
)


def test_matches_pytorch_and_ignores_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[0, :2] = 255
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    ours = CrossEntropyLoss(weight)(logits, target)
    assert ours.item() == pytest.approx(
        F.cross_entropy(logits, target, weight, ignore_index=255).item(), rel=1e-5
    )
    # changing logits at ignored pixels changes nothing
    logits2 = logits.clone()
    logits2[0, :, :2] = 100.0
    assert CrossEntropyLoss(weight)(logits2, target).item() == pytest.approx(ours.item())


def test_all_ignored_gives_zero_loss_and_finite_gradients():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), 255)
    for weight in (None, torch.ones(3)):
        loss = CrossEntropyLoss(weight)(logits, target)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(logits.grad).all()


def test_class_weights_from_list_and_files(tmp_path):
    assert load_class_weights([1, 2, 3], 3).tolist() == [1, 2, 3]
    (tmp_path / "w.json").write_text(json.dumps({"weights": [0.5, 1.5]}))
    assert load_class_weights(tmp_path / "w.json", 2).tolist() == [0.5, 1.5]
    (tmp_path / "w.txt").write_text("0.25 0.75\n")
    assert load_class_weights(str(tmp_path / "w.txt"), 2).tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match="expected 3 weights"):
        load_class_weights([1, 2], 3)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_class_weights(tmp_path / "nope.txt", 2)


# --------------------------------------------------------------------------- the other losses
def _example(seed=0, shape=(2, 4, 5, 6), ignore=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g) * 2
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    if ignore:
        target[0, :2] = 255
        target[1, :, -1] = 255
    return logits, target


def _all_losses(num_classes=4):
    weight = torch.linspace(0.5, 2.0, num_classes)
    return {
        "ce": CrossEntropyLoss(weight, label_smoothing=0.1),
        "focal": FocalLoss(gamma=2.0, weight=weight),
        "dice": DiceLoss(),
        "lovasz": LovaszSoftmaxLoss(),
        "lovasz_per_image": LovaszSoftmaxLoss(per_image=True),
        "ohem": OhemCrossEntropyLoss(thresh=0.7, min_kept=5, weight=weight),
        "unet": UNetWeightedLoss(w0=10, sigma=2, weight=weight),
        "sum": build_loss({"ce": 1.0, "dice": 0.5, "lovasz": 0.25}),
    }


@pytest.mark.parametrize("name", list(_all_losses()))
def test_ignored_pixels_change_neither_loss_nor_gradients(name):
    loss_fn = _all_losses()[name]
    logits, target = _example()
    ignored = (target == 255)[:, None].expand_as(logits)
    grads = []
    values = []
    for fill in (0.0, 50.0):
        x = logits.clone()
        x[ignored] = fill + torch.randn(int(ignored.sum()))
        x.requires_grad_(True)
        loss = loss_fn(x, target)
        loss.backward()
        values.append(loss.item())
        grads.append(x.grad)
        assert torch.all(x.grad[ignored] == 0), "an ignored pixel received a gradient"
    assert values[0] == pytest.approx(values[1], rel=1e-5, abs=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert values[0] > 0


@pytest.mark.parametrize("name", list(_all_losses()))
def test_all_ignored_gives_zero_and_finite_gradients_for_every_loss(name):
    logits = torch.randn(2, 4, 3, 5, requires_grad=True)
    loss = _all_losses()[name](logits, torch.full((2, 3, 5), 255))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()


@pytest.mark.parametrize("name", list(_all_losses()))
def test_bf16_autocast_on_cpu_computes_in_float32(name):
    loss_fn = _all_losses()[name]
    logits, target = _example(1)
    reference = loss_fn(logits, target)
    conv = torch.nn.Conv2d(4, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(4)[:, :, None, None])
        conv.bias.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = conv(logits)  # bf16 logits, as a network under autocast returns
        assert x.dtype == torch.bfloat16
        loss = loss_fn(x, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # only the bf16 rounding of the logits differs (OHEM may keep a borderline pixel or not)
    assert loss.item() == pytest.approx(reference.item(), rel=0.05)


def test_focal_matches_the_formula_pixel_by_pixel():
    logits, target = _example(2)
    alpha = torch.tensor([0.25, 1.0, 2.0, 0.5])
    ours = FocalLoss(gamma=2.0, weight=alpha)(logits, target).item()
    terms = []
    for b, y, x in itertools.product(range(2), range(5), range(6)):
        t = int(target[b, y, x])
        if t == 255:
            continue
        z = logits[b, :, y, x].double()
        p = (z.exp() / z.exp().sum())[t].item()
        terms.append(-alpha[t].item() * (1 - p) ** 2 * np.log(p))
    assert ours == pytest.approx(np.mean(terms), rel=1e-5)
    # gamma 0 without weights is cross-entropy
    ce = F.cross_entropy(logits, target, ignore_index=255).item()
    assert FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(ce, rel=1e-5)


def test_dice_by_hand():
    logits, target = _example(3)
    target[target == 3] = 0  # class 3 absent: left out of the mean
    ours = DiceLoss()(logits, target).item()
    p = logits.double().softmax(1).numpy()
    t = target.numpy()
    valid = t != 255
    dices = []
    for c in range(4):
        y = (t == c) & valid
        if not y.any():
            continue
        pc = p[:, c] * valid
        dices.append(2 * (pc * y).sum() / (pc.sum() + y.sum()))
    assert len(dices) == 3
    assert ours == pytest.approx(1 - np.mean(dices), rel=1e-5)
    # a perfect, confident prediction has Dice loss ~0
    perfect = F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 100
    assert DiceLoss()(perfect, target).item() < 1e-6


def _jaccard_loss(mispredicted: set, foreground: set) -> float:
    """Berman's Delta_J(M) = |M| / |foreground U M| (0 for the empty set)."""
    return len(mispredicted) / len(foreground | mispredicted) if mispredicted else 0.0


def _lovasz_by_enumeration(errors: list[float], foreground: set) -> float:
    """The Lovasz extension of the submodular Jaccard loss is the maximum over all orderings of
    sum_i m_pi(i) (Delta(S_i) - Delta(S_i-1)) (greedy algorithm / base polytope vertices)."""
    best = -np.inf
    for order in itertools.permutations(range(len(errors))):
        value, prefix = 0.0, set()
        for i in order:
            before = _jaccard_loss(prefix, foreground)
            prefix = prefix | {i}
            value += errors[i] * (_jaccard_loss(prefix, foreground) - before)
        best = max(best, value)
    return best


def _lovasz_by_integral(errors: list[float], foreground: set) -> float:
    """Choquet integral form: integral over t in (0, inf) of Delta({i : m_i >= t}) dt."""
    levels = sorted(set(errors) | {0.0}, reverse=True)
    total = 0.0
    for hi, lo in zip(levels[:-1], levels[1:], strict=True):
        total += (hi - lo) * _jaccard_loss({i for i, m in enumerate(errors) if m >= hi}, foreground)
    return total


def test_lovasz_matches_brute_force_definitions():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 3, 2, 4, generator=g) * 2
    target = torch.tensor([[[0, 1, 1, 255], [2, 0, 255, 1]]])
    ours = LovaszSoftmaxLoss()(logits, target).item()
    p = logits.double().softmax(1)[0].reshape(3, -1).numpy()
    t = target.reshape(-1).numpy()
    keep = [i for i in range(len(t)) if t[i] != 255]  # 6 pixels: 720 orderings
    per_class = []
    for c in range(3):
        fg = {j for j, i in enumerate(keep) if t[i] == c}
        if not fg:
            continue
        errors = [abs(float(t[i] == c) - p[c, i]) for i in keep]
        by_enum = _lovasz_by_enumeration(errors, fg)
        assert by_enum == pytest.approx(_lovasz_by_integral(errors, fg), abs=1e-9)
        per_class.append(by_enum)
    assert ours == pytest.approx(np.mean(per_class), rel=1e-5)


def test_lovasz_per_image_averages_images():
    logits, target = _example(5)
    per_image = LovaszSoftmaxLoss(per_image=True)(logits, target).item()
    separate = [LovaszSoftmaxLoss()(logits[i : i + 1], target[i : i + 1]).item() for i in range(2)]
    assert per_image == pytest.approx(np.mean(separate), rel=1e-5)


@pytest.mark.parametrize("min_kept", [3, 40])
def test_ohem_keeps_the_hardest_pixels_like_sorting_by_hand(min_kept):
    logits, target = _example(6)
    ours = OhemCrossEntropyLoss(thresh=0.6, min_kept=min_kept)(logits, target).item()
    p = logits.double().softmax(1).numpy()
    t = target.numpy()
    probs, ces = [], []
    for b, y, x in itertools.product(range(2), range(5), range(6)):
        if t[b, y, x] != 255:
            probs.append(p[b, t[b, y, x], y, x])
            ces.append(-np.log(probs[-1]))
    probs, ces = np.array(probs), np.array(ces)
    ranked = np.sort(probs)
    threshold = max(ranked[min(min_kept * 2, len(ranked) - 1)], 0.6)  # min_kept per image
    kept = probs < threshold
    assert 0 < kept.sum() < len(probs)
    assert ours == pytest.approx(ces[kept].mean(), rel=1e-5)


def test_ohem_with_a_high_minimum_keeps_every_pixel_but_the_easiest():
    logits, target = _example(7, ignore=False)
    keep = OhemCrossEntropyLoss(thresh=0.0, min_kept=10**6).hard_pixels(logits, target)
    assert keep.sum() == target.numel() - 1  # strictly below the largest probability


def _brute_force_weight_map(mask, w0, sigma, background=None):
    """Distances to every component by enumerating their pixels (no distance transform)."""
    from scipy import ndimage

    components = []
    for c in np.unique(mask):
        if c in (255, background):
            continue
        labels, n = ndimage.label(mask == c)
        components += [np.argwhere(labels == i) for i in range(1, n + 1)]
    out = np.zeros(mask.shape)
    for y, x in itertools.product(*map(range, mask.shape)):
        if mask[y, x] == 255:
            continue
        d = sorted(np.sqrt(((comp - [y, x]) ** 2).sum(1)).min() for comp in components)
        d = d + [np.inf, np.inf]
        out[y, x] = 1.0 + w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
    return out


def test_unet_weight_map_matches_brute_force():
    mask = np.zeros((12, 14), np.uint8)
    mask[2:6, 2:6] = 1  # two cells of class 1 separated by a 1-pixel background gap
    mask[2:6, 7:11] = 1
    mask[8:11, 3:12] = 2  # a cell of another class touching the background only
    mask[0, 0] = 255
    ours = unet_weight_map(mask, w0=10, sigma=2, background_class=0)
    reference = _brute_force_weight_map(mask, 10, 2, background=0)
    assert np.allclose(ours, reference, atol=1e-4)
    assert ours[0, 0] == 0
    # the gap between the two cells weighs most, far background least
    assert ours[3, 6] > 5 and ours[3, 6] == ours[2:6, 6].max() and ours[3, 13] < ours[3, 6]


def test_unet_weight_map_every_class_an_object_and_class_weights():
    mask = np.zeros((8, 9), np.uint8)
    mask[:, 4:] = 1  # two touching components: the border between them weighs most
    ours = unet_weight_map(mask, w0=10, sigma=3, class_weights=np.array([1.0, 2.0]))
    reference = _brute_force_weight_map(mask, 10, 3)
    reference += np.where(mask == 1, 1.0, 0.0)  # w_c = 2 for class 1
    assert np.allclose(ours, reference, atol=1e-4)
    assert ours[0, 3] == pytest.approx(1 + 10 * np.exp(-1 / 18), rel=1e-5)


def test_unet_loss_weights_ce_and_caches_by_mask_content():
    logits, target = _example(8, shape=(2, 3, 10, 12))
    loss_fn = UNetWeightedLoss(w0=10, sigma=5)
    value = loss_fn(logits, target).item()
    maps = torch.stack([torch.from_numpy(unet_weight_map(m.numpy(), 10, 5)) for m in target])
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    assert value == pytest.approx(((ce * maps).sum() / (target != 255).sum()).item(), rel=1e-5)
    assert len(loss_fn._cache) == 2
    loss_fn(logits, target)
    assert len(loss_fn._cache) == 2  # same masks: no new maps


def test_build_loss_weighted_sum_and_options():
    logits, target = _example(9)
    combined = build_loss({"ce": 1.0, "dice": 0.5})
    assert isinstance(combined, WeightedSumLoss)
    expected = CrossEntropyLoss()(logits, target) + 0.5 * DiceLoss()(logits, target)
    assert combined(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    focal = build_loss("focal", {"focal": {"gamma": 0.5}})
    assert isinstance(focal, FocalLoss) and focal.gamma == 0.5
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ohem = build_loss({"ohem": 1.0, "lovasz": 1.0}, class_weights=weight, label_smoothing=0.1)
    assert ohem.losses["ohem"].weight.tolist() == weight.tolist()
    assert ohem.losses["ohem"].label_smoothing == 0.1
    set_class_weights(ohem, torch.ones(4))
    assert ohem.losses["ohem"].weight.tolist() == [1.0] * 4
    assert set(LOSSES) == {"ce", "focal", "dice", "lovasz", "ohem", "unet"}


@pytest.mark.parametrize(
    "loss, options, message",
    [
        ("cee", None, "unknown loss 'cee'; known: ce, focal"),
        ({"ce": 1.0}, {"focal": {"gamma": 2}}, "loss_options for 'focal', which is not in loss"),
        ("focal", {"focal": {"gama": 2}}, "loss_options.focal: unknown option(s) ['gama']"),
        ("ce", {"ce": {"weight": [1, 2]}}, "class weights come from class_weights"),
    ],
)
def test_build_loss_errors_are_clear(loss, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_loss(loss, options)


def test_model_loss_options_and_aux_heads():
    from seglight.models import UNet

    model = UNet(
        num_classes=4,
        encoder="original",
        base_channels=4,
        loss={"ce": 1.0, "focal": 0.5},
        loss_options={"focal": {"gamma": 1.0}},
        aux_weight=0.4,
    )
    logits, target = _example(10)
    aux = torch.randn(2, 4, 3, 3)
    total = model.compute_loss({"out": logits, "aux": [aux]}, target)
    crit = model.criterion
    up = F.interpolate(aux, size=(5, 6), mode="bilinear", align_corners=False)
    expected = crit(logits, target) + 0.4 * crit(up, target)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert crit.losses["focal"].gamma == 1.0


def test_ohem_selects_without_sorting_and_matches_the_sorted_rule(monkeypatch):
    """OHEM's threshold comes from a selection (kthvalue), equal to the sort-based rule
    threshold = max(thresh, k-th smallest p_true), k = min(min_kept * B, n_valid - 1)."""
    from seglight.losses import OhemCrossEntropyLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 9, 7, generator=g)
    target = torch.randint(0, 4, (2, 9, 7), generator=g)
    target[0, :5] = 255
    p_true = logits.softmax(1).gather(1, target.clamp(max=3)[:, None])[:, 0]
    valid = target != 255
    for min_kept in (3, 20, 10_000):  # k inside the valid pixels, and beyond them
        ranked = p_true[valid].sort().values
        kth = ranked[min(min_kept * 2, len(ranked) - 1)]
        expected = valid & (p_true < max(float(kth), 0.7))
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "sort", lambda *a, **k: pytest.fail("OHEM sorted"))
            keep = OhemCrossEntropyLoss(min_kept=min_kept).hard_pixels(logits, target)
        assert torch.equal(keep, expected)


def test_dice_needs_no_one_hot_and_matches_its_formula(monkeypatch):
    from seglight.losses import DiceLoss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 6, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 4, (2, 6, 8), generator=g)  # class 4 absent
    target[1, 0] = 255
    valid = (target != 255)[:, None]
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(target.clamp(max=4), 5).permute(0, 3, 1, 2) * valid
    inter, denom = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    expected = ((1 - 2 * inter / denom) * present).sum() / present.sum()
    monkeypatch.setattr(F, "one_hot", lambda *a, **k: pytest.fail("Dice built a one-hot"))
    loss = DiceLoss()(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
