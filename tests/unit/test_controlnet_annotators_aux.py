"""The controlnet-aux annotators on the worker (MiDaS depth/normal, OpenPose, lineart, lineart_anime, normal_bae,
M-LSD, PiDiNet): each runs on random weights saved in the extension's file format (torch.save'd state dicts, with
the containers and key prefixes the extension's loaders unwrap) and gives the map the extension would (size, dtype,
value set, slider meaning); each is available exactly when its files are installed; nothing is downloaded (sockets
are shut for these tests); a wrong or booby-trapped file is refused naming it, without running its payload."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import pickle
import socket
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from api.submission.controlnet import available_modules
from shared.controlnet.annotators import WORKER_ANNOTATORS, annotator_available
from shared.controlnet.preprocessors import PREPROCESSORS, PreprocessorUnavailable, resolve_module
from worker.engine import annotators
from worker.engine.annotators import draw_poses, run_annotator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from controlnet_aux.lineart import Generator
    from controlnet_aux.lineart_anime import UnetGenerator
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    from controlnet_aux.normalbae.nets.NNET import NNET
    from controlnet_aux.open_pose.body import BodyResult, Keypoint
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model
    from controlnet_aux.pidi.model import pidinet


# --- the extension's files, with random weights --------------------------------------------------------------------


def _nnet() -> torch.nn.Module:
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                                 importance_ratio=0.7)
    return NNET(args)


def _unet() -> torch.nn.Module:
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)


def _no_block_prefix(state: dict[str, torch.Tensor]) -> Any:
    return {key.split(".", 1)[1]: value for key, value in state.items()}  # OpenPose's files name layers bare


def _data_parallel(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"module.{key}": value for key, value in state.items()}


def _positive_depth(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random DPT heads swing by hundreds; a damped last layer with a positive bias keeps the depth above the
    final ReLU everywhere, so the map has structure (the real file is a plain state dict too)."""
    return state | {"scratch.output_conv.4.weight": state["scratch.output_conv.4.weight"] * 1e-3,
                    "scratch.output_conv.4.bias": torch.ones(1)}


#: file (under models/ControlNet/annotators) -> (network, how the extension's file holds its state dict)
FILES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[dict[str, torch.Tensor]], Any]]] = {
    "midas/dpt_hybrid-midas-501f0c75.pt": (
        lambda: DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True), _positive_depth),
    "openpose/body_pose_model.pth": (bodypose_model, _no_block_prefix),
    "openpose/hand_pose_model.pth": (handpose_model, _no_block_prefix),
    "openpose/facenet.pth": (FaceNet, dict),
    "lineart/sk_model.pth": (lambda: Generator(3, 1, 3), dict),
    "lineart/sk_model2.pth": (lambda: Generator(3, 1, 3), dict),
    "lineart_anime/netG.pth": (_unet, _data_parallel),
    "normal_bae/scannet.pt": (_nnet, lambda state: {"model": _data_parallel(state)}),
    "mlsd/mlsd_large_512_fp32.pth": (MobileV2_MLSD_Large, dict),
    "pidinet/table5_pidinet.pth": (pidinet, lambda state: {"state_dict": _data_parallel(state), "epoch": 10}),
}


def random_state(build: Callable[[], torch.nn.Module], seed: int = 0) -> dict[str, torch.Tensor]:
    """A network's state dict with He-scaled random weights (built on the meta device: shapes only, fast)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.device("meta"):
        warnings.simplefilter("ignore")
        shapes = build().state_dict()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith("running_var") or (meta.ndim == 1 and key.endswith("weight")):
            state[key] = torch.ones(meta.shape)
        elif meta.ndim == 1:
            state[key] = torch.randn(meta.shape, generator=generator) * 0.1
        else:
            fan_in = max(1, math.prod(meta.shape[1:]))
            state[key] = torch.randn(meta.shape, generator=generator) * math.sqrt(2.0 / fan_in)
    return state


def install(models: Path, *files: str, seed: int = 0) -> None:
    for relative in files:
        build, container = FILES[relative]
        path = models / "ControlNet" / "annotators" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(container(random_state(build, seed)), path)


@pytest.fixture
def models(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "models"
    (root / "ControlNet").mkdir(parents=True)
    yield root
    annotators.unload_annotators()  # the random networks are big; free them with their files
    for path in root.rglob("*.p*"):
        path.unlink()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Path]]:
    """Models folders with the big files, written once for the tests that share them (MiDaS: ~120M parameters)."""
    folders: dict[tuple[Any, ...], Path] = {}

    def folder(*files: str, seed: int = 0) -> Path:
        if (*files, seed) not in folders:
            root = tmp_path_factory.mktemp("annotators") / "models"
            (root / "ControlNet").mkdir(parents=True)
            install(root, *files, seed=seed)
            folders[(*files, seed)] = root
        return folders[(*files, seed)]

    yield folder
    annotators.unload_annotators()
    for root in folders.values():
        for path in root.rglob("*.p*"):
            path.unlink()


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network (a download) fails loudly."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def picture(width: int = 80, height: int = 64) -> np.ndarray:
    image = Image.new("RGB", (width, height), (20, 40, 200))
    image.paste((250, 250, 240), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    image.paste((200, 30, 30), (width // 3, height // 3, width // 2, 2 * height // 3))
    return np.asarray(image)


def is_map(result: np.ndarray, height: int = 64, width: int = 80) -> bool:
    return result.shape == (height, width, 3) and result.dtype == np.uint8 and result.flags.c_contiguous


def grey(result: np.ndarray) -> bool:
    return bool((result[:, :, 0] == result[:, :, 1]).all() and (result[:, :, 1] == result[:, :, 2]).all())


def available(models: Path, *names: str) -> list[bool]:
    return [annotator_available(PREPROCESSORS[resolve_module(name).name], models) for name in names]


# --- metadata ------------------------------------------------------------------------------------------------------


def test_every_worker_annotator_has_weight_files_this_module_loads() -> None:
    for name in WORKER_ANNOTATORS:
        module = PREPROCESSORS[name]
        assert module.needs_weights and module.runnable and module.weight_files, name
        assert set(module.weight_files) <= {*FILES, "hed/ControlNetHED.pth"}, name
    # faceonly finds faces from body keypoints: it needs the body model too
    assert set(PREPROCESSORS["openpose_faceonly"].weight_files) == {
        "openpose/body_pose_model.pth", "openpose/facenet.pth"}


# --- MiDaS ---------------------------------------------------------------------------------------------------------


MIDAS = "midas/dpt_hybrid-midas-501f0c75.pt"


def test_depth_midas_runs_on_dpt_hybrid_weights(tmp_path: Path, installed: Callable[..., Path]) -> None:
    assert available(tmp_path, "depth_midas", "normal_midas") == [False, False]
    assert "depth" not in available_modules(tmp_path)
    with pytest.raises(PreprocessorUnavailable, match=MIDAS):
        run_annotator("depth_midas", picture(), 64, -1, -1, tmp_path)
    models = installed(MIDAS)
    assert available(models, "depth_midas", "depth", "normal_midas") == [True, True, True]
    assert {"depth", "normal_map"} <= set(available_modules(models))

    depth = run_annotator("depth_midas", picture(), 64, -1, -1, models)
    assert is_map(depth) and grey(depth)
    assert depth.min() == 0 and depth.max() >= 250 and len(np.unique(depth)) > 50  # min-max scaled, then cropped
    assert np.array_equal(depth, run_annotator("depth", picture(), 64, 0.9, 0.9, models))  # label; no sliders
    assert is_map(run_annotator("depth", picture(), 128, -1, -1, models), 128, 160)  # processor resolution


def test_normal_midas_background_threshold_is_threshold_a(installed: Callable[..., Path]) -> None:
    models = installed(MIDAS)
    flat_bgr = (255, 127, 127)  # the normal (0, 0, 1), in the BGR order annotator/midas returns

    def flat_share(threshold: float) -> float:
        normal = run_annotator("normal_midas", picture(), 64, threshold, -1, models)
        assert is_map(normal)
        return float((normal.reshape(-1, 3) == flat_bgr).all(axis=1).mean())

    # Pixels whose depth (scaled 0..1) is under threshold_a are background: their normal is flat. Threshold 1
    # leaves only the nearest pixels, 0 none.
    everything, default, nothing = flat_share(1.0), flat_share(-1), flat_share(0.0)  # -1: the default, 0.4
    assert everything > 0.95 > default > nothing and nothing < 0.05


# --- OpenPose ------------------------------------------------------------------------------------------------------


POSE = ("openpose/body_pose_model.pth", "openpose/hand_pose_model.pth", "openpose/facenet.pth")


def test_openpose_modules_need_exactly_the_networks_they_use(models: Path) -> None:
    names = ("openpose", "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full")
    assert available(models, *names) == [False] * 5
    install(models, "openpose/body_pose_model.pth")
    assert available(models, *names) == [True, False, False, False, False]
    with pytest.raises(PreprocessorUnavailable, match="openpose/hand_pose_model.pth"):
        run_annotator("openpose_hand", picture(), 64, -1, -1, models)
    install(models, "openpose/facenet.pth")
    assert available(models, *names) == [True, False, True, True, False]
    install(models, "openpose/hand_pose_model.pth")
    assert available(models, *names) == [True] * 5


def test_openpose_draws_the_bodies_it_finds(installed: Callable[..., Path]) -> None:
    models = installed(*POSE)
    pose = run_annotator("openpose", picture(), 64, -1, -1, models)
    assert is_map(pose)
    # random weights find a body here; it is drawn in the extension's palette (joints, and limbs at 60 %)
    colours = {tuple(c) for c in pose.reshape(-1, 3)} - {(0, 0, 0)}
    assert colours and colours <= {*map(tuple, annotators._BODY_COLOURS),
                                    *(tuple(int(v * 0.6) for v in c) for c in annotators._BODY_COLOURS)}


def test_the_hand_and_face_networks_load_and_run(installed: Callable[..., Path]) -> None:
    # openpose_hand/face crop hands and faces from the bodies found and run these on them (at 184..736 px and
    # 384 px, seconds each on a CPU: see the slow test); here each runs once on a small crop.
    models = installed(*POSE)
    hand = annotators._network(annotators._HAND, models, "cpu", "openpose_hand")
    face = annotators._network(annotators._FACE, models, "cpu", "openpose_face")
    with torch.no_grad():
        assert hand(torch.zeros(1, 3, 64, 64)).shape == (1, 22, 8, 8)  # 21 joints and the background
        assert face(torch.zeros(1, 3, 64, 64))[-1].shape == (1, 71, 8, 8)  # 70 landmarks and the background


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="OpenPose's hand and face passes; set RUN_SLOW=1")
def test_every_openpose_module_runs(installed: Callable[..., Path]) -> None:
    for seed in (0, 8):  # on this picture, seed 0's random body network finds a face, seed 8's a hand
        models = installed(*POSE, seed=seed)
        body = run_annotator("openpose", picture(), 64, -1, -1, models)
        for name in ("openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full"):
            pose = run_annotator(name, picture(), 64, -1, -1, models)
            assert is_map(pose), name
            if name == "openpose_faceonly":  # face points only: white dots
                assert {tuple(c) for c in pose.reshape(-1, 3)} <= {(0, 0, 0), (255, 255, 255)}
            else:  # the same bodies, with whatever hands and faces were found on top
                assert ((pose == body) | (body == 0)).all(axis=2).mean() > 0.9, name
    assert is_map(run_annotator("openpose_full", picture(), 128, -1, -1, models), 128, 160)


def test_poses_are_drawn_as_the_extension_draws_them() -> None:
    nose, neck = Keypoint(0.5, 0.25), Keypoint(0.5, 0.5)
    body = BodyResult(keypoints=[nose, neck] + [None] * 16, total_score=1.0, total_parts=2)
    hand = [Keypoint(0.25, 0.75), Keypoint(0.75, 0.75)] + [Keypoint(-0.01, -0.01)] * 19  # missing: negative
    face = [Keypoint(0.1, 0.1)]
    pose = types.SimpleNamespace(body=body, left_hand=hand, right_hand=None, face=face)
    canvas = draw_poses([pose], 64, 64, body=True, hands=True, faces=True)
    assert canvas.shape == (64, 64, 3) and canvas.dtype == np.uint8
    assert tuple(canvas[16, 32]) == (255, 0, 0)  # keypoint 0 (nose) in its colour, radius 4
    assert tuple(canvas[32, 32]) == (255, 85, 0)  # keypoint 1 (neck)
    assert tuple(canvas[24, 32]) == (0, 0, 153)  # the neck-nose limb: colour 12 (0, 0, 255) at 60 %
    assert tuple(canvas[48, 16]) == (0, 0, 255)  # hand joints are blue dots
    assert tuple(canvas[48, 32]) == (255, 0, 0)  # hand edge 0 is hsv(0, 1, 1)
    assert tuple(canvas[6, 6]) == (255, 255, 255)  # face points are white
    only_face = draw_poses([pose], 64, 64, body=False, hands=False, faces=True)
    assert tuple(only_face[16, 32]) == (0, 0, 0) and tuple(only_face[6, 6]) == (255, 255, 255)


# --- lineart -------------------------------------------------------------------------------------------------------


def test_lineart_realistic_coarse_and_anime(models: Path) -> None:
    assert available(models, "lineart_realistic", "lineart_coarse", "lineart_anime") == [False] * 3
    install(models, "lineart/sk_model.pth")
    assert available(models, "lineart_realistic", "lineart_coarse", "lineart_anime") == [True, False, False]
    install(models, "lineart/sk_model2.pth", seed=1)
    install(models, "lineart_anime/netG.pth")
    assert available(models, "lineart_realistic", "lineart_coarse", "lineart_anime") == [True] * 3
    fine = run_annotator("lineart_realistic", picture(), 64, -1, -1, models)
    coarse = run_annotator("lineart_coarse", picture(), 64, -1, -1, models)
    anime = run_annotator("lineart_anime", picture(), 64, -1, -1, models)
    for result in (fine, coarse, anime):
        assert is_map(result) and grey(result) and result.std() > 0.5
    assert not np.array_equal(fine, coarse)  # two files, two networks
    assert np.array_equal(fine, run_annotator("lineart", picture(), 64, -1, -1, models))


def test_lineart_is_the_inverted_generator_output(models: Path) -> None:
    install(models, "lineart/sk_model.pth")
    generator = Generator(3, 1, 3)
    generator.load_state_dict(torch.load(models / "ControlNet/annotators/lineart/sk_model.pth", weights_only=True))
    image = picture(64, 64)
    with torch.no_grad():
        line = generator.eval()(torch.from_numpy(image.copy()).float().permute(2, 0, 1)[None] / 255.0)[0, 0]
    expected = 255 - (line.numpy() * 255.0).clip(0, 255).astype(np.uint8)
    result = run_annotator("lineart_realistic", image, 64, -1, -1, models)
    assert np.array_equal(result[:, :, 0], expected)


# --- normal_bae ----------------------------------------------------------------------------------------------------


def test_normal_bae(models: Path) -> None:
    assert available(models, "normal_bae") == [False]
    install(models, "normal_bae/scannet.pt")
    assert available(models, "normal_bae") == [True]
    normal = run_annotator("normal_bae", picture(), 64, -1, -1, models)
    assert is_map(normal) and not grey(normal)
    # unit normals mapped from -1..1: each pixel's (2v/255 - 1) has length ~1
    vectors = normal.astype(np.float64) / 255.0 * 2.0 - 1.0
    assert np.allclose(np.linalg.norm(vectors, axis=2), 1.0, atol=0.03)


# --- M-LSD ---------------------------------------------------------------------------------------------------------


def test_mlsd_thresholds_are_value_and_distance(models: Path) -> None:
    assert available(models, "mlsd") == [False]
    install(models, "mlsd/mlsd_large_512_fp32.pth")
    assert available(models, "mlsd") == [True]
    lines = run_annotator("mlsd", picture(), 64, 0.01, 0.01, models)
    assert is_map(lines) and grey(lines) and set(np.unique(lines)) == {0, 255}
    assert (run_annotator("mlsd", picture(), 64, 2.0, 0.01, models) == 0).all()  # no score exceeds 2: no lines
    longer = run_annotator("mlsd", picture(), 64, 0.01, 20.0, models)  # only segments longer than 20 px
    assert (longer == 255).sum() <= (lines == 255).sum()
    assert is_map(run_annotator("mlsd", picture(), -1, -1, -1, models), 512, 640)  # defaults 512, 0.1, 0.1


# --- PiDiNet -------------------------------------------------------------------------------------------------------


def test_pidinet_soft_edges_safe_sketch_and_scribble(models: Path) -> None:
    names = ("softedge_pidinet", "softedge_pidisafe", "t2ia_sketch_pidi", "scribble_pidinet")
    assert available(models, *names) == [False] * 4
    install(models, "pidinet/table5_pidinet.pth")
    assert available(models, *names) == [True] * 4
    soft = run_annotator("softedge_pidinet", picture(), 64, -1, -1, models)
    assert is_map(soft) and grey(soft) and soft.std() > 0.5
    assert set(np.unique(run_annotator("softedge_pidisafe", picture(), 64, -1, -1, models))) <= {0, 127, 255}
    sketch = run_annotator("t2ia_sketch_pidi", picture(), 64, -1, -1, models)
    assert set(np.unique(sketch)) <= {0, 255} and np.array_equal(sketch > 0, soft > 127)
    assert set(np.unique(run_annotator("scribble_pidinet", picture(), 64, -1, -1, models))) <= {0, 255}


# --- loading rules -------------------------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/renderfarm-annotator-payload-ran")
USES = {  # a module that reads each file
    "midas/dpt_hybrid-midas-501f0c75.pt": "depth_midas", "openpose/body_pose_model.pth": "openpose",
    "openpose/hand_pose_model.pth": "openpose_hand", "openpose/facenet.pth": "openpose_face",
    "lineart/sk_model.pth": "lineart_realistic", "lineart/sk_model2.pth": "lineart_coarse",
    "lineart_anime/netG.pth": "lineart_anime", "normal_bae/scannet.pt": "normal_bae",
    "mlsd/mlsd_large_512_fp32.pth": "mlsd", "pidinet/table5_pidinet.pth": "softedge_pidinet",
}


@pytest.mark.parametrize("relative", sorted(FILES))
def test_a_booby_trapped_file_is_refused_without_running_its_payload(models: Path, relative: str) -> None:
    module = USES[relative]
    install(models, *(f for f in PREPROCESSORS[resolve_module(module).name].weight_files if f != relative))
    trap = models / "ControlNet" / "annotators" / relative
    trap.parent.mkdir(parents=True, exist_ok=True)
    MARKER.unlink(missing_ok=True)
    buffer = io.BytesIO()
    torch.save({"model": {"conv.weight": _Payload()}}, buffer, pickle_module=pickle)
    trap.write_bytes(buffer.getvalue())
    assert annotator_available(resolve_module(module), models)  # installed, as far as names go
    with pytest.raises(PreprocessorUnavailable, match=f"annotators/{relative} is not a plain weights file"):
        run_annotator(module, picture(), 64, -1, -1, models)
    assert not MARKER.exists()


def test_weights_of_another_network_are_refused_naming_the_file(models: Path) -> None:
    state = random_state(lambda: Generator(3, 1, 3))
    path = models / "ControlNet" / "annotators" / "lineart" / "sk_model.pth"
    path.parent.mkdir(parents=True)
    torch.save({k: v for k, v in state.items() if k != "model4.1.weight"} | {"extra.bias": torch.zeros(1)}, path)
    with pytest.raises(PreprocessorUnavailable) as refused:
        run_annotator("lineart_realistic", picture(), 64, -1, -1, models)
    assert "annotators/lineart/sk_model.pth is not the lineart generator's weights" in str(refused.value)
    assert "missing model4.1.weight" in str(refused.value) and "unexpected extra.bias" in str(refused.value)
    state["model4.1.weight"] = torch.zeros(1, 32, 7, 7)  # wrong shape
    torch.save(state, path)
    with pytest.raises(PreprocessorUnavailable, match="wrong shape or type model4.1.weight"):
        run_annotator("lineart_realistic", picture(), 64, -1, -1, models)


def test_a_safetensors_twin_is_read_and_the_pth_never_opened(models: Path) -> None:
    from safetensors.torch import save_file

    folder = models / "ControlNet" / "annotators" / "mlsd"
    folder.mkdir(parents=True)
    save_file(random_state(MobileV2_MLSD_Large), folder / "mlsd_large_512_fp32.safetensors")
    MARKER.unlink(missing_ok=True)
    buffer = io.BytesIO()
    torch.save({"x": _Payload()}, buffer, pickle_module=pickle)
    (folder / "mlsd_large_512_fp32.pth").write_bytes(buffer.getvalue())
    assert is_map(run_annotator("mlsd", picture(), 64, -1, -1, models))
    assert not MARKER.exists()
