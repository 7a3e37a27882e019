"""GFPGAN face restoration on real files: file discovery (torch-free), strict weights-only loading, RetinaFace
detection, the 5-point alignment and the paste-back, with the real networks at full size and random weights
(devtools/demo_models/face_restoration.py). The demo detector's heads are set so that the outcome is known: one
face at a designed place (or, rebuilt with ``faces=False``, none). One face restore (GFPGAN and ParseNet at
512x512) takes about 20 s on a 2-core CPU, so the module runs exactly one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from devtools.demo_models.face_restoration import (
    DEMO_GFPGAN,
    build_parser_state,
    set_detector_heads,
    write_booby_trapped_pth,
    write_demo_face_restoration,
    write_helper,
)
from shared.models.face_restoration import (
    DETECTOR_FILE,
    GFPGAN_DIR,
    PARSER_FILE,
    FaceRestorationFiles,
    face_restoration_files,
)
from worker.engine.face_restoration import (
    FACE_SIZE,
    FACE_TEMPLATE,
    Face,
    FaceRestorationUnavailable,
    FaceRestorer,
    _load_detector,
    _load_gfpgan,
    _load_parser,
    alignment_matrix,
    detect_faces,
    load_face_restorer,
    restore_faces,
    restore_with_faces,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    write_demo_face_restoration(models)
    return models


@pytest.fixture(scope="module")
def restorer(models_dir: Path) -> FaceRestorer:
    return load_face_restorer(models_dir)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients plus noise: something like a picture, deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width * 200, yy / height * 200, (xx + yy) / (width + height) * 255], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, size=base.shape), 0, 255).astype(np.uint8), "RGB")


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


# ------------------------------------------------------------------------------------ files (torch-free)


def test_the_files_module_is_torch_free() -> None:
    code = "import sys, shared.models.face_restoration; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_missing_files_are_named(tmp_path: Path) -> None:
    reason = face_restoration_files(tmp_path)
    assert isinstance(reason, str) and "models/GFPGAN/" in reason and "does not exist" in reason
    touch(tmp_path / GFPGAN_DIR, DETECTOR_FILE, "gfpgan-lowercase.pth", "GFPGANv1.4.ckpt")
    reason = face_restoration_files(tmp_path)
    assert isinstance(reason, str)
    assert "GFPGANv1.4.pth" in reason and PARSER_FILE in reason and DETECTOR_FILE not in reason
    touch(tmp_path / GFPGAN_DIR, "GFPGANv1.4.pth")
    reason = face_restoration_files(tmp_path)
    assert isinstance(reason, str) and PARSER_FILE in reason and "GFPGANv1.4" not in reason


def test_files_found_in_the_webui_order_with_safetensors_twins_first(tmp_path: Path) -> None:
    folder = tmp_path / GFPGAN_DIR
    touch(folder, "GFPGANv10.pth", "GFPGANv9.pth", "RestoreFormer.pth", DETECTOR_FILE,
          "detection_Resnet50_Final.safetensors", "parsing_parsenet.safetensors")
    found = face_restoration_files(tmp_path)
    assert found == FaceRestorationFiles(gfpgan=folder / "GFPGANv9.pth",  # natural order: 9 before 10
                                         detector=folder / "detection_Resnet50_Final.safetensors",
                                         parser=folder / "parsing_parsenet.safetensors")
    touch(folder, "GFPGANv9.safetensors", PARSER_FILE)
    found = face_restoration_files(tmp_path)
    assert isinstance(found, FaceRestorationFiles)
    assert found.gfpgan.name == "GFPGANv9.safetensors" and found.parser.name == "parsing_parsenet.safetensors"


# ------------------------------------------------------------------------------------------------ loading


def test_networks_load_from_the_released_layouts(models_dir: Path, restorer: FaceRestorer) -> None:
    folder = models_dir / GFPGAN_DIR
    assert restorer.files == FaceRestorationFiles(folder / DEMO_GFPGAN, folder / DETECTOR_FILE, folder / PARSER_FILE)
    released = torch.load(folder / DETECTOR_FILE, weights_only=True)
    assert all(k.startswith("module.") for k in released)  # the loader drops the prefix, as facexlib does
    assert type(restorer.gfpgan).__name__ == "GFPGANv1Clean"
    for net in (restorer.gfpgan, restorer.detector, restorer.parser):
        assert not net.training
        assert {p.dtype for p in net.parameters()} == {torch.float32}
        assert not any(p.requires_grad for p in net.parameters())
    state = restorer.detector.state_dict()
    torch.testing.assert_close(state["body.conv1.weight"], released["module.body.conv1.weight"])


def test_safetensors_twins_load_the_same_weights(tmp_path: Path, restorer: FaceRestorer) -> None:
    parser_state = {k: v.clone() for k, v in restorer.parser.state_dict().items()}
    write_helper(parser_state, tmp_path / "parsing_parsenet.safetensors")
    parser = _load_parser(tmp_path / "parsing_parsenet.safetensors", torch.device("cpu"))
    torch.testing.assert_close(parser.state_dict(), parser_state)
    # a state dict without BatchNorm's num_batches_tracked (older torch) loads too
    trimmed = {k: v for k, v in parser_state.items() if not k.endswith("num_batches_tracked")}
    torch.save(trimmed, tmp_path / "old.pth")
    _load_parser(tmp_path / "old.pth", torch.device("cpu"))


def test_wrong_key_sets_are_refused_naming_the_file(tmp_path: Path) -> None:
    state = build_parser_state()
    bad = dict(state)
    bad.pop("out_img_conv.conv2d.bias")
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "parsing_parsenet.pth")
    with pytest.raises(FaceRestorationUnavailable) as err:
        _load_parser(tmp_path / "parsing_parsenet.pth", torch.device("cpu"))
    assert "parsing_parsenet.pth" in err.value.reason and "missing: out_img_conv.conv2d.bias" in err.value.reason
    assert "unexpected: extra.weight" in err.value.reason
    # the parser's weights are not a detector
    write_helper(state, tmp_path / "detection_Resnet50_Final.safetensors")
    with pytest.raises(FaceRestorationUnavailable, match=r"detection_Resnet50_Final\.safetensors: not a RetinaFace"):
        _load_detector(tmp_path / "detection_Resnet50_Final.safetensors", torch.device("cpu"))
    # nor a GFPGAN model; and a broken file is named too
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "GFPGANv1.4.safetensors"))
    with pytest.raises(FaceRestorationUnavailable, match=r"GFPGANv1\.4\.safetensors: not a GFPGAN model"):
        _load_gfpgan(tmp_path / "GFPGANv1.4.safetensors", torch.device("cpu"))
    (tmp_path / "GFPGANv1.3.pth").write_bytes(b"not a torch file")
    with pytest.raises(FaceRestorationUnavailable, match=r"GFPGANv1\.3\.pth: not a readable \.pth file"):
        _load_gfpgan(tmp_path / "GFPGANv1.3.pth", torch.device("cpu"))


def test_a_booby_trapped_pth_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.marker"
    trap = write_booby_trapped_pth(tmp_path / "trap.pth", marker)
    torch.load(trap, weights_only=False)  # the counterpart: unpickling it really leaves the marker
    assert marker.exists()
    marker.unlink()

    folder = tmp_path / "models" / GFPGAN_DIR
    write_booby_trapped_pth(folder / DETECTOR_FILE, marker)
    write_booby_trapped_pth(folder / "GFPGANv1.4.pth", marker)
    touch(folder, PARSER_FILE)
    with pytest.raises(FaceRestorationUnavailable) as err:
        load_face_restorer(tmp_path / "models")
    assert err.value.reason.startswith(f"{DETECTOR_FILE}: refused")
    with pytest.raises(FaceRestorationUnavailable, match=r"GFPGANv1\.4\.pth: refused"):
        _load_gfpgan(folder / "GFPGANv1.4.pth", torch.device("cpu"))
    assert not marker.exists()


def test_missing_files_make_the_restorer_unavailable(tmp_path: Path) -> None:
    with pytest.raises(FaceRestorationUnavailable, match="does not exist"):
        load_face_restorer(tmp_path)


# ---------------------------------------------------------------------------------------------- detection


def test_detection_returns_faces_in_the_image(restorer: FaceRestorer) -> None:
    width, height = 300, 200
    image_bgr = np.asarray(picture(width, height))[:, :, ::-1]
    faces = detect_faces(restorer, image_bgr)
    # the demo detector's heads find exactly one face: its landmarks are the template's layout at half size,
    # centred at (320, 320) in the detector's input (shorter side 640), scaled back to the image
    assert len(faces) == 1
    (face,) = faces
    x1, y1, x2, y2 = face.box
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert 0.97 < face.score <= 1.0
    assert face.landmarks5.shape == (5, 2)
    scale = height / 640
    expected = ((FACE_TEMPLATE - 256.0) * 0.5 + 320.0) * scale
    np.testing.assert_allclose(face.landmarks5, expected, atol=0.05)


def test_without_faces_the_image_comes_back_unchanged(restorer: FaceRestorer) -> None:
    no_faces = copy.deepcopy(restorer.detector)
    no_faces.load_state_dict(set_detector_heads(no_faces.state_dict(), faces=False))
    blind = dataclasses.replace(restorer, detector=no_faces)
    calls: list[int] = []
    handle = blind.gfpgan.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        image = picture(160, 120, seed=3)
        out = restore_faces(blind, image)
        assert out.size == image.size and out.mode == "RGB" and out is not image
        assert np.array_equal(np.asarray(out), np.asarray(image))
        # no faces given, or only faces that admit no alignment: the image as it was, without running a network
        degenerate = Face(box=(0.0, 0.0, 1.0, 1.0), score=1.0, landmarks5=np.full((5, 2), 7.0, dtype=np.float32))
        for faces in ([], [degenerate]):
            assert np.array_equal(np.asarray(restore_with_faces(blind, image, faces)), np.asarray(image))
        gray = image.convert("L")
        out = restore_faces(blind, gray)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(gray.convert("RGB")))
    finally:
        handle.remove()
    assert calls == []


# ------------------------------------------------------------------------------------- align and paste back


def test_alignment_is_the_identity_on_the_template() -> None:
    matrix = alignment_matrix(FACE_TEMPLATE)
    assert matrix is not None
    np.testing.assert_allclose(matrix, [[1, 0, 0], [0, 1, 0]], atol=1e-4)


def test_alignment_recovers_a_similarity_transform() -> None:
    scale, angle, shift = 0.37, math.radians(23.0), np.array([41.0, -12.5])
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    landmarks = FACE_TEMPLATE @ rotation.T + shift  # where the template's points are in some image
    matrix = alignment_matrix(landmarks)
    assert matrix is not None
    inverse = np.linalg.inv(rotation)
    np.testing.assert_allclose(matrix[:, :2], inverse, atol=1e-4)
    np.testing.assert_allclose(matrix[:, 2], -inverse @ shift, atol=1e-2)
    mapped = landmarks @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, FACE_TEMPLATE, atol=1e-2)


def test_restoring_a_given_face_changes_only_the_face(restorer: FaceRestorer) -> None:
    """A face whose aligned crop is the square [64, 192) of a 256x256 image: GFPGAN and ParseNet run once, the
    restored face is pasted there and every pixel outside stays as it was."""
    image = picture(256, 256, seed=1)
    landmarks = (FACE_TEMPLATE * (128 / FACE_SIZE) + 64).astype(np.float32)
    face = Face(box=(64.0, 64.0, 192.0, 192.0), score=1.0, landmarks5=landmarks)
    out = restore_with_faces(restorer, image, [face])
    assert out.size == image.size and out.mode == "RGB"
    changed = (np.asarray(out) != np.asarray(image)).any(axis=-1)
    rows, cols = np.nonzero(changed)
    assert rows.size and rows.min() >= 63 and rows.max() <= 192 and cols.min() >= 63 and cols.max() <= 192
    assert changed[80:176, 80:176].mean() > 0.5  # the random GFPGAN's face differs from the picture there
