"""The modern architectures (SegFormer, UPerNet, ViT heads, DDRNet, BiSeNetV2, HRNet-OCR,
Mask2Former) against their papers: parameter counts at the papers' class counts, the structure
the papers describe, and clear errors for bad options. The registry-wide tests (test_models.py)
cover shapes, odd sizes and gradients."""

from __future__ import annotations

import pytest
from torch import nn

from seglight.errors import ConfigError
from seglight.models import SegFormer


def millions(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# ----------------------------------------------------------------------------- SegFormer
@pytest.mark.parametrize("variant,paper", [("b0", 3.8), ("b2", 27.5)])
def test_segformer_parameters_match_table_2(variant, paper):
    model = SegFormer(num_classes=150, variant=variant)
    assert millions(model.net) == pytest.approx(paper, abs=0.05)


def test_segformer_encoder_is_mit():
    enc = SegFormer(num_classes=3, variant="b0").net.encoder.model
    blocks = [getattr(enc, f"stages_{i}").blocks[0] for i in range(4)]
    # efficient self-attention: keys/values reduced by 8/4/2 (stage 4 attends at full size)
    assert [b.attn.sr.stride[0] if b.attn.sr is not None else 1 for b in blocks] == [8, 4, 2, 1]
    # Mix-FFN expands by 4 in every stage (PVTv2's own default is 8/8/4/4)
    assert [b.mlp.fc1.out_features // b.mlp.fc1.in_features for b in blocks] == [4, 4, 4, 4]
    assert all(b.mlp.dwconv.groups == b.mlp.fc1.out_features for b in blocks)  # depthwise 3x3


def test_segformer_bad_variant():
    with pytest.raises(ConfigError, match="variant must be one of b0"):
        SegFormer(num_classes=3, variant="b9")
