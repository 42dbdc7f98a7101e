"""Mask2Former (Cheng, Misra, Schwing, Kirillov and Girdhar, CVPR 2022, "Masked-attention Mask
Transformer for Universal Image Segmentation") for semantic segmentation, at the paper's ADE20K
R50 setting (Sec. 4, the ADE20K semantic table: 47.2 mIoU single-scale, as in the released model
zoo; the authors' released config
``configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml`` in
facebookresearch/Mask2Former settles what the paper leaves open):

- backbone: any timm encoder with four levels at strides 4..32 (default ``resnet50``; a plain
  ViT through BEiT's simple pyramid, seglight.nn.pyramid); the input is zero-padded to a multiple
  of 32 (the released ``SIZE_DIVISIBILITY``) and the outputs cropped back;
- pixel decoder (Sec. 3.2.1, the released ``MSDeformAttnPixelDecoder``): the 1/8, 1/16 and 1/32
  maps projected to 256 channels (1x1 conv + GroupNorm(32)), 6 encoder layers of multi-scale
  deformable attention (Zhu et al. 2021; 8 heads, 4 points per head and level, FFN 1024, post-
  norm, dropout 0) with sine position encodings plus a learned level embedding; then an FPN-style
  lateral of the 1/4 map (1x1 conv + GN) added to the upsampled 1/8 output and a 3x3 conv-GN-ReLU,
  and a 1x1 conv to the 256-channel per-pixel mask features at 1/4;
- transformer decoder (Sec. 3.2): 9 layers cycling over the 1/32, 1/16, 1/8 outputs (round
  robin), each masked cross-attention -> self-attention -> FFN 2048 (post-norm, 8 heads, hidden
  256, dropout 0), 100 learnable query features + query positional embeddings, level embeddings
  and sine positional encodings on the keys; the cross-attention of each layer is restricted to
  the foreground (sigmoid >= 0.5) of the mask the previous prediction made, resized to that level,
  and a query whose mask is empty attends everywhere (the released code's rule);
  after the learnable queries and after every layer, a shared LayerNorm, a linear class head
  (K + 1 logits, the last "no object") and a 3-layer MLP mask embedding dotted with the mask
  features predict classes and 1/4-resolution mask logits (10 predictions: deep supervision);
- set criterion (Sec. 3.2.3; released ``SetCriterion``/``HungarianMatcher``): per image, one
  binary target mask per class present in the semantic mask (the released semantic dataset
  mapper; ignore_index pixels belong to no mask, i.e. are background of every mask, as there);
  Hungarian matching (scipy.optimize.linear_sum_assignment) on cost 2 class (-p(class)) + 5
  mask BCE + 5 Dice, computed on 12544 points sampled uniformly (shared by all masks of the
  image); losses 2 x cross-entropy over all queries (no-object weight 0.1) + 5 x BCE + 5 x Dice of
  the matched masks on 12544 importance-sampled points (PointRend: 3x oversampling, 75% the most
  uncertain, 25% uniform), normalised by the number of target masks, applied to every one of the
  10 predictions and summed;
- semantic inference (the released ``semantic_inference``): the final mask logits upsampled to
  the (padded) input, cropped, then softmax(class)[..., :-1] x sigmoid(mask) summed over queries.

Output: in eval the network returns log(scores / sum_k scores) [B, K, H, W], the log of the
paper's per-pixel class scores normalised over classes: their argmax is the paper's prediction
and the base model's `val/loss` is the negative log-likelihood of the mask under this normalised
distribution (the configured `loss` on these log-probabilities; not the set loss). In training
the network returns a dict: "out" (the same log-scores, computed without gradient, for
monitoring), "pred_logits" [B, Q, K+1] and "pred_masks" [B, Q, H'/4, W'/4] of the last layer,
"aux_outputs" (the 9 earlier predictions) and "padded_size"; `Mask2Former.compute_loss` computes
the set loss from it. The logged parts `train/loss_ce`, `train/loss_mask`, `train/loss_dice` are
the weighted terms summed over the 10 predictions (they add up to `train/loss`).

Size: 44M parameters with R50 (paper, Table 1, COCO panoptic; the ADE20K table prints none); ours
44.04M at 150 classes (and at COCO's 133: the class head is 0.04M). The paper gives no FLOPs at a
fixed input size for ADE20K (its R50 FLOPs in Table 1 are averaged over COCO images), so
`paper_cost` is unset; ours at 512x512 and 150 classes: 70.3 GMACs (convolutions and matrix
products only, as seglight.profile counts: the bilinear sampling is not counted).

Differences from the released code: (1) the deformable attention is the pure-PyTorch
``grid_sample`` path (the authors' ``ms_deform_attn_core_pytorch`` fallback), not their CUDA
kernel: the same function, slower and more memory-hungry on a GPU; (2) the number of target masks
that normalises the mask losses is per process, not averaged over GPUs; (3) weight decay follows
seglight's rule (none on norms and biases) and so applies to the query/level embeddings, which the
released config exempts (``WEIGHT_DECAY_EMBED: 0.0``); (4) data augmentation is seglight's
(random scale 0.5-2.0, crop, flip; the released config adds SSD colour jitter; its per-crop
category-area limit is off there, ``SINGLE_CATEGORY_MAX_AREA: 1.0``); (5) the backbone is timm's
ResNet-50 where the released one is detectron2's: the same layers (torchvision-style, stride in
the 3x3 conv: ``STRIDE_IN_1X1: False``), but detectron2's BatchNorm is frozen (``RESNETS.NORM``
is left at its default ``FrozenBN``: fixed ImageNet statistics and affine, with ``FREEZE_AT: 0``
training every convolution). ``frozen_bn`` does the same here and is on by default when
``encoder_weights`` is given (as released); from scratch (no weights) the BatchNorm trains, as
frozen initial statistics would not normalise anything. The released weights are torchvision's
ImageNet R-50 (timm's ``resnet50.tv_in1k``; timm's default ``resnet50`` weights are its own
recipe's); (6) the attention mask is computed as logit < 0, which is sigmoid < 0.5. The released training clips the gradient norm at 0.01 and uses a backbone
learning-rate multiplier 0.1: the ADE20K experiment file sets both (``gradient_clip_val``,
``encoder_lr_mult``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from timm.layers import freeze_batch_norm_2d
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import TimmEncoder, pad_to_multiple
from seglight.nn.pyramid import FeaturePyramid


# ----------------------------------------------------------------------------- shared pieces
def sine_position_embedding(x: torch.Tensor, num_feats: int) -> torch.Tensor:
    """DETR's normalised sine position encoding of a map x [B, C, H, W] (no padding mask):
    [1, 2 * num_feats, H, W], y features first, each half interleaving sin and cos."""
    h, w = x.shape[-2:]
    scale, eps = 2 * math.pi, 1e-6
    y = torch.arange(1, h + 1, dtype=torch.float32, device=x.device) / (h + eps) * scale
    xs = torch.arange(1, w + 1, dtype=torch.float32, device=x.device) / (w + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=x.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # [n] -> [n, num_feats]
        p = pos[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, num_feats)
    pos_x = encode(xs)[None, :, :].expand(h, w, num_feats)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)[None].to(x.dtype)


def xavier_fill(module: nn.Module) -> None:
    """detectron2's ``c2_xavier_fill`` (Caffe2's XavierFill): uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def conv_gn(in_channels: int, out_channels: int, kernel_size: int, relu: bool) -> nn.Sequential:
    """Conv (no bias) -> GroupNorm(32) [-> ReLU], XavierFill: the pixel decoder's FPN convs."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    xavier_fill(conv)
    layers = [conv, nn.GroupNorm(32, out_channels)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class FFN(nn.Module):
    """Post-norm transformer FFN: x + Linear(ReLU(Linear(x))), then LayerNorm. [..., C] -> [..., C]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


def xavier_init_matrices(module: nn.Module) -> None:
    """Xavier-uniform on every parameter with more than one dimension (DETR's transformer init)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


# ----------------------------------------------------------------------------- pixel decoder
def ms_deform_attn(
    value: torch.Tensor,
    shapes: list[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention in pure PyTorch (bilinear ``grid_sample``, zero outside;
    the authors' ``ms_deform_attn_core_pytorch``).

    Args:
        value: [N, S, M, D], the L levels' maps flattened and concatenated (S = sum H_l W_l),
            M heads of D channels.
        shapes: the levels' (H_l, W_l).
        locations: [N, Lq, M, L, P, 2] sampling points (x, y) in [0, 1] over each level (0 and 1
            are the outer edges of the border pixels: pixel j's centre is (j + 0.5) / W_l).
        weights: [N, Lq, M, L, P] attention weights.

    Returns: [N, Lq, M * D], sum over levels and points of weight x bilinear sample.
    """
    n, _, m, d = value.shape
    lq = locations.shape[1]
    grids = 2 * locations - 1
    out = value.new_zeros(n * m, d, lq)
    per_level = value.split([h * w for h, w in shapes], 1)
    for level, (v, (h, w)) in enumerate(zip(per_level, shapes, strict=True)):
        v = v.flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        wl = weights[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P]
        out = out + (sampled * wl[:, None]).sum(-1)
    return out.view(n, m * d, lq).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3): each query
    samples `points` offsets around its reference point on each of `levels` maps, per head, and
    takes their softmax-weighted sum. Shapes: query [N, Lq, C], reference [N, Lq, L, 2] in
    [0, 1], value [N, S, C] -> [N, Lq, C]."""

    def __init__(self, dim: int = 256, levels: int = 3, heads: int = 8, points: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"hidden_dim {dim} must divide by num_heads {heads}")
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR's init: zero offset weights, biases on a ring (head h points in
        # direction 2 pi h / heads, point k at distance k + 1), uniform attention
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.heads, 1, 1, 2)
        grid = grid.repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        value: torch.Tensor,
        shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        n, lq, c = query.shape
        h, lv, p = self.heads, self.levels, self.points
        v = self.value_proj(value).view(n, value.shape[1], h, c // h)
        offsets = self.sampling_offsets(query).view(n, lq, h, lv, p, 2)
        weights = self.attention_weights(query).view(n, lq, h, lv * p).softmax(-1)
        # offsets are in pixels of each level: normalise by its (W, H)
        size = torch.tensor([(w, hh) for hh, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference[:, :, None, :, None, :] + offsets / size[None, None, None, :, None]
        out = ms_deform_attn(v, shapes, locations, weights.view(n, lq, h, lv, p))
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels' pixels (post-norm) then FFN. [N, S, C] -> same."""

    def __init__(self, dim: int, heads: int, points: int, levels: int, ffn: int) -> None:
        super().__init__()
        self.attn = MSDeformAttn(dim, levels, heads, points)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn)

    def forward(self, src, pos, reference, shapes) -> torch.Tensor:  # noqa: ANN001 - see class
        src = self.norm(src + self.attn(src + pos, reference, src, shapes))
        return self.ffn(src)


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder (see the module docstring).

    Shapes: four maps [B, in_channels[i], H/4..H/32] (fine to coarse) -> (mask features
    [B, mask_dim, H/4, W/4], three maps [B, dim, H/s, W/s] for s = 32, 16, 8).
    """

    def __init__(
        self,
        in_channels: list[int],
        dim: int = 256,
        mask_dim: int = 256,
        layers: int = 6,
        heads: int = 8,
        points: int = 4,
        ffn: int = 1024,
    ) -> None:
        super().__init__()
        if dim % 32:
            raise ConfigError(f"hidden_dim must divide by 32 (GroupNorm's groups), got {dim}")
        self.dim = dim
        # coarse to fine: 1/32, 1/16, 1/8
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(32, dim)) for c in in_channels[:0:-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        levels = len(in_channels) - 1
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, heads, points, levels, ffn) for _ in range(layers)
        )
        for layer in self.layers:
            xavier_init_matrices(layer)
            layer.attn.reset_parameters()
        self.level_embed = nn.Parameter(torch.empty(levels, dim).normal_())
        self.lateral = conv_gn(in_channels[0], dim, 1, relu=False)
        self.output = conv_gn(dim, dim, 3, relu=True)
        self.mask_features = nn.Conv2d(dim, mask_dim, 1)
        xavier_fill(self.mask_features)

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """Every pixel's centre, normalised to [0, 1] (x, y): [1, S, 1, 2]; the same point is the
        reference on every level (no padding, so the valid ratios are 1)."""
        refs = []
        for h, w in shapes:
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            refs.append(torch.stack((gx.flatten(), gy.flatten()), -1))
        return torch.cat(refs)[None, :, None]

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        srcs, pos, shapes = [], [], []
        for i, (proj, f) in enumerate(zip(self.input_proj, features[:0:-1], strict=True)):
            x = proj(f)
            shapes.append(tuple(x.shape[-2:]))
            srcs.append(x.flatten(2).transpose(1, 2))
            p = sine_position_embedding(x, self.dim // 2) + self.level_embed[i].view(1, -1, 1, 1)
            pos.append(p.flatten(2).transpose(1, 2))
        src, pos_all = torch.cat(srcs, 1), torch.cat(pos, 1)
        reference = self.reference_points(shapes, src.device).to(src.dtype)
        reference = reference.expand(src.shape[0], -1, len(shapes), -1)
        for layer in self.layers:
            src = layer(src, pos_all, reference, shapes)
        b = src.shape[0]
        outs = [
            y.transpose(1, 2).reshape(b, self.dim, h, w)
            for y, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes, strict=True)
        ]
        fine = self.lateral(features[0])
        up = F.interpolate(outs[-1], size=fine.shape[-2:], mode="bilinear", align_corners=False)
        fine = self.output(fine + up)
        return self.mask_features(fine), outs


# ----------------------------------------------------------------------------- transformer decoder
class AttentionLayer(nn.Module):
    """Post-norm multi-head attention with positional embeddings added to queries and keys:
    norm(x + MHA(x + pos_q, mem + pos_k, mem, mask)). x [B, Q, C], mem [B, S, C]; `mask`
    [B * heads, Q, S] bool, True where attention is not allowed."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, memory, query_pos, key_pos, mask=None) -> torch.Tensor:  # noqa: ANN001
        out = self.attn(x + query_pos, memory + key_pos, memory, attn_mask=mask, need_weights=False)
        return self.norm(x + out[0])


def attention_mask(mask_logits: torch.Tensor, size: tuple[int, int], heads: int) -> torch.Tensor:
    """Masked attention's mask (Sec. 3.2.1, Eq. 2): True (not attended) where the predicted mask
    [B, Q, h, w], resized to the level's `size`, is background (sigmoid < 0.5); a query whose mask
    is background everywhere attends everywhere (the released code's rule, so that no row of the
    attention is empty). Returns [B * heads, Q, size[0] * size[1]], without gradient."""
    resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
    masked = resized.flatten(2) < 0  # sigmoid(x) < 0.5  <=>  x < 0
    masked = masked & ~masked.all(-1, keepdim=True)
    return masked.repeat_interleave(heads, dim=0)


class MaskedTransformerDecoder(nn.Module):
    """Mask2Former's transformer decoder (see the module docstring).

    Shapes: three maps [B, dim, h_l, w_l] (1/32, 1/16, 1/8) and mask features [B, mask_dim,
    H/4, W/4] -> list of layers + 1 predictions (class logits [B, Q, K + 1], mask logits
    [B, Q, H/4, W/4]), the first from the learnable queries alone.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int = 256,
        mask_dim: int = 256,
        num_queries: int = 100,
        heads: int = 8,
        ffn: int = 2048,
        layers: int = 9,
        levels: int = 3,
    ) -> None:
        super().__init__()
        self.heads, self.levels, self.dim = heads, levels, dim
        self.cross = nn.ModuleList(AttentionLayer(dim, heads) for _ in range(layers))
        self.self_attn = nn.ModuleList(AttentionLayer(dim, heads) for _ in range(layers))
        self.ffn = nn.ModuleList(FFN(dim, ffn) for _ in range(layers))
        for module in (self.cross, self.self_attn, self.ffn):
            xavier_init_matrices(module)
        self.norm = nn.LayerNorm(dim)
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(levels, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, mask_dim)
        )

    def predict(self, x: torch.Tensor, mask_features: torch.Tensor):  # noqa: ANN201
        x = self.norm(x)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        return self.class_embed(x), masks

    def forward(
        self, features: list[torch.Tensor], mask_features: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sizes = [tuple(f.shape[-2:]) for f in features]
        srcs = [
            f.flatten(2).transpose(1, 2) + self.level_embed.weight[i]
            for i, f in enumerate(features)
        ]
        pos = [
            sine_position_embedding(f, self.dim // 2).flatten(2).transpose(1, 2) for f in features
        ]
        b = mask_features.shape[0]
        query_pos = self.query_embed.weight[None].repeat(b, 1, 1)
        x = self.query_feat.weight[None].repeat(b, 1, 1)
        predictions = [self.predict(x, mask_features)]
        layers = zip(self.cross, self.self_attn, self.ffn, strict=True)
        for i, (cross, self_attn, ffn) in enumerate(layers):
            level = i % self.levels
            mask = attention_mask(predictions[-1][1], sizes[level], self.heads)
            x = cross(x, srcs[level], query_pos, pos[level], mask)
            x = ffn(self_attn(x, x, query_pos, query_pos))
            predictions.append(self.predict(x, mask_features))
        return predictions


def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """The paper's per-pixel class scores: sum over queries of softmax(class)[..., :-1] x
    sigmoid(mask). class_logits [B, Q, K + 1], mask_logits [B, Q, H, W] -> [B, K, H, W]."""
    probs = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqk,bqhw->bkhw", probs, mask_logits.sigmoid())


def log_normalised(scores: torch.Tensor) -> torch.Tensor:
    """log(scores / sum over classes) [B, K, H, W] for scores >= 0: log-probabilities whose
    argmax is the scores' (tiny scores clamped to keep the log finite)."""
    return torch.log_softmax(scores.float().clamp_min(1e-20).log(), dim=1)


class Mask2FormerNetwork(nn.Module):
    """Mask2Former as a plain nn.Module: [B, in_channels, H, W] -> log-normalised semantic scores
    [B, num_classes, H, W] (eval), or the prediction dict of the module docstring (training).

    Args:
        num_classes: the K classes (the class head has K + 1 outputs: the last is "no object").
        in_channels: input channels.
        encoder: a timm model with four levels at strides 4..32 (or a plain ViT).
        encoder_weights: null, "imagenet", a file or a URL (seglight.nn.encoders).
        encoder_indices: which timm feature levels to use (default: the last four).
        num_queries: object queries (100).
        hidden_dim: width of the pixel decoder, its mask features and the transformer decoder
            (256; a multiple of 32 for GroupNorm).
        num_heads: attention heads in both decoders (8).
        dim_feedforward: the transformer decoder's FFN width (2048).
        dec_layers: transformer decoder layers (9).
        enc_layers: deformable-attention layers of the pixel decoder (6).
        enc_points: sampling points per head and level (4).
        enc_dim_feedforward: the pixel decoder's FFN width (1024).
        frozen_bn: freeze the encoder's BatchNorm layers (statistics and affine fixed:
            detectron2's FrozenBN, the released backbone's norm).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        encoder_indices: tuple[int, ...] | None = None,
        num_queries: int = 100,
        hidden_dim: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        enc_layers: int = 6,
        enc_points: int = 4,
        enc_dim_feedforward: int = 1024,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ConfigError(f"Mask2Former: num_queries must be >= 1, got {num_queries}")
        if dec_layers < 0 or enc_layers < 0:
            raise ConfigError(
                f"Mask2Former: dec_layers and enc_layers must be >= 0, got {dec_layers}, {enc_layers}"
            )
        self.encoder = TimmEncoder(
            encoder, encoder_weights, in_channels, out_indices=encoder_indices
        )
        if frozen_bn:  # after loading the weights: their statistics and affine are kept
            self.encoder = freeze_batch_norm_2d(self.encoder)
        self.neck = FeaturePyramid(
            self.encoder.channels,
            self.encoder.reductions,
            4,
            f"Mask2Former: encoder {encoder!r}"
            + (f" with encoder_indices {list(encoder_indices)}" if encoder_indices else ""),
        )
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            self.neck.channels,
            hidden_dim,
            hidden_dim,
            enc_layers,
            num_heads,
            enc_points,
            enc_dim_feedforward,
        )
        self.decoder = MaskedTransformerDecoder(
            num_classes, hidden_dim, hidden_dim, num_queries, num_heads, dim_feedforward, dec_layers
        )
        # the released SIZE_DIVISIBILITY (32), or the encoder's own multiple (a ViT's patch)
        self.size_multiple = self.encoder.input_multiple if self.encoder.input_multiple > 1 else 32

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.size_multiple)
        padded = (int(x.shape[-2]), int(x.shape[-1]))
        mask_features, multi_scale = self.pixel_decoder(self.neck(self.encoder(x)))
        predictions = self.decoder(multi_scale, mask_features)
        class_logits, mask_logits = predictions[-1]

        def scores() -> torch.Tensor:
            # as released: mask logits upsampled to the padded input, cropped, then combined
            up = F.interpolate(mask_logits, size=padded, mode="bilinear", align_corners=False)
            return log_normalised(semantic_inference(class_logits, up[..., :h, :w]))

        if not self.training:
            return scores()
        with torch.no_grad():  # for monitoring only: the set loss trains the network
            out = scores()
        return {
            "out": out,
            "pred_logits": class_logits,
            "pred_masks": mask_logits,
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in predictions[:-1]],
            "padded_size": padded,
        }


# ----------------------------------------------------------------------------- set criterion
def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of maps x [N, C, H, W] at points coords [N, P, 2] ((x, y) in [0, 1] over
    the whole map, as PointRend's ``point_sample``): [N, C, P]."""
    return F.grid_sample(x, 2 * coords[:, :, None] - 1, align_corners=False).squeeze(3)


def importance_points(
    logits: torch.Tensor, num_points: int, oversample: float, importance: float
) -> torch.Tensor:
    """PointRend's training points for mask logits [N, 1, h, w]: `oversample` x num_points
    uniform candidates, the `importance` x num_points most uncertain (|logit| smallest) kept, the
    rest uniform. Returns [N, num_points, 2] in [0, 1]."""
    n = logits.shape[0]
    candidates = torch.rand(n, int(num_points * oversample), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates).abs()[:, 0]  # [N, num_sampled]
    k = int(importance * num_points)
    idx = uncertainty.topk(k, dim=1, sorted=False).indices  # a set: order is irrelevant
    chosen = torch.gather(candidates, 1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, num_points - k, 2, device=logits.device)
    return torch.cat([chosen, rest], dim=1)


def pairwise_mask_costs(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sigmoid BCE and Dice loss (+1 smoothing) between every prediction and every target.
    logits [Q, P] (at P points), targets [T, P] in {0, 1} -> two [Q, T] matrices."""
    p = logits.shape[1]
    pos = F.softplus(-logits)  # BCE against 1; against 0 it is softplus(x) = pos + x
    bce = (pos @ targets.T + (pos + logits) @ (1 - targets).T) / p
    probs = logits.sigmoid()
    dice = 1 - (2 * probs @ targets.T + 1) / (probs.sum(-1)[:, None] + targets.sum(-1)[None] + 1)
    return bce, dice


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment of predictions (rows) to targets (columns) of least total cost, each target
    to one prediction (scipy's linear_sum_assignment): (row indices, column indices), int64."""
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def semantic_targets(
    mask: torch.Tensor, ignore_index: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image of mask [B, H, W]: (labels [T] of the classes present, binary masks [T, H, W]
    float), ignore_index excluded (its pixels are background of every mask), as the released
    semantic dataset mapper builds them."""
    targets = []
    for m in mask:
        labels = m.unique()
        labels = labels[labels != ignore_index]
        targets.append((labels, (m[None] == labels[:, None, None]).float()))
    return targets


class SetCriterion(nn.Module):
    """Mask2Former's loss (see the module docstring): Hungarian matching per prediction, then
    class CE + mask BCE + Dice on sampled points, summed over all predictions.

    Args:
        num_classes: K (the class logits have K + 1 entries).
        class_weight, mask_weight, dice_weight: loss and matching-cost weights (2, 5, 5).
        no_object_weight: CE weight of the "no object" class (0.1).
        num_points: points for the matching cost and the mask losses (12544 = 112 x 112).
        oversample_ratio, importance_sample_ratio: PointRend sampling of the loss points (3, 0.75).
        ignore_index: the mask value of unlabelled pixels.
    """

    def __init__(
        self,
        num_classes: int,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if num_points < 1:
            raise ConfigError(f"Mask2Former: num_points must be >= 1, got {num_points}")
        self.num_classes = num_classes
        self.weights = {"ce": class_weight, "mask": mask_weight, "dice": dice_weight}
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.ignore_index = ignore_index
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @torch.no_grad()
    def match(
        self, class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: (query indices, target indices) of the least-cost assignment."""
        # in float32 whatever the autocast (the released matcher disables it too)
        with torch.autocast(class_logits.device.type, enabled=False):
            return [
                self.match_image(c, m, t)
                for c, m, t in zip(class_logits, mask_logits, targets, strict=True)
            ]

    def match_image(
        self, logits: torch.Tensor, masks: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image: class logits [Q, K+1], mask logits [Q, h, w], target (labels [T], masks
        [T, H, W]); the cost is computed on num_points uniform points shared by all masks."""
        labels, tgt = target
        coords = torch.rand(1, self.num_points, 2, device=masks.device)
        out = point_sample(masks[None].float(), coords)[0]  # [Q, P]
        bce, dice = pairwise_mask_costs(out, point_sample(tgt[None], coords)[0])
        cost_class = -logits.float().softmax(-1)[:, labels]  # [Q, T]
        w = self.weights
        return hungarian_match(w["mask"] * bce + w["ce"] * cost_class + w["dice"] * dice)

    def layer_losses(
        self, class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list, num_masks: float
    ) -> dict[str, torch.Tensor]:
        """Unweighted CE, BCE and Dice of one prediction (class logits [B, Q, K+1], mask logits
        [B, Q, h, w]) against the targets (semantic_targets)."""
        device = class_logits.device
        batch_idx, query_idx, labels, tgt = [], [], [], []
        for b, ((q, t), (lab, masks)) in enumerate(
            zip(self.match(class_logits, mask_logits, targets), targets, strict=True)
        ):
            t = t.to(device)
            batch_idx.append(torch.full_like(q, b))
            query_idx.append(q)
            labels.append(lab[t])
            tgt.append(masks[t])
        batch_idx, query_idx = torch.cat(batch_idx).to(device), torch.cat(query_idx).to(device)
        # unmatched queries are trained towards "no object" (the last class)
        classes = torch.full(class_logits.shape[:2], self.num_classes, device=device)
        classes[batch_idx, query_idx] = torch.cat(labels).long()
        ce = F.cross_entropy(class_logits.float().transpose(1, 2), classes, self.empty_weight)
        src = mask_logits[batch_idx, query_idx][:, None].float()  # [N, 1, h, w]
        if src.shape[0] == 0:  # no labelled pixel in the batch: nothing to match
            zero = mask_logits.sum() * 0.0
            return {"ce": ce, "mask": zero, "dice": zero}
        tgt = torch.cat(tgt)[:, None]  # [N, 1, H, W]
        with torch.no_grad():
            coords = importance_points(
                src, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            labels = point_sample(tgt, coords)[:, 0]
        logits = point_sample(src, coords)[:, 0]  # [N, P]
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
        probs = logits.sigmoid()
        dice = 1 - (2 * (probs * labels).sum(-1) + 1) / (probs.sum(-1) + labels.sum(-1) + 1)
        return {"ce": ce, "mask": bce.sum() / num_masks, "dice": dice.sum() / num_masks}

    def forward(
        self, output: dict, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and its weighted parts {"ce", "mask", "dice"} summed over predictions.

        output: the network's training dict; mask: int64 [B, H, W] at the input's size (padded
        here with ignore_index to the network's padded input, as the released code pads)."""
        ph, pw = output.get("padded_size", mask.shape[-2:])
        if (ph, pw) != tuple(mask.shape[-2:]):
            mask = F.pad(
                mask, (0, pw - mask.shape[-1], 0, ph - mask.shape[-2]), value=self.ignore_index
            )
        targets = semantic_targets(mask, self.ignore_index)
        num_masks = max(1.0, float(sum(len(labels) for labels, _ in targets)))
        parts = {k: mask.new_zeros((), dtype=torch.float32) for k in self.weights}
        for pred in [*output.get("aux_outputs", []), output]:
            losses = self.layer_losses(pred["pred_logits"], pred["pred_masks"], targets, num_masks)
            for k, v in losses.items():
                parts[k] = parts[k] + self.weights[k] * v
        return sum(parts.values()), parts


# ----------------------------------------------------------------------------- LightningModule
class Mask2Former(SegmentationModel):
    """Mask2Former (Cheng et al. 2022): masked-attention mask transformer with a deformable-
    attention pixel decoder on any timm encoder, trained with a Hungarian-matched set loss.

    paper_params: R50, Table 1 (44M). See the module docstring for the outputs, `val/loss` and
    every difference from the released code.

    Args:
        encoder: any timm model with four levels at strides 4..32 (default resnet50).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL.
        encoder_indices: timm feature levels to use (default: the last four).
        num_queries: object queries (100).
        hidden_dim, num_heads, dim_feedforward, dec_layers, enc_layers, enc_points,
            enc_dim_feedforward: see Mask2FormerNetwork (256, 8, 2048, 9, 6, 4, 1024).
        num_points: points for matching and the mask losses (12544; fewer for small crops).
        oversample_ratio, importance_sample_ratio: PointRend point sampling (3.0, 0.75).
        class_weight, mask_weight, dice_weight: loss and matching weights (2, 5, 5).
        no_object_weight: CE weight of "no object" (0.1).
        frozen_bn: freeze the encoder's BatchNorm (detectron2's FrozenBN, as the released R50);
            default: on when `encoder_weights` is given, off from scratch.
    """

    paper_params: ClassVar[float | None] = 44.0
    # the objective is the set loss, not `loss` on the (log-normalised) logits
    trains_on_logits: ClassVar[bool] = False

    def __init__(
        self,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        encoder_indices: tuple[int, ...] | None = None,
        num_queries: int = 100,
        hidden_dim: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        enc_layers: int = 6,
        enc_points: int = 4,
        enc_dim_feedforward: int = 1024,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        frozen_bn: bool | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if frozen_bn is None:  # as released when pretrained (encoder_weights may say "none")
            frozen_bn = encoder_weights is not None and str(encoder_weights).lower() != "none"
        self.net = Mask2FormerNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            encoder_indices=tuple(encoder_indices) if encoder_indices else None,
            num_queries=num_queries,
            hidden_dim=hidden_dim,
            num_heads=num_heads,
            dim_feedforward=dim_feedforward,
            dec_layers=dec_layers,
            enc_layers=enc_layers,
            enc_points=enc_points,
            enc_dim_feedforward=enc_dim_feedforward,
            frozen_bn=frozen_bn,
        )
        self.set_criterion = SetCriterion(
            self.num_classes,
            class_weight,
            mask_weight,
            dice_weight,
            no_object_weight,
            num_points,
            oversample_ratio,
            importance_sample_ratio,
            self.hparams.ignore_index,
        )

    def compute_loss(self, output: torch.Tensor | dict, mask: torch.Tensor) -> torch.Tensor:
        """The set loss of the network's training dict (a plain tensor of scores falls back to
        the base model's `loss` on them)."""
        if not isinstance(output, dict):
            return super().compute_loss(output, mask)
        loss, parts = self.set_criterion(output, mask)
        if self._trainer is not None and self.training:
            # device tensors: Lightning writes them every log_every_n_steps, no per-step sync
            self.log_dict(
                {f"train/loss_{k}": v.detach() for k, v in parts.items()},
                on_step=True,
                on_epoch=False,
                batch_size=len(mask),
            )
        return loss
