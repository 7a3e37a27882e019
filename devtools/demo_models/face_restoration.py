"""Demo face-restoration files: GFPGAN, the RetinaFace detector and the ParseNet parser, random weights, in the
layouts of the released files, so the face-restoration path runs end to end without downloads.

- ``GFPGAN-demo.safetensors``: spandrel's GFPGANv1Clean at the size spandrel builds for a "GFPGAN" file (512,
  channel multiplier 2, 86 M parameters), default random init, stored in fp16 (174 MB instead of 348 MB);
- ``detection_Resnet50_Final.pth``: our RetinaFace-ResNet50 (:mod:`worker.engine.face_nets`), saved with
  ``torch.save`` as a plain state dict whose keys carry a ``module.`` prefix (a DataParallel-trained file's
  layout; the loader drops it as facexlib's ``init_detection_model`` does, and takes unprefixed keys as well) --
  or, with ``suffix=".safetensors"``, a twin without the prefix;
- ``parsing_parsenet.pth``: our ParseNet, plain state dict (or its ``.safetensors`` twin).

The trunks are random, but the heads are set so that the outcome is known:

- the detector's heads ignore the random features (zero weights): with ``faces=False`` every face logit is -30
  (probability ~1e-13), so no face is ever found; with ``faces=True`` exactly one face is found in every image,
  its 5 landmarks in the FFHQ template's layout, the aligned crop 40% of the image's shorter side, centred in
  the image's top-left square (:func:`set_detector_heads` says how a position-blind network picks one cell);
- the parser's mask head labels every pixel as skin (class 1), so the paste mask is the whole aligned crop but
  its blurred-in border.

GFPGAN's random output is noise; these files exist to exercise files, loading, detection, alignment, the
networks and the paste-back, not to restore anything. Building and writing the set takes about 5 s on a
2-core CPU.

CLI: ``python -m devtools.demo_models.face_restoration [models_dir]`` writes the set into ``GFPGAN/`` when face
restoration is not already set up there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from devtools.demo_models.pickles import MarkerTrap, save_pth_atomically
from devtools.demo_models.sd15 import save_safetensors_atomically
from shared.models.face_restoration import DETECTOR_FILE, GFPGAN_DIR, PARSER_FILE, face_restoration_files

DEMO_GFPGAN = "GFPGAN-demo.safetensors"
STORAGE_DTYPE = torch.float16  # GFPGAN only: the helper nets are stored in fp32, as released
FACE_LEVEL, FACE_ANCHOR = 2, 0  # the stride-32 level's 256-pixel anchor claims the faces
FACE_LOGIT, NO_FACE_LOGIT = 10.0, -30.0
NEIGHBOUR_PENALTY = 8.0  # face logit per neighbour counted: cells other than the top-left one score <= 2
# the demo face's box in the aligned 512x512 crop (centre, size): a plausible box around the template
FACE_BOX_CENTRE, FACE_BOX_SIZE = (256.0, 300.0), (250.0, 300.0)
# facexlib's FFHQ 5-point template for 512x512 faces (the aligned crop): the demo's faces have this layout.
_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                      [201.26117, 371.41043], [313.08905, 371.15118]])


def build_gfpgan_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """GFPGANv1Clean with spandrel's "GFPGAN" hyperparameters and seeded default init, fp16."""
    from spandrel.architectures.GFPGAN import GFPGAN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                       fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
                       sft_half=True)
    return {k: v.detach().to(STORAGE_DTYPE).contiguous() for k, v in model.state_dict().items()}


def build_detector_state(*, faces: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """RetinaFace-ResNet50 with a seeded random trunk and the heads described in the module docstring, fp32."""
    from worker.engine.face_nets import RetinaFaceResNet50

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RetinaFaceResNet50()
    return set_detector_heads({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
                              faces=faces)


def set_detector_heads(state: dict[str, torch.Tensor], *, faces: bool) -> dict[str, torch.Tensor]:
    """Make the heads of a detector state dict (plain keys) find one face (``faces=True``) or none, whatever
    its trunk: returns a copy.

    One face: the heads' weights are zero but for one face-logit weight at the stride-32 level that reads a
    channel counting each cell's up/left/up-left neighbours (0 only at the top-left cell; the FPN's lateral
    output 0 is made constant 1 and SSH's first 3x3 conv sums it over those three neighbours, its zero padding
    making the count), so only the top-left cell scores above the threshold (logit 10, the others at most 2).
    Its box and landmarks are biases: a face in the FFHQ template's layout, 256 pixels across the aligned crop,
    centred 320 pixels right and down from the detector input's top-left corner (the middle of the top-left
    640x640 square of the image resized to a 640-pixel shorter side)."""
    from worker.engine.face_nets import ANCHORS_PER_CELL, STRIDES, VARIANCES

    out = {k: v.clone() for k, v in state.items()}
    for level in range(len(STRIDES)):
        for head in ("ClassHead", "BboxHead", "LandmarkHead"):
            out[f"{head}.{level}.conv1x1.weight"].zero_()
            out[f"{head}.{level}.conv1x1.bias"].zero_()
        for anchor in range(ANCHORS_PER_CELL):
            out[f"ClassHead.{level}.conv1x1.bias"][anchor * 2 + 1] = NO_FACE_LOGIT
    if not faces:
        return out
    # the constant channel and the neighbour count at the stride-32 level (FPN output3 -> ssh3)
    out["fpn.output3.0.weight"][0] = 0.0
    for name, value in (("weight", 0.0), ("bias", 1.0), ("running_mean", 0.0), ("running_var", 1.0)):
        out[f"fpn.output3.1.{name}"][0] = value
    counter = out["ssh3.conv3X3.0.weight"]
    counter[0] = 0.0
    counter[0, 0, 0, 0] = counter[0, 0, 0, 1] = counter[0, 0, 1, 0] = 1.0
    for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        out[f"ssh3.conv3X3.1.{name}"][0] = value
    level, a = FACE_LEVEL, FACE_ANCHOR
    anchor_px = 256.0
    unit = VARIANCES[0] * anchor_px  # one landmark/centre offset unit, in pixels
    shift = (320.0 - STRIDES[level] / 2) / unit  # from the top-left cell's centre to (320, 320)
    out[f"ClassHead.{level}.conv1x1.weight"][a * 2 + 1, 0, 0, 0] = -NEIGHBOUR_PENALTY
    out[f"ClassHead.{level}.conv1x1.bias"][a * 2 + 1] = FACE_LOGIT
    # the aligned crop (512 px) is the anchor (256 px): template pixels scale by 0.5
    marks = (_TEMPLATE - 256.0) * (anchor_px / 512.0) / unit + shift
    out[f"LandmarkHead.{level}.conv1x1.bias"][a * 10: a * 10 + 10] = torch.from_numpy(marks).float().reshape(-1)
    centre = (np.array(FACE_BOX_CENTRE) - 256.0) * (anchor_px / 512.0) / unit + shift
    size = np.log(np.array(FACE_BOX_SIZE) * (anchor_px / 512.0) / anchor_px) / VARIANCES[1]
    out[f"BboxHead.{level}.conv1x1.bias"][a * 4: a * 4 + 4] = torch.from_numpy(np.concatenate([centre, size])).float()
    return out


def build_parser_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """ParseNet with a seeded random body and a mask head that labels everything class 1 (skin), fp32."""
    from worker.engine.face_nets import ParseNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ParseNet()
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    state["out_mask_conv.conv2d.weight"].zero_()
    state["out_mask_conv.conv2d.bias"].zero_()
    state["out_mask_conv.conv2d.bias"][1] = 1.0
    return state


def write_helper(state: dict[str, torch.Tensor], path: Path, *, module_prefix: bool = False) -> Path:
    """A detector or parser state dict as ``.pth`` (``torch.save``; keys prefixed ``module.`` if asked) or as
    ``.safetensors`` (plain keys), by ``path``'s suffix."""
    if Path(path).suffix == ".safetensors":
        return save_safetensors_atomically(state, path)
    return save_pth_atomically({(f"module.{k}" if module_prefix else k): v for k, v in state.items()}, path)


def write_demo_face_restoration(models_dir: Path, *, faces: bool = True, suffix: str = ".pth") -> list[Path]:
    """Write the demo set into ``models_dir/GFPGAN/`` (overwriting same-named files) and return the paths:
    GFPGAN (fp16 ``.safetensors``), the detector and the parser (``suffix``: ``.pth`` as released, or
    ``.safetensors`` twins). ``faces=False``: a detector that never finds a face."""
    if suffix not in (".pth", ".safetensors"):
        raise ValueError(f"suffix must be .pth or .safetensors, not {suffix!r}")
    folder = Path(models_dir) / GFPGAN_DIR
    return [
        save_safetensors_atomically(build_gfpgan_state(), folder / DEMO_GFPGAN),
        write_helper(build_detector_state(faces=faces), folder / Path(DETECTOR_FILE).with_suffix(suffix),
                     module_prefix=True),
        write_helper(build_parser_state(), folder / Path(PARSER_FILE).with_suffix(suffix)),
    ]


def ensure_demo_face_restoration(models_dir: Path) -> list[Path]:
    """Write the demo set unless ``GFPGAN/`` already has what face restoration needs (never shadow real files)."""
    if not isinstance(face_restoration_files(Path(models_dir)), str):
        return []
    return write_demo_face_restoration(models_dir)


def write_booby_trapped_pth(path: Path, marker: Path) -> Path:
    """A real ``torch.save`` file: a small state dict plus an object whose unpickling creates ``marker``. A
    loader that unpickles it leaves the marker; the weights-only unpickler refuses it without creating it."""
    return save_pth_atomically({"module.body.conv1.weight": torch.zeros(64, 3, 7, 7), "meta": MarkerTrap(marker)}, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m devtools.demo_models.face_restoration [models_dir]  (default: "
              "$RENDERFARM_MODELS_DIR or ./models)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    models_dir = Path(args[0] if args else os.environ.get("RENDERFARM_MODELS_DIR", "models"))
    created = ensure_demo_face_restoration(models_dir)
    if not created:
        print(f"{models_dir / GFPGAN_DIR} is set up for face restoration already; nothing to do")
    for path in created:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
