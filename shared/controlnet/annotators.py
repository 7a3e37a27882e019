"""Preprocessors that need annotator weights: which ones the workers run, and whether their weights are installed.

Annotator weights live in ``models/ControlNet/annotators/<folder>/`` under the file names the extension uses
(``hed/ControlNetHED.pth``); a ``.safetensors`` file of the same stem is taken first. Nothing is ever downloaded.
A module with weights is available to jobs when the workers implement it (:data:`WORKER_ANNOTATORS`, the one list
the torch-free API and the worker share) and every weight file is present; the API refuses the others with a 422
listing what runs. The networks run on the worker (:mod:`worker.engine.annotators`): they need torch, and the GPU.

Implemented (each needs the files listed in its ``Preprocessor.weight_files``):

* HED: ``softedge_hed``, ``softedge_hedsafe``, ``scribble_hed`` (``hed/ControlNetHED.pth``; lllyasviel's Apache-2.0
  network, native here);
* MiDaS DPT-hybrid: ``depth_midas``, ``normal_midas`` (``midas/dpt_hybrid-midas-501f0c75.pt``);
* OpenPose: ``openpose`` (``openpose/body_pose_model.pth``), ``openpose_hand`` (+ ``hand_pose_model.pth``),
  ``openpose_face`` and ``openpose_faceonly`` (+ ``facenet.pth``), ``openpose_full`` (all three);
* ``lineart_realistic`` (``lineart/sk_model.pth``), ``lineart_coarse`` (``lineart/sk_model2.pth``),
  ``lineart_anime`` (``lineart_anime/netG.pth``), ``normal_bae`` (``normal_bae/scannet.pt``), ``mlsd``
  (``mlsd/mlsd_large_512_fp32.pth``), and PiDiNet's ``softedge_pidinet``, ``softedge_pidisafe``,
  ``scribble_pidinet``, ``t2ia_sketch_pidi`` (``pidinet/table5_pidinet.pth``);

the non-HED networks through controlnet-aux's classes, loaded from these files only. Not yet: DWPose and animal
pose (ONNX), LeReS, ZoeDepth, Depth Anything, TEED/Anyline, segmentation, ``lineart_anime_denoise``, ``normal_dsine``,
LaMa, MobileSAM, mediapipe, and the CLIP/insightface embeddings.
"""

from __future__ import annotations

from pathlib import Path

from shared.controlnet.models import ANNOTATORS_DIR, CONTROLNET_DIR
from shared.controlnet.preprocessors import Preprocessor

__all__ = ["WORKER_ANNOTATORS", "annotator_available", "annotators_dir", "weight_file"]

WORKER_ANNOTATORS = frozenset({
    "hed", "hed_safe", "scribble_hed",
    "depth", "normal_map",
    "openpose", "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full",
    "lineart", "lineart_coarse", "lineart_anime",
    "normal_bae",
    "mlsd",
    "pidinet", "pidinet_safe", "pidinet_scribble", "pidinet_sketch",
})


def annotators_dir(models_dir: Path) -> Path:
    return Path(models_dir) / CONTROLNET_DIR / ANNOTATORS_DIR


def weight_file(models_dir: Path, relative: str) -> Path | None:
    """The installed file for an annotator weight (``hed/ControlNetHED.pth``): its ``.safetensors`` twin first."""
    path = annotators_dir(models_dir) / relative
    for candidate in (path.with_suffix(".safetensors"), path):
        if candidate.is_file():
            return candidate
    return None


def annotator_available(module: Preprocessor, models_dir: Path) -> bool:
    return (module.runnable and module.name in WORKER_ANNOTATORS and bool(module.weight_files)
            and all(weight_file(models_dir, name) is not None for name in module.weight_files))
