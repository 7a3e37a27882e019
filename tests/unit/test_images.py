"""Input images are checked on their header before a pixel is decoded, and stored only when all passed."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from api.submission.images import (
    checked_png,
    decode_base64_image,
    decode_image,
    for_init_image,
    for_mask,
    probe_image,
    read_generation_info,
)
from api.submission.inputs import stage_inputs
from api.submission.uploads import read_upload, save_upload
from shared.errors import FieldError
from shared.settings import LimitSettings, Settings
from shared.storage.local import LocalObjectStore

FIELD = ("body", "init_images", 0)
LIMIT = 1024 * 1024


def png_bytes(size: tuple[int, int] = (16, 8), mode: str = "RGB", color: object = (200, 10, 10),
              text: str | None = None) -> bytes:
    info = None
    if text is not None:
        info = PngInfo()
        info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A well-formed ~70-byte PNG whose header claims width x height pixels: a decompression bomb."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def rejected(data: bytes, max_pixels: int = LIMIT) -> str:
    with pytest.raises(FieldError) as info:
        decode_image(data, FIELD, max_pixels)
    assert info.value.field == FIELD
    return info.value.message


# --- base64 --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,", "DATA:image/webp;base64,"])
def test_base64_with_or_without_data_prefix(prefix: str) -> None:
    data = png_bytes()
    assert decode_base64_image(prefix + b64(data), FIELD, 10_000) == data


def test_wrapped_and_unpadded_base64_is_read() -> None:
    data = png_bytes()
    text = b64(data).rstrip("=")
    assert decode_base64_image("\n".join(text[i:i + 76] for i in range(0, len(text), 76)), FIELD, 10_000) == data


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"), ("not base64 at all!", "not valid base64"), ("data:text/plain;base64,aGk=", "data URLs of images"),
    ("A" * 2000, "larger than the limit of 1000 bytes"),
])
def test_bad_base64_names_the_field(text: str, message: str) -> None:
    with pytest.raises(FieldError) as info:
        decode_base64_image(text, FIELD, 1000)
    assert info.value.field == FIELD and message in info.value.message


# --- header checks -------------------------------------------------------------------------------------

def test_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = png_header_claiming(30000, 30000)
    assert len(bomb) < 100
    message = rejected(bomb)
    assert "decompression bomb" in message


def test_bomb_is_refused_even_if_pillows_global_limit_was_lifted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    message = rejected(png_header_claiming(30000, 30000))
    assert "30000x30000" in message and "over the limit" in message and "decompression bomb" in message


def test_image_over_the_pixel_limit() -> None:
    message = rejected(png_bytes((300, 300)), max_pixels=256 * 256)
    assert "300x300 = 90000 pixels, over the limit of 65536" in message


def test_probe_reads_the_header_only() -> None:
    header = probe_image(png_header_claiming(640, 480), FIELD, LIMIT)
    assert (header.format, header.width, header.height) == ("PNG", 640, 480)
    assert "corrupt image data" in rejected(png_header_claiming(640, 480))  # 16 bytes cannot fill 640x480


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty"),
    (b"GIF89a" + b"\0" * 3, "not a readable image"),  # a truncated header
    (b"hello, this is not an image", "not a readable image"),
    (b"%PDF-1.4 not an accepted format", "not a readable image"),
])
def test_unreadable_files(data: bytes, message: str) -> None:
    assert message in rejected(data)


def test_truncated_image_is_corrupt() -> None:
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, format="PNG")
    assert "corrupt image data" in rejected(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_tiff_is_not_accepted() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="TIFF")
    assert "accepted formats: PNG, JPEG, WEBP" in rejected(buffer.getvalue())


# --- conversions ------------------------------------------------------------------------------------------

def test_init_images_flatten_transparency_onto_white() -> None:
    image = decode_image(png_bytes(mode="RGBA", color=(0, 0, 0, 0)), FIELD, LIMIT)
    assert for_init_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_mask_uses_alpha_when_transparent_like_the_webui() -> None:
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 200))
    rgba.putpixel((1, 0), (0, 0, 0, 100))
    assert for_mask(rgba).tobytes() == bytes([255, 0, 0, 0])
    assert for_mask(Image.new("RGB", (2, 1), (255, 255, 255))).tobytes() == bytes([255, 255])


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), FIELD, LIMIT).size == (20, 40)


def test_reencoded_png_carries_no_metadata() -> None:
    checked = checked_png(decode_image(png_bytes(text="secret prompt"), FIELD, LIMIT))
    assert "parameters" not in Image.open(io.BytesIO(checked.png)).info
    assert (checked.width, checked.height) == (16, 8)


# --- generation info (png-info) -------------------------------------------------------------------------

INFOTEXT = "a lighthouse\nNegative prompt: fog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 16x8"


def test_png_parameters_chunk() -> None:
    info, items = read_generation_info(png_bytes(text=INFOTEXT), FIELD, LIMIT)
    assert info == INFOTEXT and "parameters" not in items


def user_comment_jpeg(payload: bytes, fmt: str = "JPEG") -> bytes:
    image = Image.new("RGB", (16, 8))
    exif = image.getexif()
    exif.get_ifd(0x8769)[0x9286] = payload
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("payload", [
    b"UNICODE\0" + INFOTEXT.encode("utf-16-be"),  # what the WebUI (piexif) writes
    b"UNICODE\0" + INFOTEXT.encode("utf-16-le"),
    b"ASCII\0\0\0" + INFOTEXT.encode(),
])
@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment(payload: bytes, fmt: str) -> None:
    info, items = read_generation_info(user_comment_jpeg(payload, fmt), FIELD, LIMIT)
    assert info == INFOTEXT and items["exif comment"] == INFOTEXT
    assert "exif" not in items


def test_image_without_info() -> None:
    assert read_generation_info(png_bytes(), FIELD, LIMIT) == ("", {})


# --- staging a job's inputs, and uploads --------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:1", b"secret")


def stored_keys(store: LocalObjectStore) -> set[str]:
    return {p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()}


SETTINGS = Settings(limits=LimitSettings(max_input_pixels=LIMIT, max_upload_bytes=1_000_000))


def test_staged_inputs_are_written_only_on_request(store: LocalObjectStore) -> None:
    staged = stage_inputs([b64(png_bytes()), "data:image/png;base64," + b64(png_bytes((8, 8)))],
                          b64(png_bytes(mode="L", color=255)), owner="ann", store=store, settings=SETTINGS)
    prefix = staged.init_keys[0].rsplit("/", 1)[0]
    assert staged.init_keys == [f"{prefix}/init_0.png", f"{prefix}/init_1.png"]
    assert staged.mask_key == f"{prefix}/mask.png" and prefix.startswith("inputs/")
    assert stored_keys(store) == set()
    staged.write(store)
    assert stored_keys(store) == {*staged.init_keys, staged.mask_key}
    assert Image.open(io.BytesIO(store.get(staged.mask_key))).mode == "L"
    staged.discard(store)
    assert stored_keys(store) == set()


def test_one_bad_image_stages_nothing(store: LocalObjectStore) -> None:
    with pytest.raises(FieldError) as info:
        stage_inputs([b64(png_bytes()), b64(png_header_claiming(30000, 30000))], None, owner="ann", store=store,
                     settings=SETTINGS)
    assert info.value.field == ("body", "init_images", 1)
    with pytest.raises(FieldError) as info:
        stage_inputs([b64(png_bytes())], "bm90IGFuIGltYWdl", owner="ann", store=store, settings=SETTINGS)
    assert info.value.field == ("body", "mask")
    assert stored_keys(store) == set()


def test_uploads_are_owner_scoped(store: LocalObjectStore) -> None:
    upload = save_upload(store, "ann", checked_png(decode_image(png_bytes(), FIELD, LIMIT)))
    assert upload.ref == f"upload:{upload.id}" and (upload.width, upload.height) == (16, 8)
    assert Image.open(io.BytesIO(read_upload(store, "ann", upload.ref, FIELD))).size == (16, 8)
    staged = stage_inputs([upload.ref], None, owner="ann", store=store, settings=SETTINGS)
    assert list(staged.blobs) == staged.init_keys
    for owner, ref in (("bob", upload.ref), ("ann", "upload:" + "f" * 32), ("ann", "upload:../jobs/x")):
        with pytest.raises(FieldError) as info:
            read_upload(store, owner, ref, FIELD)
        assert info.value.field == FIELD and "unknown upload" in info.value.message
