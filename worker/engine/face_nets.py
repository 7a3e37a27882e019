"""The two helper networks of the WebUI's face restoration, with the parameter names of facexlib's released files.

- :class:`RetinaFaceResNet50`: the RetinaFace detector (``detection_Resnet50_Final.pth``): a torchvision
  ResNet-50 trunk whose ``layer2``/``layer3``/``layer4`` outputs (strides 8, 16, 32) feed a 3-level FPN
  (256 channels), one SSH context module per level and, per level, 1x1 heads for 2 anchors each: face/background
  logits, box offsets and 5 landmark offsets. facexlib: ``detection/retinaface.py`` (``RetinaFace``, config
  ``cfg_re50``) and ``detection/retinaface_net.py`` (``FPN``, ``SSH``, ``ClassHead``, ``BboxHead``, ``LandmarkHead``).
- :class:`ParseNet`: the face-parsing network (``parsing_parsenet.pth``): 512 -> 32 encoder of residual blocks,
  10 residual blocks, 32 -> 512 decoder, a 19-class mask head and an image head. facexlib: ``parsing/parsenet.py``
  built as ``ParseNet(in_size=512, out_size=512, parsing_ch=19)``.

Both are plain eval-time modules written for this project; only the parameter names follow the released files,
so ``load_state_dict(strict=True)`` takes those files as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# RetinaFace-ResNet50 (facexlib detection/retinaface.py, generate_config("resnet50")).
ANCHOR_SIZES: tuple[tuple[int, int], ...] = ((16, 32), (64, 128), (256, 512))  # per level, in pixels
STRIDES: tuple[int, ...] = (8, 16, 32)
VARIANCES: tuple[float, float] = (0.1, 0.2)
BGR_MEAN: tuple[float, float, float] = (104.0, 117.0, 123.0)  # subtracted from the BGR 0..255 input
FPN_CHANNELS = 256
ANCHORS_PER_CELL = 2
PARSING_CLASSES = 19


# ------------------------------------------------------------------------------------------------ RetinaFace


def _conv_bn(cin: int, cout: int, kernel: int, relu: bool) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU): the ``conv_bn``/``conv_bn_no_relu``/``conv_bn1X1`` blocks. With 256
    channels facexlib's LeakyReLU has slope 0, i.e. a ReLU; its index (2) holds no parameters."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _ResNetTrunk(nn.Module):
    """ResNet-50 without its pooling and classifier; returns the outputs of layer2, layer3 and layer4 (what
    torchvision's IntermediateLayerGetter with ``{'layer2': 1, 'layer3': 2, 'layer4': 3}`` keeps)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class _FPN(nn.Module):
    """Lateral 1x1 convs, top-down nearest upsampling added in, a 3x3 merge on the two finer levels."""

    def __init__(self, in_channels: tuple[int, int, int], out: int) -> None:
        super().__init__()
        self.output1 = _conv_bn(in_channels[0], out, 1, relu=True)
        self.output2 = _conv_bn(in_channels[1], out, 1, relu=True)
        self.output3 = _conv_bn(in_channels[2], out, 1, relu=True)
        self.merge1 = _conv_bn(out, out, 3, relu=True)
        self.merge2 = _conv_bn(out, out, 3, relu=True)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p1, p2, p3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        p2 = self.merge2(p2 + F.interpolate(p3, size=p2.shape[-2:], mode="nearest"))
        p1 = self.merge1(p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest"))
        return [p1, p2, p3]


class _SSH(nn.Module):
    """Single-stage context module: 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) branches concatenated, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half, quarter = channels // 2, channels // 4
        self.conv3X3 = _conv_bn(channels, half, 3, relu=False)
        self.conv5X5_1 = _conv_bn(channels, quarter, 3, relu=True)
        self.conv5X5_2 = _conv_bn(quarter, quarter, 3, relu=False)
        self.conv7X7_2 = _conv_bn(quarter, quarter, 3, relu=True)
        self.conv7x7_3 = _conv_bn(quarter, quarter, 3, relu=False)  # lower-case x: the released name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.conv5X5_1(x)
        wide = self.conv7X7_2(shared)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(shared), self.conv7x7_3(wide)], dim=1))


class _Head(nn.Module):
    """A 1x1 conv predicting ``values`` numbers per anchor, flattened to (batch, cells * anchors, values) in
    row-major cell order, anchors innermost: the order of the priors."""

    def __init__(self, channels: int, values: int) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(channels, ANCHORS_PER_CELL * values, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFaceResNet50(nn.Module):
    """RetinaFace with a ResNet-50 trunk. ``forward`` takes a BGR batch already minus :data:`BGR_MEAN` and
    returns (box offsets ``(B, N, 4)``, face probabilities ``(B, N)``, landmark offsets ``(B, N, 10)``) for the
    ``N`` priors of :func:`priors` at that input size."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _ResNetTrunk()
        self.fpn = _FPN((512, 1024, 2048), FPN_CHANNELS)
        self.ssh1, self.ssh2, self.ssh3 = _SSH(FPN_CHANNELS), _SSH(FPN_CHANNELS), _SSH(FPN_CHANNELS)
        self.ClassHead = nn.ModuleList(_Head(FPN_CHANNELS, 2) for _ in STRIDES)
        self.BboxHead = nn.ModuleList(_Head(FPN_CHANNELS, 4) for _ in STRIDES)
        self.LandmarkHead = nn.ModuleList(_Head(FPN_CHANNELS, 10) for _ in STRIDES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = self.fpn(self.body(x))
        feats = [self.ssh1(levels[0]), self.ssh2(levels[1]), self.ssh3(levels[2])]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, feats, strict=True)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, feats, strict=True)], dim=1)
        marks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, feats, strict=True)], dim=1)
        return boxes, logits.softmax(dim=-1)[..., 1], marks


def priors(height: int, width: int) -> torch.Tensor:
    """The anchors of an input of this size as (cx, cy, w, h), relative to the input (facexlib's ``PriorBox``):
    per level, cells row by row (``ceil(size / stride)`` of them), the level's two anchor sizes innermost."""
    rows = []
    for (small, large), step in zip(ANCHOR_SIZES, STRIDES, strict=True):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(fh, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(fw, dtype=torch.float64) + 0.5) * step / width
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")
        centers = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)  # (cells, 2)
        per_size = []
        for size in (small, large):
            wh = torch.tensor([size / width, size / height], dtype=torch.float64).expand_as(centers)
            per_size.append(torch.cat([centers, wh], dim=-1))
        rows.append(torch.stack(per_size, dim=1).reshape(-1, 4))  # cells x anchors, anchors innermost
    return torch.cat(rows).float()


def decode_boxes(offsets: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Box offsets -> (x1, y1, x2, y2) relative to the input: centre moved by ``offset * 0.1 * anchor size``,
    size scaled by ``exp(offset * 0.2)`` (facexlib ``retinaface_utils.decode``)."""
    centre = anchors[:, :2] + offsets[:, :2] * VARIANCES[0] * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp(offsets[:, 2:] * VARIANCES[1])
    top_left = centre - size / 2
    return torch.cat([top_left, top_left + size], dim=1)


def decode_landmarks(offsets: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Landmark offsets -> 5 (x, y) points relative to the input, flattened to 10 values (``decode_landm``)."""
    points = offsets.reshape(-1, 5, 2)
    decoded = anchors[:, None, :2] + points * VARIANCES[0] * anchors[:, None, 2:]
    return decoded.reshape(-1, 10)


# -------------------------------------------------------------------------------------------------- ParseNet


class _Norm(nn.Module):
    """``NormLayer``: BatchNorm under the name ``norm`` (the released keys are ``...norm.norm.weight``), or nothing."""

    def __init__(self, channels: int, batch_norm: bool) -> None:
        super().__init__()
        self.norm: nn.Module = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class _ConvLayer(nn.Module):
    """``ConvLayer``: optional 2x nearest upsampling, reflection padding, a 3x3 conv (stride 2 for "down"),
    optional BatchNorm (then the conv has no bias), optional LeakyReLU(0.2)."""

    def __init__(self, cin: int, cout: int, scale: str = "none", batch_norm: bool = False,
                 leaky: bool = False) -> None:
        super().__init__()
        self.upsample = scale == "up"
        self.pad = nn.ReflectionPad2d(1)
        self.conv2d = nn.Conv2d(cin, cout, 3, 2 if scale == "down" else 1, bias=not batch_norm)
        self.norm = _Norm(cout, batch_norm)
        self.leaky = leaky

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.norm(self.conv2d(self.pad(x)))
        return F.leaky_relu(x, 0.2) if self.leaky else x


class _ResidualBlock(nn.Module):
    """``ResidualBlock`` with BatchNorm and LeakyReLU: conv1 (norm, act) -> conv2 (norm) plus a shortcut, which
    is a plain conv when the block changes size or channels. "down" strides conv2, "up" upsamples before conv1."""

    def __init__(self, cin: int, cout: int, scale: str = "none") -> None:
        super().__init__()
        # named as released: its keys are `shortcut_func.conv2d.*` when it is a conv
        self.shortcut_func: nn.Module = (nn.Identity() if scale == "none" and cin == cout
                                         else _ConvLayer(cin, cout, scale))
        first, second = {"down": ("none", "down"), "up": ("up", "none"), "none": ("none", "none")}[scale]
        self.conv1 = _ConvLayer(cin, cout, first, batch_norm=True, leaky=True)
        self.conv2 = _ConvLayer(cout, cout, second, batch_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut_func(x) + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """facexlib's ParseNet at 512x512 (base 64 channels, clipped to 32..256, 4 down and 4 up steps, 10 body
    blocks). ``forward`` takes RGB in [-1, 1] and returns (19-class logits, image)."""

    def __init__(self, size: int = 512, min_feat: int = 32, base: int = 64, depth: int = 10) -> None:
        super().__init__()

        def clip(ch: int) -> int:
            return max(32, min(ch, 256))

        steps = int(math.log2(size // min_feat))
        encoder: list[nn.Module] = [_ConvLayer(3, base)]
        head = base
        for _ in range(steps):
            encoder.append(_ResidualBlock(clip(head), clip(head * 2), "down"))
            head *= 2
        decoder: list[nn.Module] = []
        body = [_ResidualBlock(clip(head), clip(head)) for _ in range(depth)]
        for _ in range(steps):
            decoder.append(_ResidualBlock(clip(head), clip(head // 2), "up"))
            head //= 2
        self.encoder = nn.Sequential(*encoder)
        self.body = nn.Sequential(*body)
        self.decoder = nn.Sequential(*decoder)
        self.out_img_conv = _ConvLayer(clip(head), 3)
        self.out_mask_conv = _ConvLayer(clip(head), PARSING_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.encoder(x)
        x = self.decoder(feat + self.body(feat))
        return self.out_mask_conv(x), self.out_img_conv(x)
