"""A job's ``prompt_builder``: the prompt dictionary's choices turned into the job's prompt, before any other check.

What the WebUI user expects, as with a style or a pasted character card:

- the built prompt is the job's prompt; a ``prompt`` sent with it follows on its own last line (the issue's
  "instead of (or before) a prompt");
- the built negative prompt is used unless the request sends a non-empty ``negative_prompt``;
- a character's infotext settings (steps, sampler and schedule type, CFG scale, size, seed) fill only the fields
  the request leaves unset (sampler and schedule type, and width and height, as pairs); its checkpoint is used
  when this farm has it installed (by name, else by hash) and the request names no model, as the WebUI's paste
  leaves the checkpoint alone when it has no such file;
- an ``infotext`` with a builder is refused: both would decide the prompt.

The resolved choices and seed replace what was sent, so the job's params record a build that repeats exactly.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from shared.errors import FieldError
from shared.jobs.schemas import Txt2ImgRequest
from shared.models.files import find_infotext_checkpoint
from shared.prompt_dictionary.builder import build_prompt
from shared.prompt_dictionary.choices import PromptBuilderRequest
from shared.prompt_dictionary.vocabulary import CharacterSettings, PromptDictionaryError, load_prompt_dictionary
from shared.settings import Settings
from shared.webui.hashes import HashCache

__all__ = ["apply_prompt_builder"]

_FIELD = ("body", "prompt_builder")
# Fields a character's settings fill together or not at all: half a pair would mix two setups.
_PAIRS = (("steps",), ("sampler_name", "scheduler"), ("cfg_scale",), ("width", "height"), ("seed",))


def _character_fields(character: CharacterSettings, req: Txt2ImgRequest, settings: Settings) -> dict[str, Any]:
    values = character.model_dump()
    given = req.model_fields_set
    fields = {name: values[name] for pair in _PAIRS if not given.intersection(pair) for name in pair}
    if "model" not in given and "sd_model_checkpoint" not in (req.override_settings or {}):
        models_dir = settings.models.models_dir
        installed = find_infotext_checkpoint(models_dir, character.model, character.model_hash,
                                             HashCache.of_models_dir(models_dir))
        if installed is not None:
            fields["model"] = installed
    return fields


def apply_prompt_builder(req: Txt2ImgRequest, settings: Settings) -> Txt2ImgRequest:
    """``req`` with its built prompt (see the module's rules); unchanged without a ``prompt_builder``. Raises
    FieldError at ``body.prompt_builder.choices.<key>`` for a broken rule."""
    if req.prompt_builder is None:
        return req
    if req.infotext and req.infotext.strip():
        raise FieldError(_FIELD, "send a prompt_builder or an infotext, not both: each decides the prompt")
    try:
        dictionary = load_prompt_dictionary(settings)
    except PromptDictionaryError as exc:
        raise FieldError(_FIELD, f"the farm's prompt dictionary is broken: {exc}", status_code=500) from exc
    built = build_prompt(dictionary, req.prompt_builder.choices, req.prompt_builder.seed, field=(*_FIELD, "choices"))
    update: dict[str, Any] = {
        "prompt": "\n".join(part for part in (built.prompt, req.prompt.strip()) if part),
        "prompt_builder": PromptBuilderRequest(choices=built.choices, seed=built.seed).model_dump(mode="json"),
    }
    if not req.negative_prompt.strip():
        update["negative_prompt"] = built.negative_prompt
    if built.settings is not None:
        update.update(_character_fields(built.settings, req, settings))
    try:
        return Txt2ImgRequest.model_validate({**req.model_dump(exclude_unset=True), **update})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise FieldError(("body", *error["loc"]), f"with the built prompt: {error['msg']}") from exc
