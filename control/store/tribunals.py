"""Tribunal configurations (admin API): virtual models ``tribunal/<name>``.

Invariants: what is stored is a whole :class:`control.wire.TribunalSettings` document that
passed :func:`check_settings` (pure: quorum within the jurors, prompts with only their role's
placeholders) and whose models (jurors, judge, fallback judge) each name a configured model or
alias at the time of the write, checked in the same transaction under a share lock of the
model tables (a model cannot be renamed away between the check and the commit). An update is
merged into the stored document and validated as a whole. Writes fire the endpoint table's
NOTIFY (migration 0900): the gateways get the change with the next publish.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
from msgspec import UNSET

from control.store.db import ConflictError, Conn, Database, InvalidError, NotFoundError
from control.wire import Tribunal, TribunalCreate, TribunalSettings, TribunalUpdate
from hpcgate.schemas.tribunal import PLACEHOLDERS, TRIBUNAL_PREFIX, prompt_error

_SELECT = "SELECT name, config, created_at, updated_at FROM gateway_tribunals"
_json_decode = msgspec.json.Decoder()


def check_settings(s: TribunalSettings) -> None:
    """Raise InvalidError with the reason if ``s`` is not a usable tribunal (no I/O)."""
    if s.quorum > len(s.jurors):
        raise InvalidError(f"quorum={s.quorum} exceeds the {len(s.jurors)} juror(s)")
    for field in PLACEHOLDERS:
        why = prompt_error(field, getattr(s, field))
        if why is not None:
            raise InvalidError(why)
    if s.fallback_judge is not None and s.fallback_judge == s.judge:
        raise InvalidError("fallback_judge is the judge itself")


def models_of(s: TribunalSettings) -> list[str]:
    names = [j.model for j in s.jurors] + [s.judge]
    if s.fallback_judge is not None:
        names.append(s.fallback_judge)
    return list(dict.fromkeys(names))


async def _check_models(conn: Conn, s: TribunalSettings) -> None:
    await conn.execute("LOCK TABLE ai_model_aliases IN SHARE MODE")
    names = models_of(s)
    known = {r["name"] for r in await conn.fetch(
        """SELECT name FROM ai_model_configurations WHERE name = ANY($1::text[])
           UNION SELECT alias FROM ai_model_aliases WHERE alias = ANY($1::text[])""", names)}
    missing = [n for n in names if n not in known]
    if missing:
        raise InvalidError("unknown model(s): " + ", ".join(repr(n) for n in missing)
                           + " (create them first: hpcgate admin model create NAME)")


def _settings_doc(s: TribunalSettings) -> str:
    doc = msgspec.to_builtins(s)
    doc.pop("name", None)
    return msgspec.json.encode(doc).decode()


def _tribunal(row: asyncpg.Record) -> Tribunal:
    doc: dict[str, Any] = _json_decode.decode(row["config"])
    doc.update(name=row["name"], model=TRIBUNAL_PREFIX + row["name"], created_at=row["created_at"],
               updated_at=row["updated_at"])
    return msgspec.convert(doc, Tribunal, strict=False)


def settings_of(t: Tribunal) -> TribunalSettings:
    fields = {f: getattr(t, f) for f in TribunalSettings.__struct_fields__}
    return TribunalSettings(**fields)


async def create_tribunal(db: Database, req: TribunalCreate) -> Tribunal:
    check_settings(req)
    async with db.transaction() as conn:
        await _check_models(conn, req)
        row = await conn.fetchrow(
            "INSERT INTO gateway_tribunals (name, config) VALUES ($1, $2::jsonb) ON CONFLICT DO NOTHING"
            " RETURNING name, config, created_at, updated_at", req.name, _settings_doc(req))
        if row is None:
            raise ConflictError(f"tribunal {req.name!r} already exists")
        return _tribunal(row)


async def list_tribunals(db: Database) -> list[Tribunal]:
    async with db.transaction() as conn:
        return [_tribunal(r) for r in await conn.fetch(_SELECT + " ORDER BY name")]


async def get_tribunal(db: Database, name: str) -> Tribunal:
    async with db.transaction() as conn:
        row = await conn.fetchrow(_SELECT + " WHERE name = $1", name)
    if row is None:
        raise NotFoundError(f"no tribunal {name!r}")
    return _tribunal(row)


async def update_tribunal(db: Database, name: str, req: TribunalUpdate) -> Tribunal:
    async with db.transaction() as conn:
        row = await conn.fetchrow(_SELECT + " WHERE name = $1 FOR UPDATE", name)
        if row is None:
            raise NotFoundError(f"no tribunal {name!r}")
        doc = msgspec.to_builtins(settings_of(_tribunal(row)))
        doc.update({f: v for f in TribunalUpdate.__struct_fields__ if (v := getattr(req, f)) is not UNSET})
        try:
            merged = msgspec.convert(msgspec.to_builtins(doc), TribunalSettings)
        except msgspec.ValidationError as exc:
            raise InvalidError(str(exc)) from None
        check_settings(merged)
        await _check_models(conn, merged)
        row = await conn.fetchrow(
            "UPDATE gateway_tribunals SET config = $2::jsonb, updated_at = now() WHERE name = $1"
            " RETURNING name, config, created_at, updated_at", name, _settings_doc(merged))
        assert row is not None
        return _tribunal(row)


async def delete_tribunal(db: Database, name: str) -> Tribunal:
    async with db.transaction() as conn:
        row = await conn.fetchrow("DELETE FROM gateway_tribunals WHERE name = $1"
                                  " RETURNING name, config, created_at, updated_at", name)
    if row is None:
        raise NotFoundError(f"no tribunal {name!r}")
    return _tribunal(row)
