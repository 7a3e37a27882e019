"""The generation engine: the only package that imports torch and diffusers.

It takes a typed `shared.jobs.contract.RenderSpec` and returns images. In diffusers' order: checkpoint
loading with bundled configs (`checkpoint_loader`, `ldm_layout`, `diffusers_folder`) kept warm under a
memory budget (`pipeline_cache`), prompt conditioning (`conditioning`, `sdxl_conditioning`,
`embeddings`, `lora`), noise and seeds (`noise`), samplers (`scheduling`), the denoising loop
(`denoise`, `img2img`, `hires`), decoding (`vae`), orchestrated by `engine.GenerationEngine`.
Everything here works with no model hub in reach.
"""

from worker.engine.checkpoint_loader import (
    UnsupportedCheckpointError,
    checkpoint_config_dir,
    detect_architecture,
    load_pipeline,
)

__all__ = [
    "UnsupportedCheckpointError",
    "checkpoint_config_dir",
    "detect_architecture",
    "load_pipeline",
]
