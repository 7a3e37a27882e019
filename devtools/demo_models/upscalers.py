"""Tiny upscaler models (ESRGAN and Real-ESRGAN Compact), random weights, in the files people really use.

The networks are spandrel's own architecture classes (``RRDBNet`` for ESRGAN, ``SRVGGNetCompact`` for
Real-ESRGAN's "realesr-general-x4v3" family), scaled down and filled with seeded random weights, then written
in the key layouts and wrappers of published files so spandrel detects them as it detects the real ones:

- ESRGAN, old-arch keys (``model.0.weight``, ``model.1.sub.0.RDB1.conv1.0.weight``, ...): what community
  ESRGAN files (4x-UltraSharp, 4x_foolhardy_Remacri, ...) hold, here as ``.safetensors``;
- the same network in Real-ESRGAN's new-arch keys (``conv_first``, ``body.0.rdb1.conv1``, ``conv_body``,
  ``conv_up1``, ``conv_hr``, ``conv_last``) wrapped as ``{"params_ema": ...}``: RealESRGAN_x4plus.pth's layout;
- Compact (``body.N``) plain in ``.safetensors`` and wrapped as ``{"params": ...}`` in ``.pth``: the layout of
  realesr-general-x4v3.pth.

ESRGAN's convs get He-normal weights and a last conv scaled down with a bias of 0.5, so that outputs sit
mid-range and vary with the input (default init clamps a third of the pixels to black); Compact adds the
nearest-upscaled input to its output like the real one, so it keeps the picture. Weights are stored in
fp16 (float32 loads reproduce them exactly). Same seed, same bytes. A 64x64 image upscales in about 0.15 s
(ESRGAN 4x) and a few ms (Compact 2x) on one CPU thread.

They render noise-like detail, not sharper pictures: they exist so that the upscale path (files, detection,
tiling, resizing) runs end to end without downloads.

CLI: ``python -m devtools.demo_models.upscalers [models_dir]`` writes the demo set into ``ESRGAN/`` when the
folder holds no upscaler yet.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import torch

from devtools.demo_models.pickles import MarkerTrap, save_pth_atomically
from devtools.demo_models.sd15 import save_safetensors_atomically

UPSCALER_DIR = "ESRGAN"  # the WebUI's UpscalerESRGAN folder: spandrel loads any architecture found there
STORAGE_DTYPE = torch.float16
# (file name, builder key, layout): the demo set written by write_demo_upscalers, all in models/ESRGAN/.
DEMO_ESRGAN = "4x-demo-esrgan.safetensors"  # old-arch keys
DEMO_REALESRGAN = "4x-demo-realesrgan.pth"  # the same weights, {"params_ema": new-arch keys}
DEMO_COMPACT = "2x-demo-compact.safetensors"  # SRVGGNetCompact keys
DEMO_COMPACT_PTH = "2x-demo-realesr-compact.pth"  # the same weights, {"params": ...}
ESRGAN_FILTERS, ESRGAN_BLOCKS, ESRGAN_SCALE = 8, 1, 4
COMPACT_FEATURES, COMPACT_CONVS, COMPACT_SCALE = 16, 4, 2
ESRGAN_LAST_CONV_GAIN = 0.1  # output std ~0.16 around 0.5 on a random image; ~2% of values clamped


def _rounded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(STORAGE_DTYPE).contiguous() for k, v in state.items()}


def build_esrgan_state(seed: int = 0, scale: int = ESRGAN_SCALE) -> dict[str, torch.Tensor]:
    """A tiny ESRGAN (RRDBNet: 8 filters, 1 RRDB block; growth channels stay 32) in old-arch keys, fp16."""
    from spandrel.architectures.ESRGAN import ESRGAN

    generator = torch.Generator().manual_seed(seed)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=ESRGAN_FILTERS, num_blocks=ESRGAN_BLOCKS, scale=scale)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
            conv.bias.zero_()
        convs[-1].weight.mul_(ESRGAN_LAST_CONV_GAIN)
        convs[-1].bias.fill_(0.5)
    return _rounded(model.state_dict())


def build_compact_state(seed: int = 0, scale: int = COMPACT_SCALE) -> dict[str, torch.Tensor]:
    """A tiny Real-ESRGAN Compact (SRVGGNetCompact: 16 features, 4 body convs, PReLU) in its own keys, fp16."""
    from spandrel.architectures.Compact import Compact

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Compact(num_in_ch=3, num_out_ch=3, num_feat=COMPACT_FEATURES, num_conv=COMPACT_CONVS, upscale=scale)
    return _rounded(model.state_dict())


_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")


def esrgan_to_new_arch(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old-arch ESRGAN keys -> Real-ESRGAN's (basicsr RRDBNet) keys, for a 2x or 4x model."""
    rdb_blocks = {int(m.group(1)) for k in state if (m := _OLD_RDB.fullmatch(k))}
    trunk = max(rdb_blocks) + 1  # model.1.sub.<n_blocks> is the trunk conv
    upconvs = sorted({int(k.split(".")[1]) for k in state if k.startswith("model.")} - {0, 1})
    *ups, hr, last = upconvs
    renamed = {"model.0": "conv_first", f"model.1.sub.{trunk}": "conv_body", f"model.{hr}": "conv_hr",
               f"model.{last}": "conv_last"}
    renamed |= {f"model.{n}": f"conv_up{i}" for i, n in enumerate(ups, start=1)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _OLD_RDB.fullmatch(key):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
        else:
            prefix, kind = key.rsplit(".", 1)
            out[f"{renamed[prefix]}.{kind}"] = value
    return out


def write_esrgan(path: Path, seed: int = 0, scale: int = ESRGAN_SCALE) -> Path:
    """Write the tiny ESRGAN to ``path``: ``.safetensors`` in old-arch keys (community ESRGAN files), ``.pth``
    as ``{"params_ema": new-arch keys}`` (Real-ESRGAN's released RRDBNet files). Same weights either way."""
    state = build_esrgan_state(seed, scale)
    if Path(path).suffix == ".safetensors":
        return save_safetensors_atomically(state, path)
    return save_pth_atomically({"params_ema": esrgan_to_new_arch(state)}, path)


def write_compact(path: Path, seed: int = 0, scale: int = COMPACT_SCALE) -> Path:
    """Write the tiny Compact model to ``path``: plain keys in ``.safetensors``, ``{"params": ...}`` in ``.pth``
    (realesr-general-x4v3.pth's layout). Same weights either way."""
    state = build_compact_state(seed, scale)
    if Path(path).suffix == ".safetensors":
        return save_safetensors_atomically(state, path)
    return save_pth_atomically({"params": state}, path)


def write_demo_upscalers(models_dir: Path) -> list[Path]:
    """Write the demo set into ``models_dir/ESRGAN/`` (overwriting same-named files) and return the paths:
    4x ESRGAN as .safetensors and (Real-ESRGAN layout) .pth, 2x Compact as .safetensors and .pth. The WebUI
    lists ESRGAN/ files by their stem ("4x-demo-realesrgan", ...); WebUI 1.10 lists only its .pt/.pth files."""
    folder = Path(models_dir) / UPSCALER_DIR
    return [
        write_esrgan(folder / DEMO_ESRGAN),
        write_esrgan(folder / DEMO_REALESRGAN),
        write_compact(folder / DEMO_COMPACT),
        write_compact(folder / DEMO_COMPACT_PTH),
    ]


def ensure_demo_upscalers(models_dir: Path) -> list[Path]:
    """Write the demo set unless ``ESRGAN/`` already holds a model file (the operator's own are never shadowed)."""
    folder = Path(models_dir) / UPSCALER_DIR
    if folder.is_dir() and any(p.suffix in (".pth", ".pt", ".safetensors") for p in folder.iterdir() if p.is_file()):
        return []
    return write_demo_upscalers(models_dir)


def write_booby_trapped_pth(path: Path, marker: Path) -> Path:
    """A real ``torch.save`` file holding the tiny ESRGAN in Real-ESRGAN's layout plus an object whose
    unpickling creates ``marker``: a loader that unpickles it (``torch.load(..., weights_only=False)``, the
    WebUI's spandrel path) leaves the marker; the weights-only unpickler refuses it without creating it."""
    state = esrgan_to_new_arch(build_esrgan_state())
    return save_pth_atomically({"params_ema": state, "meta": MarkerTrap(marker)}, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m devtools.demo_models.upscalers [models_dir]  (default: $RENDERFARM_MODELS_DIR or "
              "./models)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    models_dir = Path(args[0] if args else os.environ.get("RENDERFARM_MODELS_DIR", "models"))
    created = ensure_demo_upscalers(models_dir)
    if not created:
        print(f"{models_dir / UPSCALER_DIR} holds an upscaler already; nothing to do")
    for path in created:
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
