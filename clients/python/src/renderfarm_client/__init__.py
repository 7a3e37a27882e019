"""A client for the renderfarm Stable Diffusion farm: submit, wait (SSE, or long-polls), download, cancel.

>>> from renderfarm_client import Client
>>> with Client("http://127.0.0.1:7861", api_key) as farm:            # doctest: +SKIP
...     job = farm.generate("a lighthouse at dusk", steps=20, seed=1)
...     farm.download_images(job, "out/")
"""

from renderfarm_client._async import AsyncClient
from renderfarm_client._http import RetryPolicy
from renderfarm_client._sync import Client
from renderfarm_client.errors import (
    ApiError,
    AuthenticationError,
    ClientError,
    Conflict,
    FarmUnreachable,
    JobFailed,
    NotFound,
    RateLimited,
    RenderfarmError,
    ServerError,
    ValidationError,
    WaitTimeout,
    WebhookVerificationFailed,
)
from renderfarm_client.models import (
    BuiltPrompt,
    Job,
    JobError,
    JobImage,
    JobPage,
    Model,
    ModelFile,
    StoredModel,
    Upload,
)
from renderfarm_client.pnginfo import read_png_text
from renderfarm_client.webhooks import verify_webhook

__all__ = [
    "ApiError", "AsyncClient", "AuthenticationError", "BuiltPrompt", "Client", "ClientError", "Conflict",
    "FarmUnreachable", "Job", "JobError", "JobFailed", "JobImage", "JobPage", "Model", "ModelFile", "NotFound",
    "RateLimited", "RenderfarmError", "RetryPolicy", "ServerError", "StoredModel", "Upload", "ValidationError",
    "WaitTimeout",
    "WebhookVerificationFailed", "read_png_text", "verify_webhook",
]
