"""GFPGAN face restoration, done the way the WebUI does it, without facexlib.

The WebUI (``modules/gfpgan_model.py``, ``modules/face_restoration_utils.py``) loads GFPGAN through spandrel and
runs it inside facexlib's ``FaceRestoreHelper(upscale_factor=1, face_size=512, crop_ratio=(1, 1),
det_model='retinaface_resnet50', use_parse=True)``. This module is our own implementation of that helper's
path (networks in :mod:`worker.engine.face_nets`), step by step (facexlib 0.3.0, ``utils/face_restoration_helper.py``
unless named otherwise):

1. ``restore_with_face_helper`` flips the RGB image to BGR; everything below works on BGR ``uint8``.
2. ``get_face_landmarks_5(only_center_face=False, resize=640, eye_dist_threshold=5)``: the image is resized with
   Lanczos (``cv2.INTER_LANCZOS4``) so that its shorter side is 640 (``scale = min(h, w) / 640``, sizes
   truncated), up or down. RetinaFace (``detection/retinaface.py:detect_faces`` with ``conf_threshold=0.97``,
   ``nms_threshold=0.4``, at that size) sees float BGR minus (104, 117, 123); boxes and landmarks are decoded
   from the priors (variances 0.1 / 0.2), faces scoring above 0.97 are kept, sorted by score (NumPy's argsort,
   reversed) and thinned by ``torchvision.ops.nms`` at IoU 0.4; coordinates are multiplied by ``scale`` back to
   the image. A face whose eyes are less than 5 pixels apart is dropped.
3. ``align_warp_face``: per face, ``cv2.estimateAffinePartial2D(landmarks, template, method=cv2.LMEDS)``: a
   similarity transform onto facexlib's 5-point FFHQ template for 512x512 faces, and ``cv2.warpAffine`` to
   512x512 (bilinear, outside the image a constant (135, 133, 132)).
4. Per face (``restore_with_face_helper``): ``/ 255``, BGR -> RGB, normalised to [-1, 1], GFPGAN
   ``net(t, return_rgb=False)[0]``, clamped to [-1, 1], mapped to [0, 1], RGB -> BGR, ``* 255`` truncated to
   ``uint8``.
5. ``get_inverse_affine`` (``cv2.invertAffineTransform``) and ``paste_faces_to_input_image`` with
   ``use_parse=True``: the restored face is warped back (bilinear, black outside); ParseNet labels the restored
   face (19 classes; the mask is 255 where the label is 1-13 or 15, facexlib's ``MASK_COLORMAP``, else 0),
   the 0/255 mask is blurred twice with a 101x101 Gaussian (sigma 11), its outer 10 pixels zeroed, scaled to
   [0, 1] and warped back with ``flags=3``; the image becomes ``mask * face + (1 - mask) * image`` face after
   face (float64), truncated to ``uint8`` at the end.

Pixels outside every warped-back face mask are therefore left exactly as they were, and an image without a
(kept) face comes back unchanged.

Deviations: facexlib multiplies the detection score by ``scale`` along with the coordinates; :class:`Face` keeps
the detector's score. ``Face.box`` is clipped to the image (boxes are only reported; restoration uses the
landmarks). A face whose landmarks admit no similarity transform is skipped (facexlib would fail). The WebUI
logs a failing GFPGAN call and pastes the face unrestored; here the error propagates.

Loading: ``.pth`` files only through ``torch.load(..., weights_only=True)`` (no pickled code ever runs),
``.safetensors`` through safetensors; the detector and parser state dicts must match the released key sets
exactly (a ``module.`` prefix on the detector's keys is dropped, as facexlib does); GFPGAN is whatever spandrel
detects as its "GFPGAN" architecture (GFPGANv1Clean, 512). Everything runs in fp32, eval mode, under
``torch.inference_mode``. GFPGAN draws fresh StyleGAN noise on every call (``randomize_noise=True``, as in the
WebUI), so restored faces vary slightly from call to call unless torch's RNG is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from shared.models.face_restoration import FaceRestorationFiles, face_restoration_files
from worker.engine.face_nets import (
    BGR_MEAN,
    ParseNet,
    RetinaFaceResNet50,
    decode_boxes,
    decode_landmarks,
    priors,
)
from worker.engine.weight_files import UnreadableWeights, first_line, read_weights

__all__ = [
    "CONF_THRESHOLD",
    "DETECT_SIZE",
    "EYE_DIST_THRESHOLD",
    "FACE_SIZE",
    "FACE_TEMPLATE",
    "NMS_THRESHOLD",
    "Face",
    "FaceRestorationUnavailable",
    "FaceRestorer",
    "alignment_matrix",
    "detect_faces",
    "load_face_restorer",
    "load_face_restorer_files",
    "restore_faces",
    "restore_with_faces",
]

FACE_SIZE = 512
# facexlib's 5 landmarks (left eye, right eye, nose tip, left and right mouth corners) of an FFHQ face at 512x512.
FACE_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]])
DETECT_SIZE = 640  # get_face_landmarks_5(resize=640): the shorter side the detector sees
CONF_THRESHOLD = 0.97  # get_face_landmarks_5 calls detect_faces(input_img, 0.97)
NMS_THRESHOLD = 0.4  # detect_faces' default
EYE_DIST_THRESHOLD = 5.0  # pixels, in the image
CROP_BORDER_VALUE = (135, 133, 132)  # align_warp_face's gray (BGR)
FACE_LABELS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15)  # MASK_COLORMAP entries of 255
MASK_BLUR = ((101, 101), 11)  # applied twice
MASK_BORDER = 10


class FaceRestorationUnavailable(Exception):
    """Face restoration cannot run: files missing or unusable. ``reason`` says why and names the file."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Face:
    """One detected face, in the image's pixels: ``box`` (x1, y1, x2, y2, clipped to the image), the detector's
    ``score`` and ``landmarks5`` (5x2: left eye, right eye, nose, left and right mouth corners, as x, y)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks5: np.ndarray = field(compare=False)


@dataclass
class FaceRestorer:
    """The three networks, in eval mode and fp32 on ``device``."""

    gfpgan: torch.nn.Module
    detector: RetinaFaceResNet50
    parser: ParseNet
    device: torch.device
    files: FaceRestorationFiles | None = None

    def to(self, device: str | torch.device) -> FaceRestorer:
        self.device = torch.device(device)
        for net in (self.gfpgan, self.detector, self.parser):
            net.to(self.device)
        return self


# ---------------------------------------------------------------------------------------------- loading


def _read_file(path: Path) -> dict[object, object]:
    """The file's top-level mapping, read without running pickled code."""
    try:
        return read_weights(path)
    except FileNotFoundError as exc:
        raise FaceRestorationUnavailable(f"{path.name}: not found") from exc
    except UnreadableWeights as exc:
        raise FaceRestorationUnavailable(exc.reason) from exc


def _load_strict(module: torch.nn.Module, raw: dict[object, object], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)`` with a refusal that names the file and the keys that do not fit.
    BatchNorm's ``num_batches_tracked`` may be absent (files saved by old torch), as torch itself allows."""
    expected = module.state_dict()
    state = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    unexpected = sorted(str(k) for k in raw if k not in expected or k not in state)
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise FaceRestorationUnavailable(f"{path.name}: not {what} state dict ({'; '.join(parts)})")
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise FaceRestorationUnavailable(f"{path.name}: not {what} state dict ({first_line(exc)})") from exc


def _ready(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    module.to(device=device, dtype=torch.float32)
    module.eval()
    module.requires_grad_(False)
    return module


def _load_detector(path: Path, device: torch.device) -> RetinaFaceResNet50:
    raw = _read_file(path)
    # facexlib init_detection_model: keys starting with "module." lose that prefix
    raw = {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in raw.items()}
    net = RetinaFaceResNet50()
    _load_strict(net, raw, path, "a RetinaFace-ResNet50 detector (detection_Resnet50_Final)")
    _ready(net, device)
    return net


def _load_parser(path: Path, device: torch.device) -> ParseNet:
    raw = _read_file(path)
    net = ParseNet()
    _load_strict(net, raw, path, "a ParseNet face parser (parsing_parsenet)")
    _ready(net, device)
    return net


def _load_gfpgan(path: Path, device: torch.device) -> torch.nn.Module:
    """``modelloader.load_spandrel_model(path, expected_architecture='GFPGAN')``, fp32."""
    import spandrel

    raw = _read_file(path)
    state = spandrel.canonicalize_state_dict(raw)  # unwraps params_ema / params, drops "module."
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
               if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise FaceRestorationUnavailable(f"{path.name}: holds no tensors (not a model's state dict)")
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(tensors)
    except spandrel.UnsupportedModelError as exc:
        raise FaceRestorationUnavailable(f"{path.name}: not a GFPGAN model (spandrel recognises no model in it)") \
            from exc
    except Exception as exc:  # detected, but the weights do not build the network
        raise FaceRestorationUnavailable(
            f"{path.name}: its weights do not form a GFPGAN model ({first_line(exc)})") from exc
    if descriptor.architecture.id != "GFPGAN":
        raise FaceRestorationUnavailable(f"{path.name}: is a {descriptor.architecture.name} model, not GFPGAN")
    return _ready(descriptor.model, device)


def load_face_restorer_files(files: FaceRestorationFiles, device: str | torch.device = "cpu") -> FaceRestorer:
    """Load the three networks from ``files``; FaceRestorationUnavailable names a file that cannot be used."""
    target = torch.device(device)
    detector = _load_detector(files.detector, target)  # the small files first: a bad one fails fast
    parser = _load_parser(files.parser, target)
    return FaceRestorer(gfpgan=_load_gfpgan(files.gfpgan, target), detector=detector, parser=parser, device=target,
                        files=files)


def load_face_restorer(models_dir: Path, device: str | torch.device = "cpu") -> FaceRestorer:
    """The face restorer of ``models_dir/GFPGAN``; FaceRestorationUnavailable says what is missing or unusable."""
    files = face_restoration_files(Path(models_dir))
    if isinstance(files, str):
        raise FaceRestorationUnavailable(files)
    return load_face_restorer_files(files, device)


# -------------------------------------------------------------------------------------------- detection


@torch.inference_mode()
def _detect_rows(detector: RetinaFaceResNet50, image_bgr: np.ndarray, device: torch.device) -> np.ndarray:
    """``RetinaFace.detect_faces(image, 0.97)`` at the image's own size: (N, 15) float32 rows of box (4),
    score, 5 landmarks (x, y), best first."""
    height, width = image_bgr.shape[:2]
    x = torch.from_numpy(image_bgr.astype(np.float32).transpose(2, 0, 1)).unsqueeze(0).to(device)
    x = x - torch.tensor(BGR_MEAN, device=device).view(1, 3, 1, 1)
    offsets, scores, marks = detector(x)
    anchors = priors(height, width).to(device)
    size = torch.tensor([width, height], dtype=torch.float32, device=device)
    boxes = (decode_boxes(offsets[0], anchors) * size.repeat(2)).cpu().numpy()
    points = (decode_landmarks(marks[0], anchors) * size.repeat(5)).cpu().numpy()
    conf = scores[0].cpu().numpy()

    keep = np.where(conf > CONF_THRESHOLD)[0]
    boxes, points, conf = boxes[keep], points[keep], conf[keep]
    order = conf.argsort()[::-1]
    boxes, points, conf = boxes[order], points[order], conf[order]
    scored = np.hstack((boxes, conf[:, None])).astype(np.float32, copy=False)
    from torchvision.ops import nms

    kept = nms(torch.from_numpy(scored[:, :4].copy()), torch.from_numpy(scored[:, 4].copy()), NMS_THRESHOLD).numpy()
    return np.concatenate((scored[kept], points[kept].astype(np.float32)), axis=1)


def detect_faces(restorer: FaceRestorer, image_bgr: np.ndarray) -> list[Face]:
    """The faces ``get_face_landmarks_5(only_center_face=False, resize=640, eye_dist_threshold=5)`` keeps, in
    the pixels of ``image_bgr`` (H x W x 3 ``uint8`` BGR), best score first."""
    height, width = image_bgr.shape[:2]
    scale = min(height, width) / DETECT_SIZE
    small = cv2.resize(np.ascontiguousarray(image_bgr), (int(width / scale), int(height / scale)),
                       interpolation=cv2.INTER_LANCZOS4)
    rows = _detect_rows(restorer.detector, small, restorer.device)
    faces = []
    for row in rows:
        scaled = row * scale  # float32, as facexlib's `bboxes * scale`
        landmarks = scaled[5:15].reshape(5, 2)
        if float(np.linalg.norm(landmarks[0] - landmarks[1])) < EYE_DIST_THRESHOLD:
            continue  # side faces or tiny ones
        x1, y1, x2, y2 = (float(v) for v in scaled[:4])
        box = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width),
               min(max(y2, 0.0), height))
        faces.append(Face(box=box, score=float(row[4]), landmarks5=landmarks))
    return faces


# ------------------------------------------------------------------------------ align, restore, paste back


def alignment_matrix(landmarks5: np.ndarray) -> np.ndarray | None:
    """The 2x3 similarity transform taking the 5 landmarks onto :data:`FACE_TEMPLATE` (LMEDS, as facexlib), or
    None when none can be estimated."""
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks5, dtype=np.float32).reshape(5, 2), FACE_TEMPLATE,
                                            method=cv2.LMEDS)
    return matrix


def _to_input(image_bgr: np.ndarray, device: torch.device) -> torch.Tensor:
    """BGR uint8 -> RGB (1, 3, H, W) float32 in [-1, 1] (``/ 255``, ``normalize(0.5, 0.5)``)."""
    rgb = np.ascontiguousarray(image_bgr[:, :, ::-1].transpose(2, 0, 1))
    tensor = torch.from_numpy(rgb)
    return ((tensor - 0.5) / 0.5).unsqueeze(0).to(device)


@torch.inference_mode()
def _restore_face(restorer: FaceRestorer, crop_bgr: np.ndarray) -> np.ndarray:
    """One aligned 512x512 BGR crop through GFPGAN; BGR uint8 back (``restore_with_face_helper``)."""
    x = _to_input((crop_bgr / 255.0).astype(np.float32), restorer.device)
    out = restorer.gfpgan(x, return_rgb=False)[0]
    out = out.squeeze(0).float().cpu().clamp_(-1.0, 1.0)
    out = (out + 1.0) / 2.0
    bgr = out.numpy().transpose(1, 2, 0)[:, :, ::-1]
    return (bgr * 255.0).astype(np.uint8)


@torch.inference_mode()
def _face_mask(restorer: FaceRestorer, face_bgr: np.ndarray) -> np.ndarray:
    """The soft paste mask of a restored face (512x512 float64 in [0, 1]) from ParseNet's labels."""
    face = cv2.resize(face_bgr, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LINEAR)
    logits = restorer.parser(_to_input(face.astype(np.float32) / 255.0, restorer.device))[0]
    labels = logits.argmax(dim=1).squeeze().cpu().numpy()
    mask = np.where(np.isin(labels, FACE_LABELS), 255.0, 0.0)
    for _ in range(2):
        mask = cv2.GaussianBlur(mask, *MASK_BLUR)
    mask[:MASK_BORDER, :] = 0
    mask[-MASK_BORDER:, :] = 0
    mask[:, :MASK_BORDER] = 0
    mask[:, -MASK_BORDER:] = 0
    mask = mask / 255.0
    return cv2.resize(mask, (face_bgr.shape[1], face_bgr.shape[0]))


def _restore_bgr(restorer: FaceRestorer, image_bgr: np.ndarray, faces: list[Face]) -> np.ndarray:
    height, width = image_bgr.shape[:2]
    image_bgr = np.ascontiguousarray(image_bgr)
    restored: list[tuple[np.ndarray, np.ndarray]] = []
    for face in faces:
        matrix = alignment_matrix(face.landmarks5)
        if matrix is None:
            continue
        crop = cv2.warpAffine(image_bgr, matrix, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT,
                              borderValue=CROP_BORDER_VALUE)
        restored.append((_restore_face(restorer, crop), cv2.invertAffineTransform(matrix)))
    if not restored:
        return image_bgr
    canvas: np.ndarray = image_bgr
    for face_bgr, inverse in restored:
        back = cv2.warpAffine(face_bgr, inverse, (width, height))
        mask = cv2.warpAffine(_face_mask(restorer, face_bgr), inverse, (width, height), flags=cv2.INTER_AREA)
        soft = mask[:, :, None]
        canvas = soft * back + (1 - soft) * canvas
    return canvas.astype(np.uint8)


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def restore_with_faces(restorer: FaceRestorer, image: Image.Image, faces: list[Face]) -> Image.Image:
    """Align, restore and paste back the given faces (steps 3-5): RGB in, RGB out, same size."""
    rgb = np.asarray(_rgb(image))
    out = _restore_bgr(restorer, np.ascontiguousarray(rgb[:, :, ::-1]), faces)
    return Image.fromarray(np.ascontiguousarray(out[:, :, ::-1]), "RGB")


def restore_faces(restorer: FaceRestorer, image: Image.Image) -> Image.Image:
    """The WebUI's GFPGAN face restoration of ``image``: RGB out, same size; without a face, the image unchanged."""
    rgb = _rgb(image)
    faces = detect_faces(restorer, np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1]))
    if not faces:
        return rgb.copy()
    return restore_with_faces(restorer, rgb, faces)
