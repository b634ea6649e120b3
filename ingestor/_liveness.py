"""This process's liveness in Postgres: a session-level advisory lock held on a dedicated connection.

The lock key derives from an *owner token* ``<ingestor_id>/<nonce>/<generation>``, recorded on every JSONL
file this process opens. While the connection lives, nobody else can take the lock, so recoverers leave
the file alone. When the connection is lost the server releases the lock, a recoverer may finalize the
file, and this process must stop using it: :meth:`Liveness.ensure` then connects again under a new
generation (a new token and key), and the writer sees the token change and starts a new file.

The lock is session state, so this connection uses ``liveness_url``, never a transaction pooler: behind
one, the lock would be held by a server connection the pooler keeps (and lends to others) after this
process died, and its files would never be recovered. Recoverers test the lock with a transaction-level
``pg_try_advisory_xact_lock`` (``_recovery``), which conflicts with it and is safe through any pooler.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets

import asyncpg
import structlog

from atlas_common import Resource
from ingestor import _sql
from ingestor._errors import DatabaseUnavailable
from ingestor._settings import IngestorSettings
from ingestor._store import DB_ERRORS, classify, connect

_log = structlog.get_logger("ingestor.liveness")


def lock_key(owner_token: str) -> int:
    """A stable signed 64-bit advisory-lock key for an owner token (same in every process)."""
    digest = hashlib.blake2b(b"atlas-ingestor-owner:" + owner_token.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Liveness(Resource):
    def __init__(self, settings: IngestorSettings) -> None:
        self._settings = settings
        self._nonce = secrets.token_hex(4)
        self._generation = 0
        self._conn: asyncpg.Connection | None = None
        self._token: str | None = None
        self._connecting = asyncio.Lock()  # batches in flight ask at once: one connects, the rest wait

    @property
    def token(self) -> str | None:
        """The live owner token, or None while not connected."""
        return self._token if self._conn is not None and not self._conn.is_closed() else None

    async def ensure(self) -> str:
        """The current owner token, connecting (under a new generation) if the connection was lost."""
        token = self.token
        if token is not None:
            return token
        async with self._connecting:
            return self.token or await self._connect()

    async def _connect(self) -> str:
        if self._conn is not None:
            _log.warning("liveness.lost", owner_token=self._token)
            self._conn.terminate()
            self._conn, self._token = None, None
        self._generation += 1
        token = f"{self._settings.ingestor_id}/{self._nonce}/{self._generation}"
        try:
            conn = await connect(self._settings, self._settings.liveness_url)
        except DB_ERRORS as err:
            raise classify(err, self._settings.liveness_url) from err
        try:
            got = await conn.fetchval(_sql.TRY_LOCK, lock_key(token))
        except DB_ERRORS as err:
            conn.terminate()
            raise classify(err, self._settings.liveness_url) from err
        if not got:  # a fresh token's key is free unless a 64-bit hash collides
            conn.terminate()
            raise DatabaseUnavailable(f"liveness lock for {token} is taken")
        self._conn, self._token = conn, token
        _log.info("liveness.acquired", owner_token=token)
        return token

    async def ping(self) -> None:
        """Notice a silently dead connection (the next ensure() then replaces it)."""
        conn = self._conn
        if conn is None or conn.is_closed():
            return
        try:
            await conn.fetchval("SELECT 1", timeout=5)
        except DB_ERRORS:
            conn.terminate()

    async def close(self) -> None:
        conn, self._conn, self._token = self._conn, None, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=5)
            except DB_ERRORS:
                conn.terminate()
