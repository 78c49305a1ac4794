"""A worker's not yet written usage, kept in memory its parent shares: a killed worker's
successor writes what it had counted.

A gateway worker counts usage in memory and writes it every ``usage_flush_s``; a worker killed
with SIGKILL (an OOM kill) took up to one interval of counts with it. With several workers the
parent creates one spool per worker slot before forking (anonymous shared memory, which
outlives the worker), the worker appends one fixed-size record per accounted request, and
advances ``flushed`` once a batch is committed; the worker the parent starts in the same slot
reads the records past ``flushed`` and writes them.

Layout: a 16-byte header, ``written`` and ``flushed`` (record counts, u64), then ``capacity``
records in a ring. Invariants: only one process writes a spool at a time (a successor starts
after its predecessor was reaped); a record is complete before ``written`` counts it (an aligned
8-byte store), so a worker killed mid-record leaves nothing half-read; at most ``capacity``
records are unwritten: beyond that (PostgreSQL away for long under heavy load) new records are
not spooled, only counted in memory as before (``overflowed``). A worker killed after a commit
and before it advanced ``flushed`` is counted twice by its successor: that window is one memory
store, where the loss it replaces was a whole flush interval.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator

_HEADER = struct.Struct("<QQ")  # written, flushed
MODEL_MAX = 128  # the longest model name the admin API accepts (control/wire.py NAME_PATTERN)
# tenant_id, bucket, ok, prompt, completion, name length, name
_RECORD = struct.Struct(f"<qqBIIB{MODEL_MAX}s")


class UsageSpool:
    __slots__ = ("_mem", "capacity", "overflowed")

    def __init__(self, capacity: int = 16384) -> None:  # 2.5 MB: several flush intervals of a busy worker
        self.capacity = capacity
        # fileno -1: anonymous memory, MAP_SHARED: a forked child writes what the parent sees
        self._mem = mmap.mmap(-1, _HEADER.size + capacity * _RECORD.size)
        self.overflowed = 0

    @property
    def written(self) -> int:
        return int(_HEADER.unpack_from(self._mem, 0)[0])

    @property
    def flushed(self) -> int:
        return int(_HEADER.unpack_from(self._mem, 0)[1])

    def mark_flushed(self, upto: int) -> None:
        """Everything appended before ``written`` was ``upto`` is committed."""
        struct.pack_into("<Q", self._mem, 8, upto)

    def append(self, tenant_id: int, model: str, bucket: int, *, ok: bool, prompt: int,
               completion: int) -> None:
        written, flushed = _HEADER.unpack_from(self._mem, 0)
        name = model.encode()
        if written - flushed >= self.capacity or len(name) > MODEL_MAX:
            self.overflowed += 1
            return
        _RECORD.pack_into(self._mem, _HEADER.size + (written % self.capacity) * _RECORD.size,
                          tenant_id, bucket, ok, prompt, completion, len(name), name)
        struct.pack_into("<Q", self._mem, 0, written + 1)

    def unwritten(self) -> Iterator[tuple[int, str, int, bool, int, int]]:
        """The records past ``flushed``: (tenant_id, model, bucket, ok, prompt, completion)."""
        written, flushed = _HEADER.unpack_from(self._mem, 0)
        for i in range(flushed, written):
            tenant_id, bucket, ok, prompt, completion, n, name = _RECORD.unpack_from(
                self._mem, _HEADER.size + (i % self.capacity) * _RECORD.size)
            yield tenant_id, name[:n].decode(errors="replace"), bucket, bool(ok), prompt, completion
