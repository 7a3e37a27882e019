"""Named prompt styles in the WebUI's ``styles.csv`` format, applied the way the WebUI applies them.

Users keep their presets as WebUI style files (``name,prompt,negative_prompt``, with an optional
``{prompt}`` placeholder), so we read that format unchanged and merge exactly like
``modules/styles.py``: a style with ``{prompt}`` wraps the prompt, one without is appended after a
comma, and styles apply in the order given. The farm ships the presets our users rely on in
``shared/webui/assets/styles.csv``; a user file (``RENDERFARM_STYLES_FILE``, else ``models/styles.csv``)
adds styles and replaces shipped ones of the same name.

>>> merge_prompts("{prompt}, masterpiece", "a cat")
'a cat, masterpiece'
>>> merge_prompts("masterpiece", "a cat")
'a cat, masterpiece'
>>> merge_prompts("masterpiece", "  ")
'masterpiece'
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from shared.errors import FieldError
from shared.file_cache import FileVersionCache
from shared.settings import Settings

__all__ = ["BUILTIN_STYLES_FILE", "PromptStyle", "StyleBook", "load_style_book", "merge_prompts", "read_styles_csv"]

log = logging.getLogger(__name__)
BUILTIN_STYLES_FILE = Path(__file__).resolve().parent / "assets" / "styles.csv"


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str
    negative_prompt: str


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """One style applied to one prompt (the WebUI's ``merge_prompts``)."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def read_styles_csv(path: Path) -> dict[str, PromptStyle]:
    """Styles from a WebUI style file; the old ``name,text`` column layout is read too, like the WebUI."""
    styles: dict[str, PromptStyle] = {}
    with open(path, encoding="utf-8-sig", newline="") as file:
        for row in csv.DictReader(file, skipinitialspace=True):
            name = (row.get("name") or "").strip()
            if not name:
                continue
            prompt = row.get("prompt") if "prompt" in row else row.get("text")
            styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "")
    return styles


class StyleBook:
    """The styles a job may name, and how to apply them."""

    def __init__(self, styles: dict[str, PromptStyle]) -> None:
        self.styles = dict(styles)

    def names(self) -> list[str]:
        return list(self.styles)

    def check(self, names: list[str], field: tuple[str | int, ...] = ("body", "styles")) -> list[PromptStyle]:
        """The styles named, in order; an unknown name is a FieldError listing the known ones."""
        found = []
        for index, name in enumerate(names):
            style = self.styles.get(name)
            if style is None:
                known = ", ".join(self.styles) or "none"
                raise FieldError((*field, index), f"unknown style {name!r}; known styles: {known}")
            found.append(style)
        return found

    def apply(self, prompt: str, negative_prompt: str, names: list[str]) -> tuple[str, str]:
        """The prompt and negative prompt with every named style merged in, as the WebUI does."""
        for style in self.check(names):
            prompt = merge_prompts(style.prompt, prompt)
            negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt


_STYLE_FILES: FileVersionCache[dict[str, PromptStyle]] = FileVersionCache(read_styles_csv)


def _read_cached(path: Path) -> dict[str, PromptStyle]:
    """Re-read a style file only when it changed, so editing it needs no restart and costs nothing per job."""
    return _STYLE_FILES.get(path)


def user_styles_file(settings: Settings) -> Path | None:
    """The user's style file; a configured file that is missing is logged, not fatal, like the WebUI."""
    if settings.models.styles_file is not None:
        if settings.models.styles_file.is_file():
            return settings.models.styles_file
        log.warning("RENDERFARM_STYLES_FILE %s does not exist; only the shipped styles are available",
                    settings.models.styles_file)
        return None
    path = settings.models.models_dir / "styles.csv"
    return path if path.is_file() else None


def load_style_book(settings: Settings) -> StyleBook:
    """Shipped presets, then the user's file on top (same name: the user's style wins)."""
    styles = dict(_read_cached(BUILTIN_STYLES_FILE))
    user_file = user_styles_file(settings)
    if user_file is not None:
        styles.update(_read_cached(user_file.resolve()))
    return StyleBook(styles)
