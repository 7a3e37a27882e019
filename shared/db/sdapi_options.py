"""Per-API-key WebUI settings (``POST /sdapi/v1/options``), kept in Postgres like every other state.

The WebUI keeps options in a process-wide global that every user changes for everyone; here each
API key has its own row, and the values are only defaults for that key's later jobs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, ForeignKey, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared.db.models import Base


class SdapiOptions(Base):
    __tablename__ = "sdapi_options"

    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    options: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
