"""Mask2Former: the Hungarian matching, the pure-PyTorch deformable attention, masked attention,
semantic inference, the set loss (it trains), the size at the paper's setting and bad options.
The registry tests (tests/test_models.py, tests/test_experiments.py) cover the common contract."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, make_fake_camvid

from seglight.cli import run
from seglight.errors import ConfigError
from seglight.models import Mask2Former
from seglight.models.mask2former import (
    AttentionLayer,
    MSDeformAttn,
    SetCriterion,
    attention_mask,
    hungarian_match,
    ms_deform_attn,
    pairwise_mask_costs,
    semantic_inference,
    semantic_targets,
)

TINY = {
    "encoder": "mobilenetv3_small_050",  # 0.27M parameters, strides 4..32
    "hidden_dim": 32,
    "num_heads": 4,
    "dim_feedforward": 64,
    "dec_layers": 3,
    "enc_layers": 1,
    "enc_dim_feedforward": 64,
    "num_queries": 8,
    "num_points": 256,
}


def brute_force(cost: torch.Tensor) -> float:
    """The least total cost of assigning each column to a distinct row, by enumeration."""
    rows, cols = cost.shape
    return min(
        sum(float(cost[r, c]) for c, r in enumerate(perm))
        for perm in itertools.permutations(range(rows), cols)
    )


def test_hungarian_match_is_the_optimal_assignment():
    gen = torch.Generator().manual_seed(0)
    for queries, targets in [(5, 3), (6, 6), (4, 1), (7, 4)]:
        for _ in range(5):
            cost = torch.rand(queries, targets, generator=gen)
            rows, cols = hungarian_match(cost)
            assert len(set(rows.tolist())) == len(rows) == targets  # each target once
            assert sorted(cols.tolist()) == list(range(targets))
            assert cost[rows, cols].sum().item() == pytest.approx(brute_force(cost), abs=1e-6)


def test_matching_cost_is_class_bce_and_dice_and_picks_the_right_queries():
    # 4 queries, 2 targets on 32 points: query 2 predicts target 0's mask and class, query 0
    # target 1's; the matcher's pairwise costs are the per-pair losses
    gen = torch.Generator().manual_seed(1)
    targets = (torch.rand(2, 32, generator=gen) > 0.5).float()
    logits = torch.randn(4, 32, generator=gen)
    bce, dice = pairwise_mask_costs(logits, targets)
    for q, t in itertools.product(range(4), range(2)):
        ref_bce = F.binary_cross_entropy_with_logits(logits[q], targets[t])
        p = logits[q].sigmoid()
        ref_dice = 1 - (2 * (p * targets[t]).sum() + 1) / (p.sum() + targets[t].sum() + 1)
        assert bce[q, t].item() == pytest.approx(ref_bce.item(), rel=1e-5)
        assert dice[q, t].item() == pytest.approx(ref_dice.item(), rel=1e-5)

    criterion = SetCriterion(num_classes=3, num_points=64)
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, :, 4:] = 2  # classes 0 (left half) and 2 (right half)
    (labels, tgt_masks) = semantic_targets(mask, 255)[0]
    assert labels.tolist() == [0, 2]
    mask_logits = torch.full((1, 4, 8, 8), -5.0)
    class_logits = torch.zeros(1, 4, 4)
    mask_logits[0, 2, :, :4], class_logits[0, 2, 0] = 5.0, 5.0  # query 2 = class 0, left
    mask_logits[0, 0, :, 4:], class_logits[0, 0, 2] = 5.0, 5.0  # query 0 = class 2, right
    rows, cols = criterion.match(class_logits, mask_logits, [(labels, tgt_masks)])[0]
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True)) == {0: 2, 1: 0}


def test_semantic_targets_one_mask_per_class_present_without_the_ignore_label():
    mask = torch.tensor([[[1, 1, 255], [3, 3, 1]]])
    labels, masks = semantic_targets(mask, 255)[0]
    assert labels.tolist() == [1, 3]
    assert masks.tolist() == [[[1, 1, 0], [0, 0, 1]], [[0, 0, 0], [1, 1, 0]]]


def test_deformable_attention_samples_bilinearly_at_the_points():
    torch.manual_seed(0)
    d = 3
    shapes = [(4, 5), (2, 3)]
    value = torch.randn(1, 4 * 5 + 2 * 3, 1, d)
    level0 = value[0, :20, 0].view(4, 5, d)
    level1 = value[0, 20:, 0].view(2, 3, d)

    def run(points: list[list[tuple[float, float]]], weights: list[list[float]]) -> torch.Tensor:
        # one query, one head, 2 levels, 1 point per level
        loc = torch.tensor(points, dtype=torch.float32).view(1, 1, 1, 2, 1, 2)
        w = torch.tensor(weights, dtype=torch.float32).view(1, 1, 1, 2, 1)
        return ms_deform_attn(value, shapes, loc, w)[0, 0]

    # a pixel centre ((j + 0.5) / W, (i + 0.5) / H) gives that pixel's value exactly
    for i, j in [(0, 0), (2, 3), (3, 4)]:
        out = run([[((j + 0.5) / 5, (i + 0.5) / 4)], [(0.5 / 3, 0.5 / 2)]], [[1.0], [0.0]])
        torch.testing.assert_close(out, level0[i, j])
    # half-way between two horizontal neighbours: their mean; weights combine the levels
    out = run([[(2.0 / 5, 1.5 / 4)], [(2.5 / 3, 1.5 / 2)]], [[0.25], [0.75]])
    expected = 0.25 * (level0[1, 1] + level0[1, 2]) / 2 + 0.75 * level1[1, 2]
    torch.testing.assert_close(out, expected)
    # on the map's top edge, above pixel (0, 0)'s centre: half of it (zero padding outside)
    out = run([[(0.5 / 5, 0.0)], [(0.5, 0.5)]], [[1.0], [0.0]])
    torch.testing.assert_close(out, 0.5 * level0[0, 0])


def test_deformable_attention_offsets_are_in_pixels_of_each_level():
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=4, levels=2, heads=1, points=1)
    with torch.no_grad():
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
        attn.sampling_offsets.weight.zero_()
        # one pixel to the right on level 0, one pixel down on level 1
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    shapes = [(4, 6), (2, 3)]
    value = torch.randn(1, 24 + 6, 4)
    # reference: the centre of pixel (1, 2) of level 0 = pixel (0, 1) of level 1 (same point)
    ref = torch.tensor([2.5 / 6, 1.5 / 4]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    out = attn(torch.randn(1, 1, 4), ref, value, shapes)[0, 0]
    level0, level1 = value[0, :24].view(4, 6, 4), value[0, 24:].view(2, 3, 4)
    # level 0: one pixel right of (1, 2)'s centre is (1, 3)'s centre. Level 1 (half the size):
    # the point is at pixel coordinates (x 0.75, y 0.75 + 0.5 = 1.25), so bilinear weights 0.25 /
    # 0.75 on columns 0 / 1 and 0.75 / 0.25 on rows 1 / 2 (row 2 is outside: zero). The attention
    # weights start uniform: 0.5 per level.
    level1_sample = 0.75 * (0.25 * level1[1, 0] + 0.75 * level1[1, 1])
    expected = 0.5 * level0[1, 3] + 0.5 * level1_sample
    torch.testing.assert_close(out, expected)


def test_attention_mask_blocks_background_and_unmasks_empty_rows():
    logits = torch.tensor([[[[2.0, -1.0], [-3.0, 4.0]], [[-1.0, -2.0], [-3.0, -4.0]]]])  # B1 Q2
    mask = attention_mask(logits, (2, 2), heads=3)
    assert mask.shape == (3, 2, 4)
    for h in range(3):  # the same mask for every head
        assert mask[h, 0].tolist() == [False, True, True, False]  # attends the foreground
        assert mask[h, 1].tolist() == [False] * 4  # all background: attends everywhere


def test_masked_cross_attention_ignores_the_masked_memory():
    torch.manual_seed(0)
    layer = AttentionLayer(dim=8, heads=2).eval()
    x, pos = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    memory, key_pos = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    logits = torch.tensor([[[1.0, 1.0, -1.0, -1.0, -1.0, -1.0], [1.0] * 6]]).view(1, 2, 1, 6)
    mask = attention_mask(logits, (1, 6), heads=2)
    out = layer(x, memory, pos, key_pos, mask)
    changed = memory.clone()
    changed[0, 2:] = torch.randn(4, 8) * 10  # only memory query 0 may not see
    out2 = layer(x, changed, pos, key_pos, mask)
    torch.testing.assert_close(out[0, 0], out2[0, 0])  # query 0 attends positions 0-1 only
    assert not torch.allclose(out[0, 1], out2[0, 1])  # query 1 attends everything


def test_decoder_cycles_over_the_three_scales():
    torch.manual_seed(0)
    model = Mask2Former(num_classes=3, **{**TINY, "dec_layers": 4}).eval()
    keys = []
    for layer in model.net.decoder.cross:
        layer.attn.register_forward_hook(lambda m, args, out: keys.append(args[1].shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    # 1/32 (2x3), 1/16 (4x6), 1/8 (8x12), then 1/32 again
    assert keys == [6, 24, 96, 6]


def test_semantic_inference_is_the_papers_formula():
    torch.manual_seed(0)
    cls, masks = torch.randn(2, 5, 4), torch.randn(2, 5, 6, 7)  # 5 queries, 3 classes
    scores = semantic_inference(cls, masks)
    ref = torch.zeros(2, 3, 6, 7)
    for b, q in itertools.product(range(2), range(5)):
        probs = cls[b, q].softmax(-1)[:-1]
        ref[b] += probs[:, None, None] * masks[b, q].sigmoid()
    torch.testing.assert_close(scores, ref)

    # the network's eval output: log of those scores (from the final prediction, upsampled to
    # the input), normalised over classes: same argmax
    model = Mask2Former(num_classes=3, **TINY).eval()
    preds = []
    model.net.decoder.register_forward_hook(lambda m, args, out: preds.append(out[-1]))
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3, 45, 61)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2, 45, 61))
    cls, masks = preds[0]
    up = F.interpolate(masks, size=(64, 64), mode="bilinear", align_corners=False)[..., :45, :61]
    assert torch.equal(out.argmax(1), semantic_inference(cls, up).argmax(1))


def test_set_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = Mask2Former(num_classes=3, **TINY).train()
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    y[0, :, 16:] = 1
    y[1, 16:] = 2
    y[1, :4, :4] = 255  # ignored pixels
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model.compute_loss(model.net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0], losses  # 34.7 -> 7.3 here
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    labelled = y != 255
    assert (pred[labelled] == y[labelled]).float().mean() > 0.9


def test_loss_parts_add_up_and_odd_inputs_are_padded_with_the_ignore_label():
    torch.manual_seed(0)
    model = Mask2Former(num_classes=3, **TINY).train()
    out = model.net(torch.randn(1, 3, 33, 47))
    assert out["padded_size"] == (64, 64) and out["pred_masks"].shape[-2:] == (16, 16)
    assert len(out["aux_outputs"]) == TINY["dec_layers"]
    loss, parts = model.set_criterion(out, torch.randint(0, 3, (1, 33, 47)))
    assert set(parts) == {"ce", "mask", "dice"}
    torch.testing.assert_close(loss, sum(parts.values()))
    # an unlabelled image: every query is "no object"; no mask to match
    loss, parts = model.set_criterion(out, torch.full((1, 33, 47), 255))
    assert parts["mask"] == 0 and parts["dice"] == 0 and torch.isfinite(parts["ce"])
    loss.backward()


def test_default_r50_has_the_papers_size():
    model = Mask2Former(num_classes=150)
    assert 40e6 < sum(p.numel() for p in model.parameters()) < 48e6  # paper: 44M
    assert len(model.net.decoder.cross) == 9 and len(model.net.pixel_decoder.layers) == 6
    assert model.net.decoder.query_feat.num_embeddings == 100


def test_frozen_batchnorm_as_released_when_pretrained(tmp_path):
    # facebookresearch/Mask2Former configs/ade20k/semantic-segmentation/
    # Base-ADE20K-SemanticSegmentation.yaml: RESNETS.NORM unset, i.e. detectron2's FrozenBN
    import timm

    weights = tmp_path / "encoder.pth"
    torch.save(timm.create_model(TINY["encoder"]).state_dict(), weights)

    def norms(model: Mask2Former) -> tuple[int, int]:
        modules = list(model.net.encoder.modules())
        trainable = sum(isinstance(m, torch.nn.BatchNorm2d) for m in modules)
        frozen = sum("Frozen" in type(m).__name__ for m in modules)
        return trainable, frozen

    pretrained = Mask2Former(num_classes=3, encoder_weights=str(weights), **TINY)
    trainable, frozen = norms(pretrained)
    assert trainable == 0 and frozen > 0
    # fixed statistics and affine: nothing to train, nothing updated by a training forward
    assert not any("bn" in n for n, _ in pretrained.net.encoder.named_parameters())
    before = {k: v.clone() for k, v in pretrained.net.encoder.state_dict().items()}
    pretrained.train()(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(v, before[k]) for k, v in pretrained.net.encoder.state_dict().items())
    assert norms(Mask2Former(num_classes=3, **TINY))[1] == 0  # from scratch: BatchNorm trains
    assert norms(Mask2Former(num_classes=3, frozen_bn=True, **TINY))[0] == 0
    assert (
        norms(Mask2Former(num_classes=3, encoder_weights=str(weights), frozen_bn=False, **TINY))[1]
        == 0
    )


def test_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="num_queries must be >= 1, got 0"):
        Mask2Former(num_classes=3, num_queries=0)
    with pytest.raises(
        ConfigError, match=r"Mask2Former: encoder 'resnet18' with encoder_indices \[3, 4\] gives 2"
    ):
        Mask2Former(num_classes=3, encoder="resnet18", encoder_indices=[3, 4])
    # a training method's per-pixel losses cannot train it: refused, not silently ineffective
    from seglight.methods.base import build_network

    with pytest.raises(ConfigError, match="network: Mask2Former trains with its own objective"):
        build_network({"class_path": "Mask2Former", "init_args": TINY}, num_classes=3)


def test_cli_fit_logs_the_loss_parts_and_validates_on_the_semantic_scores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_fake_camvid(tmp_path / "camvid", {"train": 2, "val": 2, "test": 1}, size=(40, 56))
    options = [f"--model.{k}={v}" for k, v in TINY.items()]
    cli = run(
        ["fit", "--config", str(REPO / "experiments" / "mask2former.yaml"), *options,
         "--data.root", str(root), "--data.crop_size", "[32, 32]", "--data.batch_size", "2",
         "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
         "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run")]
    )  # fmt: skip
    logged = cli.trainer.callback_metrics
    parts = [logged[f"train/loss_{k}"] for k in ("ce", "mask", "dice")]
    assert all(torch.isfinite(p) and p >= 0 for p in parts)
    torch.testing.assert_close(sum(parts), logged["train/loss_step"])
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= summary["val"]["mIoU"] <= 1 and summary["val"]["loss"] > 0
