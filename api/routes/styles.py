"""The prompt styles a job may name in ``styles`` (the WebUI's ``GET /sdapi/v1/prompt-styles``)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import CurrentKey, SettingsDep
from shared.webui.styles import load_style_book

router = APIRouter(prefix="/v1", tags=["styles"])


class StyleView(BaseModel):
    name: str
    prompt: str
    negative_prompt: str


@router.get("/styles", response_model=list[StyleView])
def list_styles(key: CurrentKey, settings: SettingsDep) -> list[StyleView]:
    book = load_style_book(settings)
    return [StyleView(name=s.name, prompt=s.prompt, negative_prompt=s.negative_prompt) for s in book.styles.values()]
