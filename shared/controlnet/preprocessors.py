"""ControlNet preprocessors as the A1111 ControlNet extension defines and runs them (torch-free).

Reference: Mikubill/sd-webui-controlnet at commit 56cec5b (v1.1.455, July 2024).

Registry (``PREPROCESSORS``): every ``Preprocessor`` the extension registers (``scripts/preprocessor/*.py`` and the
frozen ``scripts/preprocessor/legacy/preprocessor_compiled.py`` table). Each has an internal ``name`` (what
``/controlnet/module_list`` returns) and a UI ``label`` (``module_list?alias_names=true``, the old
``global_state.preprocessor_aliases``, e.g. ``depth`` -> ``depth_midas``). ``Preprocessor.get_preprocessor`` accepts
either, case-sensitively; so does ``resolve_module``.

Sliders: the extension's UI/API uses ``slider_resolution``, ``slider_1`` and ``slider_2`` (``get_modules_detail``).
Legacy preprocessors never override ``slider_resolution`` (their table's ``resolution`` entry goes to an unused
attribute), so they all show the class default Resolution slider (512, 64..2048, step 8). A hidden slider is ``None``
here and behaves like ``PreprocessorParameter()`` (0..1, value 0.5). Defaults: ``ControlNetUnit.bound_check_params``
replaces any value outside [minimum, maximum] (so -1) with the slider's value; ``run_preprocessor`` does the same.

Implementations (``scripts/preprocessor/model_free_preprocessors.py``, ``legacy/processor.py``,
``annotator/color``, ``annotator/shuffle``, ``annotator/binary``): none, invert, canny, blur_gaussian, scribble_xdog,
shuffle, threshold, tile_resample, tile_colorfix(+sharp) (identity: the colour fix happens in the UNet hook),
color, lineart_standard, recolor_luminance, recolor_intensity, and ``binary`` (dropped from the module list in
2023, commit e6d3a326, but its annotator is still shipped; it used the old 64-multiple ``resize_image``).
Each returns the HWC3 uint8 map the extension hands to ``detectmap_proc`` (see ``detectmap.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from shared.controlnet.detectmap import ResizeMode, hwc3, parse_resize_mode

__all__ = [
    "HWC3",
    "PREPROCESSORS",
    "Preprocessor",
    "PreprocessorUnavailable",
    "Slider",
    "module_list",
    "pad64",
    "pixel_perfect_resolution",
    "resize_image_legacy",
    "resize_image_with_pad",
    "resolve_module",
    "resolve_params",
    "run_preprocessor",
]

U8 = npt.NDArray[np.uint8]
HWC3 = hwc3


class PreprocessorUnavailable(RuntimeError):
    """The module exists in the extension but cannot run here (needs annotator weights, or is not an image map)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"ControlNet preprocessor {name!r} is unavailable: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class Slider:
    """``supported_preprocessor.PreprocessorParameter``: label, default value, bounds and step."""

    label: str
    default: float
    minimum: float
    maximum: float
    step: float = 0.01
    visible: bool = True


#: ``PreprocessorParameter(visible=False)``: what a hidden slider resolves to.
HIDDEN = Slider("EMPTY_LABEL", 0.5, 0.0, 1.0, 0.01, visible=False)
RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)


@dataclass(frozen=True)
class Preprocessor:
    name: str
    label: str
    needs_weights: bool
    weight_files: tuple[str, ...] = ()  # relative to the annotator folder (models/ControlNet/annotators/ here)
    processor_res: Slider | None = RESOLUTION
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    runnable: bool = True  # False: not an image-to-map preprocessor here (reference/embedding/mask/meta modules)
    returns_image: bool = True
    needs_controlnet_model: bool = True  # False where the extension sets do_not_need_model (reference, revision)
    priority: int = 0
    tags: tuple[str, ...] = ()
    in_module_list: bool = True
    note: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, self.label, *self.aliases)

    def sliders(self) -> tuple[Slider, Slider, Slider]:
        """Effective (resolution, slider_1, slider_2) including hidden ones, as the bound check sees them."""
        return (self.processor_res or HIDDEN, self.threshold_a or HIDDEN, self.threshold_b or HIDDEN)


def _w(folder: str, *files: str) -> tuple[str, ...]:
    return tuple(f"{folder}/{f}" for f in files)


def _s(label: str, default: float, minimum: float, maximum: float, step: float = 0.01) -> Slider:
    return Slider(label, default, minimum, maximum, step)


_OPENPOSE = _w("openpose", "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
_DWPOSE = _w("openpose", "yolox_l.onnx", "dw-ll_ucoco_384.onnx")
_ANIMAL = _w("openpose", "yolox_l.onnx", "rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.onnx")
_MIDAS = _w("midas", "dpt_hybrid-midas-501f0c75.pt")
_PIDI = _w("pidinet", "table5_pidinet.pth")
_HED = _w("hed", "ControlNetHED.pth")
_LERES_A = _s("Remove Near %", 0, 0, 100, 0.1)
_LERES_B = _s("Remove Background %", 0, 0, 100, 0.1)
_FIDELITY = _s("Style Fidelity (only for Balanced mode)", 0.5, 0.0, 1.0)
_NOISE = _s("Noise Augmentation", 0.0, 0.0, 1.0)
_GAMMA = _s("Gamma Correction", 1.0, 0.1, 2.0, 0.001)
_VARIATION = _s("Variation", 8.0, 3.0, 32.0, 1.0)

_P = Preprocessor
_ALL: tuple[Preprocessor, ...] = (
    # scripts/preprocessor/model_free_preprocessors.py
    _P("none", "none", False, priority=10, tags=("InstructP2P",)),
    _P("canny", "canny", False, (), RESOLUTION, _s("Low Threshold", 100, 1, 255, 1),
       _s("High Threshold", 200, 1, 255, 1), priority=100, tags=("Canny",)),
    _P("invert", "invert (from white bg & black line)", False, processor_res=None, priority=20,
       tags=("Canny", "Lineart", "Scribble", "MLSD")),
    _P("blur_gaussian", "blur_gaussian", False, (), RESOLUTION, _s("Sigma", 9.0, 0.01, 64.0), tags=("Tile",)),
    _P("scribble_xdog", "scribble_xdog", False, (), RESOLUTION, _s("XDoG Threshold", 32, 1, 64),
       tags=("Scribble", "SparseCtrl")),
    _P("shuffle", "shuffle", False, processor_res=Slider("EMPTY_LABEL", 512, 0.0, 1.0, 0.01, visible=False),
       tags=("Shuffle",), note="random: pass seed= for the extension's seeded numpy stream"),
    # scripts/preprocessor/inpaint.py, lama_inpaint.py (need an RGBA image with the mask in alpha)
    _P("inpaint", "inpaint_global_harmonious", False, processor_res=None, runnable=False, tags=("Inpaint",),
       note="identity on an RGBA image+mask; handled by the inpaint path"),
    _P("inpaint_only", "inpaint_only", False, processor_res=None, runnable=False, priority=100, tags=("Inpaint",),
       note="identity on an RGBA image+mask; handled by the inpaint path"),
    _P("inpaint_only+lama", "inpaint_only+lama", True, _w("lama", "ControlNetLama.pth"), processor_res=None,
       tags=("Inpaint",)),
    # scripts/preprocessor/teed.py, ip_adapter_auto.py, normal_dsine.py, pulid.py, mobile_sam.py
    _P("softedge_teed", "softedge_teed", True, _w("TEED", "7_model.pth"), RESOLUTION,
       _s("Safe Steps", 2, 0, 10, 1), tags=("SoftEdge",)),
    _P("softedge_anyline", "softedge_anyline", True, _w("TEED", "MTEED.pth"), Slider("Resolution", 1280, 64, 2048, 8),
       _s("Safe Steps", 2, 0, 10, 1), tags=("SoftEdge",)),
    _P("ip-adapter-auto", "ip-adapter-auto", True, runnable=False, returns_image=False, priority=1000,
       tags=("IP-Adapter",), note="meta module: picks a CLIP/insightface preprocessor from the model name"),
    _P("normal_dsine", "normal_dsine", True, _w("normal_dsine", "dsine.pt"), RESOLUTION, _s("Fov", 60, 0, 360, 0.1),
       _s("Iterations", 5, 1, 20, 1), tags=("NormalMap",)),
    _P("facexlib", "facexlib", True, processor_res=None),
    _P("ip-adapter_pulid", "ip-adapter_pulid", True, processor_res=None, returns_image=False, tags=("IP-Adapter",)),
    _P("mobile_sam", "mobile_sam", True, _w("mobile_sam", "mobile_sam.pt"), tags=("Segmentation",)),
    # scripts/preprocessor/legacy/preprocessor_compiled.py
    _P("animal_openpose", "animal_openpose", True, _ANIMAL, tags=("OpenPose",)),
    _P("densepose", "densepose (pruple bg & purple torso)", True, _w("densepose", "densepose_r50_fpn_dl.torchscript"),
       tags=("OpenPose",)),
    _P("densepose_parula", "densepose_parula (black bg & blue torso)", True,
       _w("densepose", "densepose_r50_fpn_dl.torchscript"), tags=("OpenPose",)),
    _P("depth_anything", "depth_anything", True, _w("depth_anything", "depth_anything_vitl14.pth"), tags=("Depth",)),
    _P("depth_anything_v2", "depth_anything_v2", True, _w("depth_anything_v2", "depth_anything_v2_vitl.safetensors"),
       tags=("Depth",)),
    _P("depth_hand_refiner", "depth_hand_refiner", True, tags=("Depth",),
       note="hr16/ControlNet-HandRefiner-pruned via the hand_refiner package"),
    _P("depth_leres", "depth_leres", True, _w("leres", "res101.pth"), RESOLUTION, _LERES_A, _LERES_B,
       tags=("Depth",)),
    _P("depth_leres++", "depth_leres++", True, _w("leres", "res101.pth", "latest_net_G.pth"), RESOLUTION, _LERES_A,
       _LERES_B, tags=("Depth",)),
    _P("depth", "depth_midas", True, _MIDAS, priority=100, tags=("Depth",)),
    _P("depth_zoe", "depth_zoe", True, _w("zoedepth", "ZoeD_M12_N.pt"), tags=("Depth",)),
    _P("dw_openpose_full", "dw_openpose_full", True, _DWPOSE, tags=("OpenPose",)),
    _P("instant_id_face_embedding", "instant_id_face_embedding", True, runnable=False, returns_image=False,
       tags=("Instant-ID",), note="insightface antelopev2"),
    _P("instant_id_face_keypoints", "instant_id_face_keypoints", True, tags=("Instant-ID",),
       note="insightface antelopev2"),
    _P("ip-adapter_clip_sd15", "ip-adapter_clip_h", True, _w("clip_vision", "clip_h.pth"), runnable=False,
       returns_image=False, priority=100, tags=("IP-Adapter",)),
    _P("ip-adapter_clip_sdxl", "ip-adapter_clip_g", True, _w("clip_vision", "clip_g.pth"), runnable=False,
       returns_image=False, tags=("IP-Adapter",)),
    _P("ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl_plus_vith", True, _w("clip_vision", "clip_h.pth"),
       runnable=False, returns_image=False, tags=("IP-Adapter",)),
    _P("ip-adapter_face_id", "ip-adapter_face_id", True, runnable=False, returns_image=False, tags=("IP-Adapter",),
       note="insightface buffalo_l"),
    _P("ip-adapter_face_id_plus", "ip-adapter_face_id_plus", True, _w("clip_vision", "clip_h.pth"), runnable=False,
       returns_image=False, tags=("IP-Adapter",), note="insightface buffalo_l + CLIP-H"),
    _P("lineart_anime", "lineart_anime", True, _w("lineart_anime", "netG.pth"), tags=("Lineart",)),
    _P("lineart_anime_denoise", "lineart_anime_denoise", True, _w("manga_line", "erika.pth"), tags=("Lineart",)),
    _P("lineart_coarse", "lineart_coarse", True, _w("lineart", "sk_model2.pth"), tags=("Lineart",)),
    _P("lineart", "lineart_realistic", True, _w("lineart", "sk_model.pth"), tags=("Lineart",)),
    _P("lineart_standard", "lineart_standard (from white bg & black line)", False, priority=100, tags=("Lineart",)),
    _P("mediapipe_face", "mediapipe_face", True, (), RESOLUTION, _s("Max Faces", 1, 1, 10, 1),
       _s("Min Face Confidence", 0.5, 0.01, 1.0), note="models bundled with the mediapipe package"),
    _P("mlsd", "mlsd", True, _w("mlsd", "mlsd_large_512_fp32.pth"), RESOLUTION,
       _s("MLSD Value Threshold", 0.1, 0.01, 2.0), _s("MLSD Distance Threshold", 0.1, 0.01, 20.0), priority=100,
       tags=("MLSD",)),
    _P("normal_bae", "normal_bae", True, _w("normal_bae", "scannet.pt"), priority=100, tags=("NormalMap",)),
    _P("normal_map", "normal_midas", True, _MIDAS, RESOLUTION, _s("Normal Background Threshold", 0.4, 0.0, 1.0),
       tags=("NormalMap",)),
    _P("openpose", "openpose", True, _w("openpose", "body_pose_model.pth"), tags=("OpenPose",)),
    _P("openpose_face", "openpose_face", True, _w("openpose", "body_pose_model.pth", "facenet.pth"),
       tags=("OpenPose",)),
    # faceonly draws faces only, but finds them from the body model's keypoints (the extension loads both)
    _P("openpose_faceonly", "openpose_faceonly", True, _w("openpose", "body_pose_model.pth", "facenet.pth"),
       tags=("OpenPose",)),
    _P("openpose_full", "openpose_full", True, _OPENPOSE, priority=100, tags=("OpenPose",)),
    _P("openpose_hand", "openpose_hand", True, _w("openpose", "body_pose_model.pth", "hand_pose_model.pth"),
       tags=("OpenPose",)),
    _P("recolor_intensity", "recolor_intensity", False, (), RESOLUTION, _GAMMA, tags=("Recolor",)),
    _P("recolor_luminance", "recolor_luminance", False, (), RESOLUTION, _GAMMA, priority=100, tags=("Recolor",)),
    _P("reference_adain", "reference_adain", False, (), RESOLUTION, _FIDELITY, runnable=False,
       needs_controlnet_model=False, tags=("Reference",), note="not a map: the image feeds the UNet hook"),
    _P("reference_adain+attn", "reference_adain+attn", False, (), RESOLUTION, _FIDELITY, runnable=False,
       needs_controlnet_model=False, tags=("Reference",), note="not a map: the image feeds the UNet hook"),
    _P("reference_only", "reference_only", False, (), RESOLUTION, _FIDELITY, runnable=False,
       needs_controlnet_model=False, priority=100, tags=("Reference",),
       note="not a map: the image feeds the UNet hook"),
    _P("revision_clipvision", "revision_clipvision", True, _w("clip_vision", "clip_g.pth"), RESOLUTION, _NOISE,
       runnable=False, returns_image=False, needs_controlnet_model=False, priority=100, tags=("Revision",)),
    _P("revision_ignore_prompt", "revision_ignore_prompt", True, _w("clip_vision", "clip_g.pth"), RESOLUTION, _NOISE,
       runnable=False, returns_image=False, needs_controlnet_model=False, tags=("Revision",)),
    _P("scribble_hed", "scribble_hed", True, _HED, tags=("Scribble", "SparseCtrl")),
    _P("pidinet_scribble", "scribble_pidinet", True, _PIDI, priority=100, tags=("Scribble", "SparseCtrl")),
    _P("anime_face_segment", "seg_anime_face", True, _w("anime_face_segment", "UNet.pth"), tags=("Segmentation",)),
    _P("oneformer_ade20k", "seg_ofade20k", True, _w("oneformer", "250_16_swin_l_oneformer_ade20k_160k.pth"),
       priority=100, tags=("Segmentation",)),
    _P("oneformer_coco", "seg_ofcoco", True, _w("oneformer", "150_16_swin_l_oneformer_coco_100ep.pth"),
       tags=("Segmentation",)),
    _P("segmentation", "seg_ufade20k", True, _w("uniformer", "upernet_global_small.pth"), tags=("Segmentation",)),
    _P("hed", "softedge_hed", True, _HED, tags=("SoftEdge",)),
    _P("hed_safe", "softedge_hedsafe", True, _HED, tags=("SoftEdge",)),
    _P("pidinet", "softedge_pidinet", True, _PIDI, priority=100, tags=("SoftEdge",)),
    _P("pidinet_safe", "softedge_pidisafe", True, _PIDI, tags=("SoftEdge",)),
    _P("color", "t2ia_color_grid", False, tags=("T2I-Adapter",)),
    _P("pidinet_sketch", "t2ia_sketch_pidi", True, _PIDI, tags=("T2I-Adapter",)),
    _P("clip_vision", "t2ia_style_clipvision", True, _w("clip_vision", "clip_vitl.pth"), runnable=False,
       returns_image=False, tags=("T2I-Adapter",)),
    _P("threshold", "threshold", False, (), RESOLUTION, _s("Binarization Threshold", 127, 0, 255)),
    _P("tile_colorfix", "tile_colorfix", False, (), RESOLUTION, _VARIATION, tags=("Tile",)),
    _P("tile_colorfix+sharp", "tile_colorfix+sharp", False, (), RESOLUTION, _VARIATION,
       _s("Sharpness", 1.0, 0.0, 2.0), tags=("Tile",)),
    _P("tile_resample", "tile_resample", False, (), RESOLUTION, _s("Down Sampling Rate", 1.0, 1.0, 8.0),
       priority=100, tags=("Tile",)),
    # Removed from the module list in 2023 (commit e6d3a326); annotator/binary is still shipped.
    _P("binary", "binary", False, (), Slider("Annotator resolution", 512, 64, 2048, 1),
       Slider("Binary threshold", 0, 0, 255, 1), in_module_list=False,
       note="legacy: last listed in v1.0; threshold 0 or 255 selects Otsu"),
)

PREPROCESSORS: Mapping[str, Preprocessor] = {p.name: p for p in _ALL}

_LOOKUP: dict[str, Preprocessor] = {}
for _p in _ALL:
    for _n in _p.names:
        _LOOKUP.setdefault(_n, _p)


def resolve_module(name: str) -> Preprocessor:
    """Find a module by internal name or UI label (exact, case-sensitive, as ``Preprocessor.get_preprocessor``)."""
    try:
        return _LOOKUP[name]
    except KeyError:
        raise KeyError(f"unknown ControlNet preprocessor {name!r}") from None


def module_list(alias_names: bool = False) -> list[str]:
    """``/controlnet/module_list`` order: "none" first, then by (priority, label) descending."""
    listed = [p for p in _ALL if p.in_module_list and p.name != "none"]
    listed.sort(key=lambda p: str(p.priority).zfill(8) + p.label, reverse=True)
    ordered = [PREPROCESSORS["none"], *listed]
    return [p.label if alias_names else p.name for p in ordered]


def resolve_params(
    module: Preprocessor, processor_res: float = -1, threshold_a: float = -1, threshold_b: float = -1
) -> tuple[float, float, float]:
    """``ControlNetUnit.bound_check_params``: a value outside its slider's bounds becomes the slider default."""
    resolved: list[float] = []
    for value, slider in zip((processor_res, threshold_a, threshold_b), module.sliders(), strict=True):
        resolved.append(slider.default if value < slider.minimum or value > slider.maximum else value)
    return resolved[0], resolved[1], resolved[2]


# --- image helpers -------------------------------------------------------------------------------------------------


def pad64(x: int) -> int:
    """Padding that takes ``x`` up to the next multiple of 64 (``scripts/utils.py`` ``pad64``)."""
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_image_with_pad(image: np.ndarray, resolution: float) -> tuple[U8, Callable[[np.ndarray], U8]]:
    """``resize_image_with_pad``: shorter side to ``resolution`` (CUBIC up, AREA down), edge-pad to multiples of 64.

    Returns the padded image and ``remove_pad``, which crops any same-sized result back to the unpadded size.
    """
    img = hwc3(image)
    h_raw, w_raw = img.shape[:2]
    k = float(resolution) / float(min(h_raw, w_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h_target = int(np.round(float(h_raw) * k))
    w_target = int(np.round(float(w_raw) * k))
    resized = np.asarray(cv2.resize(img, (w_target, h_target), interpolation=interpolation), dtype=np.uint8)
    padded = np.pad(resized, [[0, pad64(h_target)], [0, pad64(w_target)], [0, 0]], mode="edge")

    def remove_pad(x: np.ndarray) -> U8:
        return np.ascontiguousarray(np.asarray(x[:h_target, :w_target], dtype=np.uint8).copy())

    return np.ascontiguousarray(padded.copy()), remove_pad


def resize_image_legacy(image: np.ndarray, resolution: float) -> U8:
    """Pre-2023-05 ``annotator/util.py`` ``resize_image``: shorter side ~``resolution``, both sides rounded to 64s."""
    img = hwc3(image)
    h, w = float(img.shape[0]), float(img.shape[1])
    k = float(resolution) / min(h, w)
    h_new = int(np.round(h * k / 64.0)) * 64
    w_new = int(np.round(w * k / 64.0)) * 64
    interpolation = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return np.asarray(cv2.resize(img, (w_new, h_new), interpolation=interpolation), dtype=np.uint8)


def pixel_perfect_resolution(
    image_hw: tuple[int, int], target_w: int, target_h: int, resize_mode: ResizeMode | str | int
) -> int:
    """``external_code.pixel_perfect_resolution``: the processor_res that makes the map land 1:1 on the target."""
    raw_h, raw_w = image_hw
    k_h = float(target_h) / float(raw_h)
    k_w = float(target_w) / float(raw_w)
    mode = parse_resize_mode(resize_mode)
    k = min(k_h, k_w) if mode is ResizeMode.RESIZE_AND_FILL else max(k_h, k_w)
    return int(np.round(k * float(min(raw_h, raw_w))))


# --- implementations ----------------------------------------------------------------------------------------------


def _none(img: U8, res: float, a: float, b: float) -> U8:
    return img


def _invert(img: U8, res: float, a: float, b: float) -> U8:
    return np.asarray(255 - img, dtype=np.uint8)


def _canny(img: U8, res: float, a: float, b: float) -> U8:
    padded, remove_pad = resize_image_with_pad(img, res)
    edges = cv2.Canny(padded, int(a), int(b))
    return remove_pad(cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB))


def _blur_gaussian(img: U8, res: float, a: float, b: float) -> U8:
    padded, remove_pad = resize_image_with_pad(img, res)
    return np.asarray(cv2.GaussianBlur(remove_pad(padded), (0, 0), float(a)), dtype=np.uint8)


def _scribble_xdog(img: U8, res: float, a: float, b: float) -> U8:
    padded, remove_pad = resize_image_with_pad(img, res)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(padded, dtype=np.uint8)
    result[2 * (255 - dog) > a] = 255  # dog is uint8: 255 - dog and 2 * (...) wrap as in the extension
    return remove_pad(result)


def _threshold(img: U8, res: float, a: float, b: float) -> U8:
    padded, remove_pad = resize_image_with_pad(img, res)
    result = np.zeros_like(padded, dtype=np.uint8)
    result[np.min(padded, axis=2) > a] = 255
    return remove_pad(result)


def _tile_resample(img: U8, res: float, a: float, b: float) -> U8:
    if a < 1.1:
        return img
    h = int(float(img.shape[0]) / float(a))
    w = int(float(img.shape[1]) / float(a))
    return np.asarray(cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _resize_shortest_edge(img: U8, size: int) -> U8:
    """``annotator/color`` ``cv2_resize_shortest_edge`` (INTER_AREA)."""
    h, w = img.shape[:2]
    if h < w:
        new_h, new_w = size, int(round(w / h * size))
    else:
        new_w, new_h = size, int(round(h / w * size))
    return np.asarray(cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _color(img: U8, res: float, a: float, b: float) -> U8:
    resized = _resize_shortest_edge(img, int(res))
    h, w = resized.shape[:2]
    grid = cv2.resize(resized, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)
    return np.asarray(cv2.resize(grid, (w, h), interpolation=cv2.INTER_NEAREST), dtype=np.uint8)


def _lineart_standard(img: U8, res: float, a: float, b: float) -> U8:
    padded, remove_pad = resize_image_with_pad(img, res)
    x = padded.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    median = np.median(strong) if strong.size else None  # upstream: median of nothing is nan, and max(16, nan) == 16
    intensity /= median if median is not None and median > 16 else 16
    intensity *= 127
    return remove_pad(hwc3(intensity.clip(0, 255).astype(np.uint8)))


def _recolor(img: U8, gamma: float, conversion: int, channel: int) -> U8:
    plane = cv2.cvtColor(img, conversion)[:, :, channel].astype(np.float32) / 255.0
    plane = plane**gamma
    grey = (plane * 255.0).clip(0, 255).astype(np.uint8)
    return np.asarray(cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), dtype=np.uint8)


def _recolor_luminance(img: U8, res: float, a: float, b: float) -> U8:
    return _recolor(img, a, cv2.COLOR_BGR2LAB, 0)  # upstream converts the RGB array with BGR2LAB; kept as is


def _recolor_intensity(img: U8, res: float, a: float, b: float) -> U8:
    return _recolor(img, a, cv2.COLOR_BGR2HSV, 2)


def _binary(img: U8, res: float, a: float, b: float) -> U8:
    resized = resize_image_legacy(img, res)
    grey = cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY)
    if a == 0 or a == 255:
        _, out = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    else:
        _, out = cv2.threshold(grey, a, 255, cv2.THRESH_BINARY_INV)
    return np.asarray(cv2.cvtColor(out, cv2.COLOR_GRAY2RGB), dtype=np.uint8)


def _noise_disk(rng: np.random.RandomState, h: int, w: int, f: int) -> npt.NDArray[np.float64]:
    """``annotator/util.py`` ``make_noise_disk`` for one channel."""
    coarse = rng.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, 1))
    smooth = np.asarray(cv2.resize(coarse, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC), dtype=np.float64)
    noise = smooth[f : f + h, f : f + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return np.asarray(noise[:, :, None], dtype=np.float64)


def shuffle(img: U8, resolution: float, rng: np.random.RandomState) -> U8:
    """``shuffle`` (``annotator/shuffle`` ``ContentShuffleDetector``): remap through a smooth random flow field."""
    padded, remove_pad = resize_image_with_pad(img, resolution)
    x = remove_pad(padded)
    h, w = x.shape[:2]
    fx = _noise_disk(rng, h, w, 256) * float(w - 1)
    fy = _noise_disk(rng, h, w, 256) * float(h - 1)
    flow = np.concatenate([fx, fy], axis=2).astype(np.float32)
    remapped = cv2.remap(x, flow, None, cv2.INTER_LINEAR)  # type: ignore[call-overload]  # stubs forbid map2=None
    return np.asarray(remapped, dtype=np.uint8)


_Impl = Callable[[U8, float, float, float], U8]
IMPLEMENTATIONS: Mapping[str, _Impl] = {
    "none": _none,
    "invert": _invert,
    "canny": _canny,
    "blur_gaussian": _blur_gaussian,
    "scribble_xdog": _scribble_xdog,
    "threshold": _threshold,
    "tile_resample": _tile_resample,
    "tile_colorfix": _none,
    "tile_colorfix+sharp": _none,
    "color": _color,
    "lineart_standard": _lineart_standard,
    "recolor_luminance": _recolor_luminance,
    "recolor_intensity": _recolor_intensity,
    "binary": _binary,
}


def run_preprocessor(
    name: str,
    image: np.ndarray,
    processor_res: float = -1,
    threshold_a: float = -1,
    threshold_b: float = -1,
    *,
    seed: int | None = None,
) -> U8:
    """Run a weight-free module on an RGB uint8 image; returns the HWC3 uint8 map before ``detectmap_proc``.

    ``seed`` only matters for ``shuffle`` (the extension seeds numpy's global generator from the job's seed; the
    same integer here gives the same stream). Raises ``KeyError`` for unknown names and ``PreprocessorUnavailable``
    for modules that need annotator weights or do not produce an image map.
    """
    module = resolve_module(name)
    if module.needs_weights:
        files = ", ".join(module.weight_files) or "a model package"
        raise PreprocessorUnavailable(module.name, f"needs annotator weights ({files})")
    if not module.runnable:
        raise PreprocessorUnavailable(module.name, module.note or "not an image preprocessor")
    img = hwc3(np.asarray(image))
    res, a, b = resolve_params(module, processor_res, threshold_a, threshold_b)
    if module.name == "shuffle":
        return hwc3(shuffle(img, res, np.random.RandomState(seed)))
    impl = IMPLEMENTATIONS.get(module.name)
    if impl is None:  # pragma: no cover - every runnable weight-free module has an implementation
        raise PreprocessorUnavailable(module.name, "not implemented")
    return hwc3(impl(img, res, a, b))
