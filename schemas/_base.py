"""The base every wire model shares: immutable, closed to unknown fields, versioned."""

from __future__ import annotations

from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION: Final = 1
"""The version every message carries; a decoder refuses any other (see ``schemas.decode_*``)."""

MAX_MESSAGE_BYTES: Final = 1024 * 1024
"""Default size limit for one encoded message; larger bodies are refused before parsing."""

Json = Any
"""Any JSON value. Not validated node by node (pydantic's ``JsonValue`` walks every node in Python, the
largest cost of a worker's record): decoded bodies are JSON by construction, and ``encode`` (orjson)
refuses anything that is not."""

JsonObject = dict[str, Json]

Identifier = Annotated[
    str,
    Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]*$"),
]
"""Ids and adapter names: printable, no spaces, safe in logs, routing headers and file names."""


class WireModel(BaseModel):
    """Frozen, closed models: a message is a value, and an unknown field is a contract error, not data."""

    # ser_json_inf_nan: NaN and Infinity are not JSON; a record carrying one would make its whole envelope
    # (other sessions' records too) undecodable downstream, so they are written as null.
    model_config = ConfigDict(frozen=True, extra="forbid", str_max_length=1_000_000, ser_json_inf_nan="null")
