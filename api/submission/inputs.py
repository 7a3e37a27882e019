"""A job's input images: checked in memory first, written to the object store only when all passed.

The order matters for docs/architecture.md, rule 8 (bad input leaves nothing behind): every init image and the mask
are read (base64 or ``upload:<id>``), checked and re-encoded before a single byte is stored, so a bad
second image leaves no orphaned first one. The keys are deterministic under a fresh id
(``inputs/<id>/init_<k>.png``, ``inputs/<id>/mask.png``): a worker finds them from the job's params,
and a submission whose database insert fails deletes exactly what it wrote.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from api.submission.images import (
    checked_png,
    decode_base64_image,
    decode_image,
    for_init_image,
    for_mask,
    for_upload,
)
from api.submission.uploads import is_upload_ref, read_upload
from shared.settings import Settings
from shared.storage.base import ObjectStore, StorageError

__all__ = ["StagedInputs", "read_image_value", "stage_inputs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedInputs:
    """Re-encoded PNGs by object-store key, not yet written."""

    init_keys: list[str] = field(default_factory=list)
    mask_key: str | None = None
    blobs: dict[str, bytes] = field(default_factory=dict)
    control_keys: list[tuple[str | None, str | None]] = field(default_factory=list)  # per unit: image, mask

    def write(self, store: ObjectStore) -> None:
        """Store every image; if one write fails, remove the ones already written before raising."""
        written: list[str] = []
        try:
            for key, data in self.blobs.items():
                store.put(key, data, "image/png")
                written.append(key)
        except BaseException:
            _delete(store, written)
            raise

    def discard(self, store: ObjectStore) -> None:
        """Undo :meth:`write` (the job row was not created)."""
        _delete(store, list(self.blobs))


def _delete(store: ObjectStore, keys: list[str]) -> None:
    for key in keys:
        try:
            store.delete(key)
        except StorageError:  # already answering an error; the orphan is logged for an operator
            log.exception("could not delete input %s of a job that was not created", key)


def read_image_value(value: str, field_loc: tuple[str | int, ...], owner: str, store: ObjectStore,
                     settings: Settings) -> bytes:
    """The encoded bytes an image field names: an upload of this owner, or base64 (data: prefix allowed)."""
    if is_upload_ref(value):
        return read_upload(store, owner, value, field_loc)
    return decode_base64_image(value, field_loc, settings.limits.max_upload_bytes)


def stage_inputs(init_images: list[str] | None, mask: str | None, *, owner: str, store: ObjectStore,
                 settings: Settings, controls: list[tuple[str | None, str | None]] | None = None) -> StagedInputs:
    """Check and re-encode every input image; raises FieldError naming the first bad one. ``controls``: each
    enabled ControlNet unit's image and mask values (kept with their transparency: the worker composites it onto
    white as the extension does)."""
    if not init_images and mask is None and not controls:
        return StagedInputs()
    prefix = f"inputs/{uuid.uuid4()}"
    blobs: dict[str, bytes] = {}
    init_keys = []
    for index, value in enumerate(init_images or []):
        loc = ("body", "init_images", index)
        image = decode_image(read_image_value(value, loc, owner, store, settings), loc,
                             settings.limits.max_input_pixels)
        key = f"{prefix}/init_{index}.png"
        blobs[key] = checked_png(for_init_image(image)).png
        init_keys.append(key)
    mask_key = None
    if mask is not None:
        mask_loc = ("body", "mask")
        image = decode_image(read_image_value(mask, mask_loc, owner, store, settings), mask_loc,
                             settings.limits.max_input_pixels)
        mask_key = f"{prefix}/mask.png"
        blobs[mask_key] = checked_png(for_mask(image)).png
    control_keys: list[tuple[str | None, str | None]] = []
    for index, (control, control_mask) in enumerate(controls or []):
        keys: list[str | None] = []
        for given, name, convert in ((control, "image", for_upload), (control_mask, "mask", for_mask)):
            if given is None:
                keys.append(None)
                continue
            unit_loc: tuple[str | int, ...] = ("body", "controlnet", index, name)
            image = decode_image(read_image_value(given, unit_loc, owner, store, settings), unit_loc,
                                 settings.limits.max_input_pixels)
            key = f"{prefix}/control_{index}_{name}.png"
            blobs[key] = checked_png(convert(image)).png
            keys.append(key)
        control_keys.append((keys[0], keys[1]))
    return StagedInputs(init_keys, mask_key, blobs, control_keys)
