"""The client adds model files to the farm's shared store in resumable chunks (issue 19)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from renderfarm_client import AsyncClient, Client, Conflict
from safetensors.torch import save_file

from tests.farm_harness import Farm

pytestmark = pytest.mark.e2e  # drives a real farm (the tests/client modules mark themselves: no folder marker here)


class DropsOneAnswer(httpx.HTTPTransport):
    """Passes every request to the farm, but loses the farm's answer to the third chunk: the client cannot know
    whether the chunk landed (it did), sends it again, and must go on from the offset the farm gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks = 0
        self.dropped = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "PATCH":
            self.chunks += 1
            if self.chunks == 3 and not self.dropped:
                self.dropped = True
                response.read()
                raise httpx.ReadError("connection reset while reading the answer", request=request)
        return response


def _lora(path: Path, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, generator=generator),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, generator=generator)},
              str(path))
    return path


def test_a_model_file_goes_up_in_chunks_and_survives_a_lost_answer(farm: Farm, tmp_path: Path) -> None:
    name = f"client-{uuid.uuid4().hex[:8]}.safetensors"
    path = _lora(tmp_path / "style.safetensors", 1)
    transport = DropsOneAnswer()
    with Client(farm.base_url, farm.admin_key, transport=transport) as client:
        stored = client.add_model(path, "lora", name, chunk_bytes=256)
        try:
            assert transport.dropped and transport.chunks > 4
            assert stored.file == f"Lora/{name}" and stored.size == path.stat().st_size
            assert name.removesuffix(".safetensors") in [lora.name for lora in client.loras()]
            with pytest.raises(Conflict):  # other bytes under that name
                client.add_model(_lora(tmp_path / "other.safetensors", 2), "lora", name, chunk_bytes=4096)
        finally:
            with httpx.Client(base_url=farm.base_url, headers={"Authorization": f"Bearer {farm.admin_key}"}) as http:
                assert http.delete(f"/v1/models/files/{stored.id}").status_code == 204


def test_the_async_client_adds_a_model_too(farm: Farm, tmp_path: Path) -> None:
    name = f"client-async-{uuid.uuid4().hex[:8]}.safetensors"
    path = _lora(tmp_path / "async.safetensors", 3)

    async def add() -> int:
        async with AsyncClient(farm.base_url, farm.admin_key) as client:
            stored = await client.add_model(path, "lora", name, chunk_bytes=1000)
            assert stored.file == f"Lora/{name}" and stored.kind == "lora"
            return stored.id

    stored_id = asyncio.run(add())
    with httpx.Client(base_url=farm.base_url, headers={"Authorization": f"Bearer {farm.admin_key}"}) as http:
        assert http.delete(f"/v1/models/files/{stored_id}").status_code == 204
