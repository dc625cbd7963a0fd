"""Files: their bytes on disk, their records in Redis. Every change of either goes through FileStore.

    <files_dir>/<file id>                  the bytes, written once, never changed
    <files_dir>/incoming/<file id>.part    an upload still arriving (removed when it ends, either way)
    <files_dir>/batches/<batch id>.jsonl   a batch's input, linked to its file when the batch is
                                           made (the file may be deleted while the batch runs, in
                                           any API process), removed when the batch ends
    keys.file(id)           FileRecord JSON; Redis expires it GRACE_S after the file
    keys.owner_files(key)   the owner's listing: file id → upload time (fractional created_at)
    keys.FILES_EXPIRY       file id → expires_at, for every id whose bytes may be on disk

Invariants: an id enters FILES_EXPIRY before its bytes are moved into place and leaves it only
after they are unlinked, so no bytes outlive their entry; a record exists only while its bytes
do (add writes it after the move, remove deletes it with the entry). Several API processes share
the directory and Redis: removal is idempotent (unlink missing_ok, then one transaction), so two
processes sweeping the same expired file both succeed. A file past its expires_at is gone: the
lazy check on every read removes it, and `sweep` (every SWEEP_S in each API process, and on each
upload) removes the ones nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Literal, cast

import redis.asyncio as aioredis

from api.openai.protocol import FileObject, FilePurpose
from scheduler import keys

log = logging.getLogger(__name__)

GRACE_S = 3600  # a record outlives its file in Redis by this much, so the lazy check sees it expire
SWEEP_S = 60.0
STALE_PART_S = 86_400.0  # an incoming part this old was left by a process that died mid-upload
_FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")


class FileRecord(FileObject):
    """What Redis keeps of a file: OpenAI's File object and the id of the API key that owns it."""

    owner: str

    def public(self) -> FileObject:
        return FileObject.model_validate(self.model_dump(exclude={"owner"}))


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


class FileStore:
    """`root`: the files directory, shared by every API process (settings.resolved_files_dir)."""

    def __init__(self, client: aioredis.Redis, root: Path) -> None:
        self.client = client
        self.root = root
        self.incoming_dir = root / "incoming"
        self.incoming_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pins_dir = root / "batches"
        self.pins_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, file_id: str) -> Path:
        assert _FILE_ID.match(file_id), file_id  # ids come from new_file_id or passed `get`
        return self.root / file_id

    def incoming(self, file_id: str) -> Path:
        """Where an upload of `file_id` is written while it arrives; the caller removes it."""
        return self.incoming_dir / f"{file_id}.part"

    async def add(
        self, file_id: str, owner: str, filename: str, purpose: FilePurpose, ttl_s: int, source: Path
    ) -> FileRecord:
        """Moves `source` (on the files directory's disk: `incoming(file_id)`) into place and
        records it, owned by `owner`, for `ttl_s` seconds."""
        now = time.time()
        created = int(now)
        record = FileRecord(
            id=file_id,
            bytes=source.stat().st_size,
            created_at=created,
            expires_at=created + ttl_s,
            filename=filename,
            purpose=purpose,
            owner=owner,
        )
        # A failure after the move leaves bytes without a record: the sweep removes them at expiry.
        await self.client.zadd(keys.FILES_EXPIRY, {file_id: record.expires_at})
        os.replace(source, self.path(file_id))
        pipe = self.client.pipeline(transaction=True)
        pipe.set(keys.file(file_id), record.model_dump_json(), exat=record.expires_at + GRACE_S)
        pipe.zadd(keys.owner_files(owner), {file_id: now})  # not `created`: seconds would tie
        await pipe.execute()
        return record

    def pin(self, file_id: str, batch_id: str) -> Path:
        """The file's bytes, kept for the batch `batch_id` until `unpin` (a hard link: no copy)."""
        pinned = self.pinned(batch_id)
        try:
            os.link(self.path(file_id), pinned)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            shutil.copyfile(self.path(file_id), pinned)
        return pinned

    def pinned(self, batch_id: str) -> Path:
        assert re.match(r"^batch_[0-9a-f]{32}$", batch_id), batch_id
        return self.pins_dir / f"{batch_id}.jsonl"

    def unpin(self, batch_id: str) -> None:
        self.pinned(batch_id).unlink(missing_ok=True)

    def drop_pins(self, keep: set[str], older_than_s: float) -> None:
        """Removes the pins of batches not in `keep` (those that ended while their run died), if
        pinned over `older_than_s` ago (a batch being made is pinned before it is listed)."""
        stale = time.time() - older_than_s
        for pin in self.pins_dir.glob("batch_*.jsonl"):
            with contextlib.suppress(FileNotFoundError):
                if pin.stem not in keep and pin.stat().st_ctime < stale:
                    pin.unlink()

    async def get(self, owner: str, file_id: str) -> FileRecord | None:
        """The file, if `owner` owns it and it has not expired (an expired one is removed now)."""
        if not _FILE_ID.match(file_id):
            return None
        raw = await self.client.get(keys.file(file_id))
        record = FileRecord.model_validate_json(raw) if raw else None
        if record is None or record.owner != owner:
            return None
        if record.expires_at <= time.time():
            await self.remove(file_id, owner)
            return None
        return record

    async def page(
        self, owner: str, purpose: str | None, after: str | None, limit: int, order: Literal["asc", "desc"]
    ) -> tuple[list[FileRecord], bool] | None:
        """The owner's live files by created_at (`order`), those after the file `after`, with
        `purpose` if given. → (at most `limit` files, whether more follow); None when `after`
        names no file of the listing."""
        listing = keys.owner_files(owner)
        start = 0
        if after is not None:
            rank = await (self.client.zrank if order == "asc" else self.client.zrevrank)(listing, after)
            if rank is None:
                return None
            start = int(cast(int, rank)) + 1
        found: list[FileRecord] = []
        chunk = min(limit + 1, 1000)
        now = time.time()
        while len(found) <= limit:
            read = self.client.zrange(listing, start, start + chunk - 1, desc=order == "desc")
            ids = cast(list[str], await read)
            if not ids:
                break
            start += len(ids)
            for file_id, raw in zip(ids, await self.client.mget([keys.file(i) for i in ids]), strict=True):
                record = FileRecord.model_validate_json(raw) if raw else None
                if record is None or record.expires_at <= now:
                    await self.remove(file_id, owner)
                    start -= 1  # the entries after it moved up one rank
                elif purpose is None or record.purpose == purpose:
                    found.append(record)
        return found[:limit], len(found) > limit

    async def remove(self, file_id: str, owner: str | None) -> None:
        """Bytes first, then the record and its entries (`owner`'s listing, when known). Idempotent."""
        self.path(file_id).unlink(missing_ok=True)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(keys.file(file_id))
        if owner is not None:
            pipe.zrem(keys.owner_files(owner), file_id)
        pipe.zrem(keys.FILES_EXPIRY, file_id)
        await pipe.execute()

    async def sweep(self, batch: int = 256) -> int:
        """Removes up to `batch` expired files (and incoming parts a dead process left). → how many."""
        now = time.time()
        ids = cast(
            list[str], await self.client.zrangebyscore(keys.FILES_EXPIRY, "-inf", now, start=0, num=batch)
        )
        raws = await self.client.mget([keys.file(i) for i in ids]) if ids else []
        for file_id, raw in zip(ids, raws, strict=True):
            owner = FileRecord.model_validate_json(raw).owner if raw else None
            await self.remove(file_id, owner)
        for part in self.incoming_dir.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if part.stat().st_mtime < now - STALE_PART_S:
                    part.unlink()
        return len(ids)

    async def sweep_forever(self) -> None:
        """The API process's sweeper (its lifespan starts and cancels it)."""
        while True:
            try:
                await self.sweep()
            except Exception:  # Redis restarting: the next round catches up
                log.warning("file sweep failed; retrying in %.0f s", SWEEP_S, exc_info=True)
            await asyncio.sleep(SWEEP_S)
