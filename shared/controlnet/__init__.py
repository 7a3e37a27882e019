"""ControlNet as the WebUI's ControlNet extension (sd-webui-controlnet) defines it, torch-free.

``models`` (the model folders, titles and file detection), ``preprocessors`` and ``detectmap`` (the weight-free
preprocessors and the control image's resize, numpy and OpenCV), ``units`` (a unit as clients send it and as
the render contract stores it), ``infotext`` (units written into and read from infotexts). The worker's side
(loading, the denoising hook) is in ``worker/engine/controlnet*.py``.
"""
