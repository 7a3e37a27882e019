"""What a user picks from the prompt dictionary: the body of ``POST /v1/prompts/build`` and a job's
``prompt_builder``.

The shapes are loose on purpose (a single-choice key also takes a list): two hair lengths must come back
as the notes' rule ("exactly one hair length"), not as a type error, so the rules live in the builder.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MAX_BUILDER_SEED", "BlendChoice", "Choices", "OutfitChoice", "PromptBuilderRequest"]

MAX_BUILDER_SEED = 2**32 - 1
_TEXT = Field(max_length=500)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True, serialize_by_alias=True)


class OutfitChoice(_Strict):
    name: str = Field(max_length=500, description="an outfit of the dictionary, or 'random'")
    color: str | None = Field(None, max_length=100, description="a colour of the list, 'random', or null: no colour")


class BlendChoice(_Strict):
    """The WebUI's prompt editing ``[from:to:when]``: ``from`` until ``when`` of the steps, then ``to``."""

    from_: str = Field(alias="from", max_length=500)
    to: str = _TEXT
    when: float = Field(description="in (0, 1): the fraction of the steps after which 'from' becomes 'to'")


SingleChoice = str | list[str] | None


class Choices(_Strict):
    """A user's picks, by the dictionary's English prompt text (``GET /v1/prompt-dictionary``)."""

    preset: str | None = Field(None, max_length=100, description="a quality preset id (portrait, background)")
    character: str | None = Field(None, max_length=100, description="a character preset id (ahri, ...)")
    hair_length: SingleChoice = Field(None, description="exactly one (without a character or background preset)")
    hair_style: SingleChoice = Field(None, description="at most one")
    hair_colors: list[str] | str | None = Field(None, description="one, or two for two-tone hair; default: random")
    eye_color: SingleChoice = Field(None, description="one colour, 'random', or null: 'random color eyes'")
    expression: SingleChoice = Field(None, description="at most one")
    traits: list[str] = Field(default_factory=list, max_length=50)
    outfit: OutfitChoice | None = None
    props: list[str] = Field(default_factory=list, max_length=50)
    blend: BlendChoice | None = None


class PromptBuilderRequest(_Strict):
    """Choices and the seed their ``random`` picks are drawn from (null or -1: a new seed, returned)."""

    choices: Choices = Field(default_factory=Choices)
    seed: int | None = Field(None, ge=-1, le=MAX_BUILDER_SEED,
                             description="seeds the random picks; the same choices and seed build the same prompt")
