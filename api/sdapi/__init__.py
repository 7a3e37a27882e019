"""The WebUI's HTTP API (``/sdapi/v1``) on top of the farm: request mapping, ``info``, per-key options.

Nothing here renders: a WebUI request becomes an ordinary farm job (same validation, same row,
same queue), so the WebUI API is one more client of the job system, not a second one.
"""
