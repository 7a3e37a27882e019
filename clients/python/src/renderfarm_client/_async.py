"""The asynchronous client: `Client` (_sync.py) line for line, with ``await``; both share the requests
(_operations), the retry decisions (_http) and the waiting state (_watch)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Unpack

import httpx

from renderfarm_client import _operations as ops
from renderfarm_client._http import (
    DEFAULT_TIMEOUT,
    Call,
    RequestSpec,
    RetryPolicy,
    build_request,
    delay_or_raise,
    delay_or_unreachable,
    error_for,
)
from renderfarm_client._settings import resolve_api_key, resolve_url
from renderfarm_client._watch import JobWatch, ProgressCallback, SseDecoder, StreamVerdict
from renderfarm_client.models import BuiltPrompt, Job, JobImage, JobPage, Model, ModelFile, StoredModel, Upload
from renderfarm_client.webhooks import verify_webhook

T = TypeVar("T")


class AsyncClient:
    """A farm's API with one key. ``url`` and ``api_key`` default to RENDERFARM_URL and RENDERFARM_API_KEY.

    Every ``submit`` carries a fresh Idempotency-Key unless ``idempotency=False``, so a retried submit never
    makes a second job. 429, 5xx and connection errors are retried as ``retry`` says (exponential backoff with
    jitter, the farm's Retry-After honoured)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, idempotency: bool = True, poll_wait: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = resolve_url(url)
        self.api_key = resolve_api_key(api_key)
        self.retry = retry or RetryPolicy()
        self.idempotency = idempotency
        self.poll_wait = poll_wait
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport, follow_redirects=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- jobs

    async def submit(self, prompt: str | None = None, *, idempotency_key: str | None = None,
               extra_fields: Mapping[str, Any] | None = None, **fields: Unpack[ops.JobFields]) -> Job:
        """POST /v1/jobs (txt2img; img2img with ``init_images``). ``prompt_builder`` choices may stand for the
        prompt. Returns the queued job."""
        key = idempotency_key or (ops.new_idempotency_key() if self.idempotency else None)
        return await self._call(ops.submit(prompt, {**fields, **(extra_fields or {})}, key))

    async def get(self, job_id: str) -> Job:
        return await self._call(ops.get_job(job_id))

    async def jobs(self, *, status: str | None = None, limit: int = 20, offset: int = 0) -> JobPage:
        """This key's owner's jobs, newest first."""
        return await self._call(ops.list_jobs(status, limit, offset))

    async def cancel(self, job_id: str) -> Job:
        return await self._call(ops.cancel(job_id))

    async def wait(self, job_id: str, *, on_progress: ProgressCallback | None = None, timeout: float | None = None,
             use_sse: bool = True) -> Job:
        """The job once it is succeeded, failed or canceled (check ``job.status`` or ``raise_for_status()``).
        ``on_progress(job)`` is called on every change. WaitTimeout after ``timeout`` seconds."""
        watch = JobWatch(job_id, on_progress, timeout, self.poll_wait)
        job, watch.etag = await self._call(ops.get_job_tagged(job_id))
        if watch.see(job) or (use_sse and await self._follow_events(watch)):
            return watch.job or job
        return await self._long_poll(watch)

    async def generate(self, prompt: str | None = None, *, on_progress: ProgressCallback | None = None,
                 timeout: float | None = None, **fields: Unpack[ops.JobFields]) -> Job:
        """Submit and wait: the finished job."""
        return await self.wait((await self.submit(prompt, **fields)).id, on_progress=on_progress, timeout=timeout)

    # -- images

    async def download(self, image: JobImage | str) -> bytes:
        return await self._call(ops.download(image.url if isinstance(image, JobImage) else image))

    async def download_images(self, job: Job | str, directory: str | os.PathLike[str]) -> list[Path]:
        """Every image of the job written to ``directory`` as ``<job id>-<index>.<ext>``."""
        job = job if isinstance(job, Job) else await self.get(job)
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for image in job.images:
            path = folder / ops.image_filename(job.id, image.index, image.url)
            path.write_bytes(await self.download(image))
            paths.append(path)
        return paths

    async def upload(self, image: bytes | os.PathLike[str], filename: str | None = None) -> Upload:
        """Store an init image or mask once; use the returned ``ref`` in ``init_images``/``mask``."""
        return await self._call(ops.upload(image, filename))

    async def add_model(self, path: str | os.PathLike[str], kind: str, name: str | None = None, *,
                        chunk_bytes: int = ops.MODEL_CHUNK_BYTES) -> StoredModel:
        """Add a model file to the farm's shared store, in resumable chunks (see ``Client.add_model``)."""
        file = Path(path)
        size = file.stat().st_size
        upload_id, offset = await self._call(ops.begin_model_upload(kind, name or file.name, size))
        while True:
            chunk = ops.read_chunk(file, offset, chunk_bytes)
            offset, stored = await self._call(ops.send_model_chunk(upload_id, offset, chunk))
            if stored is not None:
                return stored

    # -- catalog, prompts, webhooks

    async def models(self) -> list[Model]:
        return await self._call(ops.list_models())

    async def loras(self) -> list[ModelFile]:
        return await self._call(ops.list_loras())

    async def build_prompt(self, choices: Mapping[str, Any], seed: int | None = None) -> BuiltPrompt:
        """The prompt dictionary: choices (``hair_length``, ``hair_colors``, ``outfit``, ...) to a prompt."""
        return await self._call(ops.build_prompt(choices, seed))

    async def webhook_secret(self) -> str:
        """This key's Standard Webhooks signing secret (``whsec_...``)."""
        return await self._call(ops.webhook_secret())

    verify_webhook = staticmethod(verify_webhook)

    # -- transport

    async def _call(self, call: Call[T]) -> T:
        return call.parse(await self._send(call.spec))

    async def _send(self, spec: RequestSpec) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.send(build_request(self._http, spec, self.api_key))
            except httpx.TransportError as exc:
                delay = delay_or_unreachable(self.retry, spec, attempt, exc, self.url)
            else:
                if response.status_code in spec.ok_statuses:
                    return response
                delay = delay_or_raise(self.retry, spec, attempt, response)
            await asyncio.sleep(delay)
            attempt += 1

    async def _follow_events(self, watch: JobWatch) -> bool:
        """True when the stream brought the job to its end; False: long-poll instead."""
        spec = ops.job_events(watch.job_id, None, watch.stream_read_timeout())
        try:
            response = await self._http.send(build_request(self._http, spec, self.api_key), stream=True)
            try:
                verdict = watch.verdict(response)
                if verdict is StreamVerdict.FAIL:
                    await response.aread()
                    raise error_for(response)
                if verdict is StreamVerdict.POLL:
                    return False
                decoder = SseDecoder()
                async for line in response.aiter_lines():
                    job = watch.job_from(decoder.feed(line))
                    if job is not None and watch.see(job):
                        return True
                    watch.check_deadline()
            finally:
                await response.aclose()
        except httpx.TransportError:
            pass  # a dropped or timed-out stream: polling picks up from the last ETag
        return False

    async def _long_poll(self, watch: JobWatch) -> Job:
        while True:
            wait = watch.next_poll_wait()
            started = time.monotonic()
            job, watch.etag = await self._call(ops.poll_job(watch.job_id, wait, watch.etag))
            if job is not None and watch.see(job):
                return job
            changed = job is not None and watch.last_changed
            await asyncio.sleep(watch.pause_after_poll(changed, wait, time.monotonic() - started))
