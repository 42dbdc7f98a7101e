import json

import pytest
import torch
import torch.nn.functional as F

from seglight.losses import CrossEntropyLoss, load_class_weights


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
