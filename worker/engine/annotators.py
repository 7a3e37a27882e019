"""Annotators with weights, run on the worker before the denoising loop (see :mod:`shared.controlnet.annotators`).

Each module does what the extension's ``scripts/preprocessor/legacy/processor.py`` does with its annotator
(``annotator/*``): the image is resized with edge padding to the processor resolution (shorter side, sides up to
multiples of 64), the network runs on the padded image, and the map is cropped back (``remove_pad``).

HED: lllyasviel's Apache-2.0 "ControlNetHED" network (five VGG-like double-conv blocks, each with a 1x1 side
projection; RGB input minus a learnt mean), as the extension runs it (``annotator/hed``): each side output is resized
back bilinearly, the edge map is the sigmoid of their mean (``hed_safe`` quantises it with ``safe_step``), and
``scribble_hed`` thins it with the extension's NMS, blurs and binarises it.

The other networks are controlnet-aux's classes (the same code the extension vendors), built here without their
``from_pretrained`` (which downloads) and without pretrained backbones:

* ``depth`` (depth_midas) and ``normal_map`` (normal_midas): MiDaS DPT-hybrid (``midas/dpt_hybrid-midas-501f0c75.pt``;
  timm's ``vit_base_resnet50_384`` backbone, built with ``pretrained=False``). Depth is min-max scaled to 0..255;
  the normal map is the Sobel gradient of the depth with z = 2*pi, zeroed where the depth is under
  ``threshold_a`` (Normal Background Threshold), in BGR order, as ``annotator/midas`` returns it.
* ``openpose`` / ``openpose_hand`` / ``openpose_face`` / ``openpose_faceonly`` / ``openpose_full``: the CMU body
  (``openpose/body_pose_model.pth``), hand (``hand_pose_model.pth``) and face (``facenet.pth``) networks; bodies are
  always detected (hands and faces are cropped from them), and drawn as the extension's ``annotator/openpose/util``
  draws them. Only the networks a module uses are needed.
* ``lineart`` (lineart_realistic, ``lineart/sk_model.pth``) and ``lineart_coarse`` (``sk_model2.pth``): the
  informative-drawings generator, inverted (white lines on black).
* ``lineart_anime``: the U-Net generator (``lineart_anime/netG.pth``) on the image resized up to multiples of 256,
  inverted.
* ``normal_bae``: Bae et al.'s NNET (EfficientNet-B5 encoder, ``normal_bae/scannet.pt``), the finest prediction's xyz
  mapped from -1..1 to 0..255.
* ``mlsd``: M-LSD large (``mlsd/mlsd_large_512_fp32.pth``); segments scoring over ``threshold_a`` (value threshold)
  and longer than ``threshold_b`` (distance threshold) are drawn 1 px white.
* ``pidinet`` (softedge_pidinet), ``pidinet_safe`` (softedge_pidisafe, ``safe_step``), ``pidinet_sketch``
  (t2ia_sketch_pidi, edges > 0.5) and ``pidinet_scribble`` (scribble_pidinet, HED's NMS scribble):
  PiDiNet (``pidinet/table5_pidinet.pth``) on the BGR image.

Weights are read with safetensors, or from the extension's ``.pth``/``.pt`` with torch's ``weights_only`` unpickler,
which rebuilds tensors and containers and runs no code (a booby-trapped file is refused). A container the extension
unwraps (``{"model": ...}``, ``{"state_dict": ...}``, ``module.`` prefixes, OpenPose's unprefixed layer names) is
unwrapped the same way; then every key and shape must match the network exactly, or the module is refused naming
the file. Networks are built on the meta device (no random initialisation), take the file's tensors, and are cached
per process, file and device.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from shared.controlnet.annotators import WORKER_ANNOTATORS, annotators_dir, weight_file
from shared.controlnet.preprocessors import (
    HWC3,
    Preprocessor,
    PreprocessorUnavailable,
    resize_image_with_pad,
    resolve_module,
)
from shared.controlnet.preprocessors import resolve_params as slider_values

__all__ = ["HedNetwork", "run_annotator", "unload_annotators"]


class _DoubleConv(torch.nn.Module):
    def __init__(self, channels_in: int, channels_out: int, layers: int) -> None:
        super().__init__()
        self.convs = torch.nn.Sequential(*[
            torch.nn.Conv2d(channels_in if i == 0 else channels_out, channels_out, 3, 1, padding=1)
            for i in range(layers)])
        self.projection = torch.nn.Conv2d(channels_out, 1, 1, 1, padding=0)

    def forward(self, x: torch.Tensor, down: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if down:
            x = torch.nn.functional.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = torch.nn.functional.relu(conv(x))
        return x, self.projection(x)


class HedNetwork(torch.nn.Module):
    """ControlNetHED (state-dict keys ``norm``, ``block{1..5}.convs.N``, ``block{1..5}.projection``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = _DoubleConv(3, 64, 2)
        self.block2 = _DoubleConv(64, 128, 2)
        self.block3 = _DoubleConv(128, 256, 3)
        self.block4 = _DoubleConv(256, 512, 3)
        self.block5 = _DoubleConv(512, 512, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        sides = []
        for index, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            h, side = block(h, down=index > 0)
            sides.append(side)
        return sides


# --- loading -------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """controlnet-aux and timm warn about deprecated names and print progress while building; keep the log clean."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _aux(module: str) -> Any:
    """A controlnet-aux module (imported on first use: the package imports every detector, seconds of work)."""
    with _quiet():
        return importlib.import_module(f"controlnet_aux.{module}")


def _unwrap(loaded: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict inside a training checkpoint (``{"model": ...}``, ``{"state_dict": ...}``), else itself."""
    for key in ("state_dict", "model"):
        inner = loaded.get(key)
        if isinstance(inner, Mapping):
            return inner
    return loaded


def _without_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """DataParallel's ``module.`` prefix dropped (as the extension's loaders do)."""
    return {key.replace("module.", "") if key.startswith("module.") else key: value for key, value in state.items()}


def _plain(state: Mapping[str, Any], network: torch.nn.Module) -> dict[str, Any]:
    return _without_module_prefix(_unwrap(state))


def _openpose_transfer(state: Mapping[str, Any], network: torch.nn.Module) -> dict[str, Any]:
    """``annotator/openpose/util.transfer``: the file names each layer without the network's block prefix
    (``conv1_1.weight`` for ``model0.conv1_1.weight``). Keys the file has beyond those stay, to be reported."""
    state = _unwrap(state)
    renamed: dict[str, Any] = {}
    used: set[str] = set()
    for key in network.state_dict():
        short = key.split(".", 1)[1]
        if short in state:
            renamed[key] = state[short]
            used.add(short)
    renamed.update({key: value for key, value in state.items() if key not in used})
    return renamed


Constructor = Callable[[], torch.nn.Module]


@dataclass(frozen=True)
class _Weights:
    file: str  # relative to models/ControlNet/annotators, the extension's file name
    label: str  # the network, for error messages
    build: Callable[[], Constructor]  # imports what the network needs, returns its constructor
    adapt: Callable[[Mapping[str, Any], torch.nn.Module], dict[str, Any]] = _plain


_LOADED: dict[tuple[str, str], torch.nn.Module] = {}
_LOADING = threading.Lock()
_MIDAS_RUN = threading.Lock()  # controlnet-aux's DPT passes activations through a module-level dict


def unload_annotators() -> None:
    """Drop every cached annotator network (they load again on next use)."""
    with _LOADING:
        _LOADED.clear()


def _read(path: Path, shown: str, module: str) -> Mapping[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise PreprocessorUnavailable(module, f"{shown} is not a readable safetensors file ({exc})") from exc
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler refuses anything but tensors and containers
        raise PreprocessorUnavailable(module, f"{shown} is not a plain weights file ({exc})") from exc
    if not isinstance(loaded, Mapping):
        raise PreprocessorUnavailable(module, f"{shown} does not hold a state dict")
    return loaded


def _listed(kind: str, keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
    return f"{kind} {', '.join(keys[:3])}{more}"


def _load_strictly(network: torch.nn.Module, state: Mapping[str, Any], spec: _Weights, shown: str,
                   module: str) -> None:
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(key for key in set(expected) & set(state) if not isinstance(state[key], torch.Tensor)
                    or tuple(state[key].shape) != tuple(expected[key].shape))
    problems = [_listed(kind, keys) for kind, keys in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shape or type", shapes)) if keys]
    if problems:
        raise PreprocessorUnavailable(module, f"{shown} is not {spec.label}'s weights ({'; '.join(problems)})")
    network.load_state_dict(dict(state), strict=True, assign=True)
    left = [name for name, tensor in (*network.named_parameters(), *network.named_buffers()) if tensor.is_meta]
    if left:  # pragma: no cover - every network here keeps its state in parameters and persistent buffers
        raise RuntimeError(f"{spec.label}: {left[:3]} were not loaded from {shown}")


def _network(spec: _Weights, models_dir: Path, device: str, module: str) -> Any:
    """The network ``spec`` describes, with its installed weights, on ``device`` (cached)."""
    path = weight_file(models_dir, spec.file)
    if path is None:
        raise PreprocessorUnavailable(module, f"{spec.file} is not in models/ControlNet/annotators")
    key = (str(path), device)
    with _LOADING:
        if key not in _LOADED:
            shown = f"annotators/{path.relative_to(annotators_dir(models_dir)).as_posix()}"
            loaded = _read(path, shown, module)
            construct = spec.build()  # imports happen outside the meta device: module-level tensors stay real
            with _quiet(), torch.device("meta"):  # shapes only: the file's tensors replace them
                network = construct()
            _load_strictly(network, spec.adapt(loaded, network), spec, shown, module)
            _LOADED[key] = network.to(device).float().eval()
        return _LOADED[key]


def _midas_network() -> Constructor:
    dpt = _aux("midas.midas.dpt_depth")  # DPT asks timm for its ViT with pretrained=False: nothing is fetched
    return lambda: dpt.DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)


def _nnet() -> Constructor:
    import sys
    import types

    nnet = _aux("normalbae.nets.NNET")
    # The encoder is the package's own EfficientNet-B5 (torch.hub, source="local", pretrained=False); its hubconf
    # imports the bundled geffnet, imported here first.
    repo = str(Path(nnet.__file__).parent / "submodules" / "efficientnet_repo")
    if "geffnet" not in sys.modules:
        sys.path.insert(0, repo)
        try:
            with _quiet():
                importlib.import_module("geffnet")
        finally:
            sys.path.remove(repo)
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                                 importance_ratio=0.7)
    return lambda: nnet.NNET(args)


def _unet() -> Constructor:
    unet = _aux("lineart_anime").UnetGenerator
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return lambda: unet(3, 1, 8, 64, norm_layer=norm, use_dropout=False)


def _of(module: str, name: str, *args: Any) -> Callable[[], Constructor]:
    """``build`` for a controlnet-aux class constructed with ``args``."""

    def build() -> Constructor:
        cls = getattr(_aux(module), name)
        return lambda: cls(*args)

    return build


_HED = _Weights("hed/ControlNetHED.pth", "ControlNetHED", lambda: HedNetwork)
_MIDAS = _Weights("midas/dpt_hybrid-midas-501f0c75.pt", "MiDaS DPT-hybrid", _midas_network)
_BODY = _Weights("openpose/body_pose_model.pth", "the OpenPose body model", _of("open_pose.model", "bodypose_model"),
                 _openpose_transfer)
_HAND = _Weights("openpose/hand_pose_model.pth", "the OpenPose hand model", _of("open_pose.model", "handpose_model"),
                 _openpose_transfer)
_FACE = _Weights("openpose/facenet.pth", "the OpenPose face model", _of("open_pose.face", "FaceNet"))
_LINEART = _Weights("lineart/sk_model.pth", "the lineart generator", _of("lineart", "Generator", 3, 1, 3))
_LINEART_COARSE = _Weights("lineart/sk_model2.pth", "the coarse lineart generator",
                           _of("lineart", "Generator", 3, 1, 3))
_LINEART_ANIME = _Weights("lineart_anime/netG.pth", "the anime lineart U-Net", _unet)
_NORMAL_BAE = _Weights("normal_bae/scannet.pt", "NormalBae's NNET", _nnet)
_MLSD = _Weights("mlsd/mlsd_large_512_fp32.pth", "M-LSD large",
                 _of("mlsd.models.mbv2_mlsd_large", "MobileV2_MLSD_Large"))
_PIDINET = _Weights("pidinet/table5_pidinet.pth", "PiDiNet", _of("pidi.model", "pidinet"))


# --- shared post-processing ----------------------------------------------------------------------------------------


def _safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def _nms(x: np.ndarray, threshold: int, sigma: float) -> np.ndarray:
    x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    kernels = [np.array(k, dtype=np.uint8) for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    y = np.zeros_like(x)
    for kernel in kernels:
        np.putmask(y, cv2.dilate(x, kernel=kernel) == x, x)
    z = np.zeros_like(y, dtype=np.uint8)
    z[y > threshold] = 255
    return z


def _scribble(edges: np.ndarray) -> np.ndarray:
    """``scribble_hed`` / ``scribble_pidinet``: NMS, blur, binarise."""
    edges = _nms(edges, 127, 3.0)
    edges = cv2.GaussianBlur(edges, (0, 0), 3.0)
    edges[edges > 4] = 255
    edges[edges < 255] = 0
    return edges


def _to_input(image: np.ndarray, device: str) -> torch.Tensor:
    """HWC uint8 -> 1CHW float32 (0..255) on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(image)).float().to(device).permute(2, 0, 1)[None]


def _u8(x: np.ndarray) -> np.ndarray:
    return (x * 255.0).clip(0, 255).astype(np.uint8)


# --- HED -----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hed_edges(network: HedNetwork, image: np.ndarray, safe: bool, device: str) -> np.ndarray:
    height, width = image.shape[:2]
    sides = [side.detach().cpu().numpy().astype(np.float32)[0, 0] for side in network(_to_input(image, device))]
    stacked = np.stack([cv2.resize(side, (width, height), interpolation=cv2.INTER_LINEAR) for side in sides], axis=2)
    edge = 1 / (1 + np.exp(-np.mean(stacked, axis=2).astype(np.float64)))
    if safe:
        edge = _safe_step(edge)
    return _u8(edge)


def _run_hed(module: Preprocessor, padded: np.ndarray, a: float, b: float, models_dir: Path, device: str) -> np.ndarray:
    return hed_edges(_network(_HED, models_dir, device, module.name), padded, module.name == "hed_safe", device)


# --- MiDaS ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _run_midas(module: Preprocessor, padded: np.ndarray, a: float, b: float, models_dir: Path,
               device: str) -> np.ndarray:
    network = _network(_MIDAS, models_dir, device, module.name)
    with _MIDAS_RUN:
        depth = network(_to_input(padded, device) / 127.5 - 1.0)[0]
    scaled = depth - torch.min(depth)
    peak = torch.max(scaled)
    scaled = scaled / peak if peak > 0 else torch.zeros_like(scaled)  # a flat map is black (the extension: NaN -> 0)
    depth_01 = scaled.cpu().numpy()
    if module.name == "depth":
        return _u8(depth_01)
    depth_np = depth.cpu().numpy().astype(np.float32)
    x = cv2.Sobel(depth_np, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth_np, cv2.CV_32F, 0, 1, ksize=3)
    z = np.ones_like(x) * np.pi * 2.0
    x[depth_01 < a] = 0  # a: Normal Background Threshold
    y[depth_01 < a] = 0
    normal = np.stack([x, y, z], axis=2)
    normal /= np.sum(normal**2.0, axis=2, keepdims=True) ** 0.5
    return np.ascontiguousarray((normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:, :, ::-1])


# --- OpenPose ------------------------------------------------------------------------------------------------------

#: module -> (draw body, use hands, use faces), as the extension's ``preprocessor_compiled`` partials.
_OPENPOSE_PARTS = {
    "openpose": (True, False, False),
    "openpose_hand": (True, True, False),
    "openpose_face": (True, False, True),
    "openpose_faceonly": (False, False, True),
    "openpose_full": (True, True, True),
}

_LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
          (2, 1), (1, 15), (15, 17), (1, 16), (16, 18))
_BODY_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
                 (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
                 (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
_HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
               (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
_EPS = 0.01


def _hsv_full(h: float) -> tuple[float, float, float]:
    """``matplotlib.colors.hsv_to_rgb([h, 1, 1]) * 255`` (what the extension colours hand edges with)."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    r, g, b = ((1.0, f, 0.0), (1.0 - f, 1.0, 0.0), (0.0, 1.0, f), (0.0, 1.0 - f, 1.0), (f, 0.0, 1.0),
               (1.0, 0.0, 1.0 - f))[i]
    return r * 255.0, g * 255.0, b * 255.0


def _scale(keypoints: list[Any], canvas: np.ndarray) -> tuple[float, float]:
    """``is_normalized``: keypoints in 0..1 are scaled to the canvas, others are pixels already."""
    inside = [0 <= abs(k.x) <= 1 and 0 <= abs(k.y) <= 1 for k in keypoints if k is not None]
    if not inside or not all(inside):
        return 1.0, 1.0
    return float(canvas.shape[0]), float(canvas.shape[1])


def _draw_body(canvas: np.ndarray, keypoints: list[Any]) -> None:
    height, width = _scale(keypoints, canvas)
    for (first, second), colour in zip(_LIMBS, _BODY_COLOURS, strict=False):
        k1, k2 = keypoints[first - 1], keypoints[second - 1]
        if k1 is None or k2 is None:
            continue
        ys = np.array([k1.x, k2.x]) * width
        xs = np.array([k1.y, k2.y]) * height
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(ys)), int(np.mean(xs))), (int(length / 2), 4), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, np.asarray(polygon), [int(float(c) * 0.6) for c in colour])
    for keypoint, colour in zip(keypoints, _BODY_COLOURS, strict=False):
        if keypoint is not None:
            cv2.circle(canvas, (int(keypoint.x * width), int(keypoint.y * height)), 4, colour, thickness=-1)


def _draw_hand(canvas: np.ndarray, keypoints: list[Any] | None) -> None:
    if not keypoints:
        return
    height, width = _scale(keypoints, canvas)
    for index, (first, second) in enumerate(_HAND_EDGES):
        k1, k2 = keypoints[first], keypoints[second]
        if k1 is None or k2 is None:
            continue
        x1, y1, x2, y2 = int(k1.x * width), int(k1.y * height), int(k2.x * width), int(k2.y * height)
        if x1 > _EPS and y1 > _EPS and x2 > _EPS and y2 > _EPS:
            cv2.line(canvas, (x1, y1), (x2, y2), _hsv_full(index / float(len(_HAND_EDGES))), thickness=2)
    for keypoint in keypoints:
        if keypoint is None:
            continue
        x, y = int(keypoint.x * width), int(keypoint.y * height)
        if x > _EPS and y > _EPS:
            cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)


def _draw_face(canvas: np.ndarray, keypoints: list[Any] | None) -> None:
    if not keypoints:
        return
    height, width = _scale(keypoints, canvas)
    for keypoint in keypoints:
        if keypoint is None:
            continue
        x, y = int(keypoint.x * width), int(keypoint.y * height)
        if x > _EPS and y > _EPS:
            cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)


def draw_poses(poses: list[Any], height: int, width: int, body: bool, hands: bool, faces: bool) -> np.ndarray:
    """The extension's ``draw_poses`` (``annotator/openpose``): limbs and joints, hands, face points on black."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for pose in poses:
        if body:
            _draw_body(canvas, pose.body.keypoints)
        if hands:
            _draw_hand(canvas, pose.left_hand)
            _draw_hand(canvas, pose.right_hand)
        if faces:
            _draw_face(canvas, pose.face)
    return canvas


@functools.cache
def _estimators() -> tuple[type, type, type, type]:
    """controlnet-aux's Body/Hand/Face wrappers around a network this module loaded (their own constructors
    ``torch.load`` a path), and its detector."""
    open_pose = _aux("open_pose")
    face_module = _aux("open_pose.face")
    body_base: Any = open_pose.Body
    hand_base: Any = open_pose.Hand
    face_base: Any = face_module.Face

    class Body(body_base):
        def __init__(self, model: torch.nn.Module) -> None:
            self.model = model

    class Hand(hand_base):
        def __init__(self, model: torch.nn.Module) -> None:
            self.model = model

    class Face(face_base):
        def __init__(self, model: torch.nn.Module) -> None:
            self.inference_size = face_module.params["inference_img_size"]
            self.sigma = face_module.params["gaussian_sigma"]
            self.threshold = face_module.params["heatmap_peak_thresh"]
            self.model = model

    return Body, Hand, Face, open_pose.OpenposeDetector


def _run_openpose(module: Preprocessor, padded: np.ndarray, a: float, b: float, models_dir: Path,
                  device: str) -> np.ndarray:
    body, hands, faces = _OPENPOSE_PARTS[module.name]
    body_net = _network(_BODY, models_dir, device, module.name)
    hand_net = _network(_HAND, models_dir, device, module.name) if hands else None
    face_net = _network(_FACE, models_dir, device, module.name) if faces else None
    body_cls, hand_cls, face_cls, detector_cls = _estimators()
    detector = detector_cls(body_cls(body_net), hand_cls(hand_net) if hand_net is not None else None,
                            face_cls(face_net) if face_net is not None else None)
    poses = detector.detect_poses(padded, include_hand=hands, include_face=faces)
    return draw_poses(poses, padded.shape[0], padded.shape[1], body, hands, faces)


# --- lineart -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _run_lineart(module: Preprocessor, padded: np.ndarray, a: float, b: float, models_dir: Path,
                 device: str) -> np.ndarray:
    spec = _LINEART_COARSE if module.name == "lineart_coarse" else _LINEART
    network = _network(spec, models_dir, device, module.name)
    line = network(_to_input(padded, device) / 255.0)[0][0]
    return np.asarray(255 - _u8(line.cpu().numpy()), dtype=np.uint8)  # the extension inverts: white lines on black


@torch.no_grad()
def _run_lineart_anime(module: Preprocessor, padded: np.ndarray, a: float, b: float, models_dir: Path,
                       device: str) -> np.ndarray:
    network = _network(_LINEART_ANIME, models_dir, device, module.name)
    height, width = padded.shape[:2]
    size = (256 * int(np.ceil(float(width) / 256.0)), 256 * int(np.ceil(float(height) / 256.0)))
    image = cv2.resize(padded, size, interpolation=cv2.INTER_CUBIC)
    line = network(_to_input(image, device) / 127.5 - 1.0)[0, 0] * 127.5 + 127.5
    line = cv2.resize(line.cpu().numpy(), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.asarray(255 - line.clip(0, 255).astype(np.uint8), dtype=np.uint8)


# --- normal_bae ----------------------------------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def _run_normal_bae(module: Preprocessor, padded: np.ndarray, a: float, b: float, models_dir: Path,
                    device: str) -> np.ndarray:
    network = _network(_NORMAL_BAE, models_dir, device, module.name)
    mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)
    normal = network((_to_input(padded, device) / 255.0 - mean) / std)[0][-1][:, :3]
    normal = ((normal + 1) * 0.5).clip(0, 1)
    return _u8(normal[0].permute(1, 2, 0).cpu().numpy())


# --- M-LSD ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _mlsd_lines(network: torch.nn.Module, image: np.ndarray, score_threshold: float, distance_threshold: float,
                device: str) -> list[tuple[float, float, float, float]]:
    """controlnet-aux's ``pred_lines`` at the image's own size; no segment is an empty list (upstream raises, and the
    extension's ``except Exception: pass`` turns that into a black map)."""
    decode = _aux("mlsd.utils").deccode_output_score_and_ptss
    height, width = image.shape[:2]
    batch = np.concatenate([image, np.ones([height, width, 1])], axis=-1).transpose((2, 0, 1))[None].astype("float32")
    outputs = network(torch.from_numpy(batch / 127.5 - 1.0).float().to(device))
    points, scores, vmap = decode(outputs, 200, 3)
    distances = np.sqrt(np.sum((vmap[:, :, :2] - vmap[:, :, 2:]) ** 2, axis=-1))
    lines = []
    for (y, x), score in zip(points, scores, strict=True):
        if score > score_threshold and distances[y, x] > distance_threshold:
            dx0, dy0, dx1, dy1 = vmap[y, x, :]
            lines.append((2 * (x + dx0), 2 * (y + dy0), 2 * (x + dx1), 2 * (y + dy1)))  # the map is half size
    return lines


def _run_mlsd(module: Preprocessor, padded: np.ndarray, a: float, b: float, models_dir: Path,
              device: str) -> np.ndarray:
    network = _network(_MLSD, models_dir, device, module.name)
    drawn = np.zeros(padded.shape[:2], dtype=np.uint8)
    for x0, y0, x1, y1 in _mlsd_lines(network, padded, a, b, device):  # a: value threshold, b: distance threshold
        cv2.line(drawn, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return drawn


# --- PiDiNet -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _run_pidinet(module: Preprocessor, padded: np.ndarray, a: float, b: float, models_dir: Path,
                 device: str) -> np.ndarray:
    network = _network(_PIDINET, models_dir, device, module.name)
    edge = network(_to_input(padded[:, :, ::-1], device) / 255.0)[-1].cpu().numpy()  # PiDiNet reads BGR
    if module.name == "pidinet_sketch":
        edge = edge > 0.5
    if module.name == "pidinet_safe":
        edge = _safe_step(edge)
    return _u8(np.asarray(edge, dtype=np.float32))[0, 0]


# --- dispatch ------------------------------------------------------------------------------------------------------

_Runner = Callable[[Preprocessor, np.ndarray, float, float, Path, str], np.ndarray]
_RUNNERS: dict[str, _Runner] = {
    "hed": _run_hed, "hed_safe": _run_hed, "scribble_hed": _run_hed,
    "depth": _run_midas, "normal_map": _run_midas,
    **dict.fromkeys(_OPENPOSE_PARTS, _run_openpose),
    "lineart": _run_lineart, "lineart_coarse": _run_lineart, "lineart_anime": _run_lineart_anime,
    "normal_bae": _run_normal_bae,
    "mlsd": _run_mlsd,
    "pidinet": _run_pidinet, "pidinet_safe": _run_pidinet, "pidinet_sketch": _run_pidinet,
    "pidinet_scribble": _run_pidinet,
}
_SCRIBBLES = frozenset({"scribble_hed", "pidinet_scribble"})


def run_annotator(name: str, image: np.ndarray, processor_res: float, threshold_a: float, threshold_b: float,
                  models_dir: Path, device: str = "cpu") -> np.ndarray:
    """Run a weight-needing module the workers implement; raises PreprocessorUnavailable otherwise.

    Returns the HWC3 uint8 map the extension hands to ``detectmap_proc``: the image resized so its shorter side is
    the processor resolution (``processor_res``; -1 or out of range: 512), the module's sliders resolved as the
    extension's bound check does."""
    module = resolve_module(name)
    runner = _RUNNERS.get(module.name)
    if module.name not in WORKER_ANNOTATORS or runner is None:
        files = ", ".join(module.weight_files) or "a model package"
        raise PreprocessorUnavailable(module.name, f"needs annotator weights ({files}) and a loader this farm "
                                                   "does not have")
    resolution, a, b = slider_values(module, processor_res, threshold_a, threshold_b)
    padded, remove_pad = resize_image_with_pad(HWC3(np.asarray(image)), resolution)
    detected = remove_pad(runner(module, padded, a, b, models_dir, device))
    if module.name in _SCRIBBLES:
        detected = _scribble(detected)
    return HWC3(detected)
