"""Domain errors that the API maps to 4xx responses naming the field at fault."""

from __future__ import annotations


class FieldError(ValueError):
    """A submitted value is not allowed. `field` is the request path, e.g. ("body", "width")."""

    def __init__(self, field: tuple[str | int, ...], message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status_code = status_code
