"""The file store: uploaded input files and written output files, in a directory.

On an HPC site the directory is on the shared filesystem, so the control API (which writes
uploads) and every batch runner (which reads inputs and writes outputs) see the same files.
Layout: ``<root>/<tenant_id>/<file_id>``. Invariants: a file appears under its final name only
complete (written to a temporary name in the same directory, flushed, then renamed), so a
crash never leaves a partial file that a reader could take for a whole one; writing the same
final name again replaces it atomically (finalising a batch twice is harmless).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO


class FileStore:
    __slots__ = ("root",)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, tenant_id: int, file_id: str) -> Path:
        return self.root / str(tenant_id) / file_id

    def begin(self, tenant_id: int, file_id: str) -> tuple[Path, BinaryIO]:
        """A temporary file next to the final one; pass it to :meth:`commit` or :meth:`discard`."""
        final = self.path(tenant_id, file_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{file_id}.{secrets.token_hex(4)}.part")
        return tmp, tmp.open("wb")

    def commit(self, tmp: Path, fh: BinaryIO, tenant_id: int, file_id: str) -> None:
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        tmp.replace(self.path(tenant_id, file_id))

    @staticmethod
    def discard(tmp: Path, fh: BinaryIO) -> None:
        fh.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

    def open(self, tenant_id: int, file_id: str) -> BinaryIO:
        return self.path(tenant_id, file_id).open("rb")

    def remove(self, tenant_id: int, file_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(tenant_id, file_id).unlink()
