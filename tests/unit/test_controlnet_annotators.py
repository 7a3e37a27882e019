"""Preprocessors with annotator weights: available exactly when their weights are installed, run on the worker
(HED and its safe and scribble variants on a random-weight ControlNetHED in the extension's .pth format), and a
booby-trapped .pth never runs its payload."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from api.submission.controlnet import available_modules, why_not
from shared.controlnet.annotators import annotator_available
from shared.controlnet.preprocessors import PREPROCESSORS, PreprocessorUnavailable
from worker.engine.annotators import HedNetwork, run_annotator


def hed_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = HedNetwork()
        with torch.no_grad():
            for block in (network.block1, network.block2, network.block3, network.block4, network.block5):
                torch.nn.init.normal_(block.projection.weight, std=0.5)
    return network.state_dict()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("annotators") / "models"
    (root / "ControlNet").mkdir(parents=True)
    return root


def install(models: Path) -> Path:
    path = models / "ControlNet" / "annotators" / "hed" / "ControlNetHED.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(hed_weights(), path)  # the extension's format: a pickled state dict
    return path


def picture() -> np.ndarray:
    image = Image.new("RGB", (80, 64), (20, 40, 200))
    image.paste((250, 250, 240), (20, 16, 60, 48))
    return np.asarray(image)


def test_the_network_has_the_extensions_state_dict_layout() -> None:
    keys = set(HedNetwork().state_dict())
    assert {"norm", "block1.convs.0.weight", "block1.convs.1.bias", "block1.projection.weight",
            "block3.convs.2.weight", "block5.convs.2.bias", "block5.projection.bias"} <= keys
    assert "block1.convs.2.weight" not in keys and len(keys) == 1 + 2 * (2 + 2 + 3 + 3 + 3) + 2 * 5


def test_available_exactly_when_the_weights_are_installed_and_then_it_runs(models: Path) -> None:
    hed = PREPROCESSORS["hed"]
    assert not annotator_available(hed, models) and "hed" not in available_modules(models)
    assert "annotators/hed/ControlNetHED.pth" in (why_not(hed, models) or "")
    with pytest.raises(PreprocessorUnavailable):
        run_annotator("softedge_hed", picture(), 64, -1, -1, models)
    install(models)
    assert annotator_available(hed, models) and {"hed", "hed_safe", "scribble_hed"} <= set(available_modules(models))
    assert not annotator_available(PREPROCESSORS["depth"], models)  # implemented, but its weights are not here
    edges = run_annotator("softedge_hed", picture(), 64, -1, -1, models)
    assert edges.shape == (64, 80, 3) and edges.dtype == np.uint8 and edges.std() > 1.0
    assert np.array_equal(edges, run_annotator("hed", picture(), 64, -1, -1, models))  # name and label
    safe = run_annotator("hed_safe", picture(), 64, -1, -1, models)
    assert set(np.unique(safe)) <= {0, 127, 255}
    scribble = run_annotator("scribble_hed", picture(), 64, -1, -1, models)
    assert set(np.unique(scribble)) <= {0, 255}


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch /tmp/renderfarm-hed-payload-ran",))


def test_a_booby_trapped_pth_is_refused_without_running_its_payload(tmp_path: Path) -> None:
    models = tmp_path / "models"
    trap = models / "ControlNet" / "annotators" / "hed" / "ControlNetHED.pth"
    trap.parent.mkdir(parents=True)
    marker = Path("/tmp/renderfarm-hed-payload-ran")
    marker.unlink(missing_ok=True)
    buffer = io.BytesIO()
    torch.save({"norm": _Payload()}, buffer, pickle_module=pickle)
    trap.write_bytes(buffer.getvalue())
    with pytest.raises(PreprocessorUnavailable, match="not a plain weights file"):
        run_annotator("hed", picture(), 64, -1, -1, models)
    assert not marker.exists()
