"""Builders of tiny random-weight models in the real file formats (no weights can be downloaded here).

``DEMO_BUILDERS`` are the modules `make up` and the tests' models folder run, in order, each as
``python -m <module> <models_dir>``."""

DEMO_BUILDERS: tuple[str, ...] = (
    "devtools.demo_models.sd15",
    "devtools.demo_models.controlnet",
    "devtools.demo_models.upscalers",
)
