"""Training datasets over HTTP (issue 15): a zip or loose files of images and captions, checked before anything is
unpacked or stored; every refusal a 422 naming the entry, leaving nothing behind. The API runs in process against
real PostgreSQL, Redis and the local object store."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from api.submission.datasets import DatasetLimits, read_zip
from shared.errors import FieldError
from tests.conftest import make_key
from tests.farm_harness import Farm


def png(color: str, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


def zipped(entries: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def stored(farm: Farm) -> list[str]:
    root = Path(farm.env["STORAGE_URL"]) / "datasets"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_a_zip_of_images_and_captions_is_stored_listed_and_deleted(api_only: Farm) -> None:
    key = make_key(api_only.env["DATABASE_URL"], "trainer")
    body = zipped({"ahri/1.png": png("red"), "ahri/1.txt": b"ahri, fox ears, smile\n",
                   "ahri/2.jpg": _jpeg(), "ahri/3.png": png("blue"), "__MACOSX/ahri/._1.png": b"junk",
                   "ahri/.DS_Store": b"junk"})
    with api_only.client(key) as client:
        resp = client.post("/v1/datasets", files={"file": ("ahri.zip", body, "application/zip")})
        assert resp.status_code == 201, resp.text
        dataset = resp.json()
        assert dataset["name"] == "ahri" and dataset["image_count"] == 3
        assert [(i["file"], i["caption"]) for i in dataset["items"]] == [
            ("ahri/1.png", "ahri, fox ears, smile"), ("ahri/2.jpg", None), ("ahri/3.png", None)]
        assert len([p for p in stored(api_only) if p.startswith(dataset["id"])]) == 3
        listed = client.get("/v1/datasets").json()
        assert listed["total"] == 1 and listed["datasets"][0]["id"] == dataset["id"]
        assert client.get(f"/v1/datasets/{dataset['id']}").json()["items"][0]["width"] == 32
        with api_only.client(make_key(api_only.env["DATABASE_URL"], "stranger")) as stranger:
            assert stranger.get(f"/v1/datasets/{dataset['id']}").status_code == 404
            assert stranger.get("/v1/datasets").json()["total"] == 0
        loose = client.post("/v1/datasets", data={"name": "loose"},
                            files=[("file", ("a.png", png("green"), "image/png")),
                                   ("file", ("a.txt", b"a green square", "text/plain")),
                                   ("file", ("b.webp", _webp(), "image/webp"))])
        assert loose.status_code == 201, loose.text
        assert [(i["file"], i["caption"]) for i in loose.json()["items"]] == [("a.png", "a green square"),
                                                                              ("b.webp", None)]
        assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
        assert not [p for p in stored(api_only) if p.startswith(dataset["id"])]


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buffer, "JPEG")
    return buffer.getvalue()


def _webp() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "yellow").save(buffer, "WEBP")
    return buffer.getvalue()


BOMB = b"\0" * (64 * 1024 * 1024)  # deflates to about 64 KB: a 1000x ratio


@pytest.mark.parametrize(("entries", "links", "entry", "said"), [
    ({"ok.png": png("red"), "../evil.png": png("red")}, (), "../evil.png", "relative path"),
    ({"/etc/evil.png": png("red")}, (), "/etc/evil.png", "relative path"),
    ({"ok.png": png("red"), "notes.pdf": b"%PDF-1.4"}, (), "notes.pdf", "neither an image"),
    ({"ok.png": png("red"), "bomb.png": BOMB}, (), "bomb.png", "zip bomb"),
    ({"ok.png": png("red"), "fake.png": b"this is text, not a PNG"}, (), "fake.png", "not a readable image"),
    ({"ok.png": png("red"), "lonely.txt": b"a caption"}, (), "lonely.txt", "no image of the same name"),
    ({"ok.png": png("red"), "link.png": b"/etc/passwd"}, ("link.png",), "link.png", "symbolic link"),
    ({"ok.png": png("red"), "ok.jpg": _jpeg()}, (), "ok.jpg", "same name"),
    ({"ok.png": png("red"), "ok.txt": b"\xff\xfe not utf-8 \xff"}, (), "ok.txt", "UTF-8"),
])
def test_a_bad_entry_is_a_422_naming_it_and_nothing_is_stored(api_only: Farm, entries: dict[str, bytes],
                                                              links: tuple[str, ...], entry: str, said: str) -> None:
    before = stored(api_only)
    key = make_key(api_only.env["DATABASE_URL"], "careless")
    with api_only.client(key) as client:
        resp = client.post("/v1/datasets", files={"file": ("set.zip", zipped(entries, links), "application/zip")})
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"][0]
        assert detail["loc"] == ["body", "file", entry] and said in detail["msg"], detail
        assert client.get("/v1/datasets").json()["total"] == 0
    assert stored(api_only) == before


def test_requests_that_are_not_datasets_are_refused(api_only: Farm) -> None:
    key = make_key(api_only.env["DATABASE_URL"], "confused")
    with api_only.client(key) as client:
        assert client.post("/v1/datasets", json={"file": "x"}).status_code == 415
        resp = client.post("/v1/datasets", files={"file": ("set.zip", b"not a zip at all", "application/zip")})
        assert resp.status_code == 422 and "zip" in resp.json()["detail"][0]["msg"]
        resp = client.post("/v1/datasets", files={"file": ("empty.zip", zipped({"a/": b""}), "application/zip")})
        assert resp.status_code == 422 and "no image" in resp.json()["detail"][0]["msg"]


def test_the_limits_on_images_and_unpacked_size_hold_before_anything_is_decoded() -> None:
    images = {f"{i}.png": png("red") for i in range(5)}
    with pytest.raises(FieldError, match="over the limit of 4"):
        read_zip(io.BytesIO(zipped(images)), DatasetLimits(4, 10**9, 100, 10**7))
    with pytest.raises(FieldError, match="unpacks to more than") as raised:
        read_zip(io.BytesIO(zipped(images)), DatasetLimits(100, 3 * len(png("red")) + 10, 100, 10**7))
    assert raised.value.field == ("body", "file", "3.png")
    with pytest.raises(FieldError, match="over the limit of 100"):
        read_zip(io.BytesIO(zipped({"big.png": png("red", 64)})), DatasetLimits(10, 10**9, 100, 100))
