"""One image per request, sent as multipart form data or as JSON ``{"image": "<base64>"}``.

The upload and png-info routes take both shapes, as WebUI clients send either. The body is read
with a byte cap before anything parses it. Multipart is parsed here (RFC 7578: one delimiter
split, binary-safe) from a capped read: an image is small. Large files go through
:mod:`api.submission.multipart` (Starlette's parser, spooled to disk).
"""

from __future__ import annotations

import json
from email.message import Message

from fastapi import HTTPException, Request, status

from api.submission.images import decode_base64_image
from shared.errors import FieldError

__all__ = ["IMAGE_REQUEST_BODY", "read_image_request"]

FILE_FIELDS = ("file", "image")

# OpenAPI description of the two accepted bodies (the route reads the raw request).
IMAGE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"},
                                                            "image": {"type": "string", "format": "binary"}},
                           "anyOf": [{"required": ["file"]}, {"required": ["image"]}],
                           "description": "the image as the 'file' part ('image' is accepted too)"},
            },
            "application/json": {
                "schema": {"type": "object", "properties": {"image": {"type": "string",
                                                                      "description": "base64, data: prefix allowed"}},
                           "required": ["image"], "additionalProperties": False},
            },
        },
    }
}


async def _read_capped(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=f"the body is larger than {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=f"the body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _content_type(header: str) -> tuple[str, Message]:
    message = Message()
    message["content-type"] = header
    return message.get_content_type(), message


def _multipart_file(body: bytes, boundary: str) -> bytes:
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    for part in (b"\r\n" + body).split(delimiter)[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        head, separator, content = part.partition(b"\r\n\r\n")
        if not separator:
            continue
        headers = Message()
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip()] = value.strip()
        if headers.get_param("name", header="content-disposition") in FILE_FIELDS:
            return content
    raise FieldError(("body", "file"), "no 'file' part in the multipart form; send the image as the 'file' field")


async def read_image_request(request: Request, max_bytes: int) -> tuple[bytes, tuple[str, ...]]:
    """(encoded image bytes, the field they came from) of a multipart or JSON request."""
    kind, content_type = _content_type(request.headers.get("content-type", ""))
    # base64 grows 4/3; the JSON wrapper and multipart headers need a little more.
    body = await _read_capped(request, max_bytes * 4 // 3 + 64 * 1024)
    if kind == "multipart/form-data":
        boundary = content_type.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise FieldError(("header", "Content-Type"), "multipart/form-data needs a boundary parameter")
        data = _multipart_file(body, boundary)
        if len(data) > max_bytes:
            raise FieldError(("body", "file"), f"the image is larger than the limit of {max_bytes} bytes")
        return data, ("body", "file")
    if kind == "application/json":
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise FieldError(("body",), f"the body is not valid JSON: {exc}") from exc
        if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
            raise FieldError(("body", "image"), 'send {"image": "<base64 image>"}')
        extra = sorted(set(payload) - {"image"})
        if extra:
            raise FieldError(("body", extra[0]), "Extra inputs are not permitted")
        return decode_base64_image(payload["image"], ("body", "image"), max_bytes), ("body", "image")
    raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                        detail="send multipart/form-data with a 'file' field, or JSON {\"image\": \"<base64>\"}")
