"""Conversation corpora (LLaVA-style JSON or JSONL): one row per record, its medium probed and
filtered like any image or video, its conversation kept with the sample.

A record is ``{"id", "image" | "video": path, "conversations": [{"from": "human" | "gpt",
"value": "..."}]}`` (LLaVA-v1.5's instruction data, LLaVA-Video's; ``user`` / ``assistant``
are read as ``human`` / ``gpt``). A ``.json`` file holds a list of records, a ``.jsonl`` file
one record a line. Media paths are relative to the file's folder (LLaVA's ``image_folder``
layout), and inputs stay inside its scope as a manifest's do (``curation.sources.scope``).

Every record is a row, keyed by the file and its position (two records may ask about one
image): a valid one is an input of the kind its key names (``image`` or ``video``; the probe
checks the content agrees); a broken one is an ``error`` row ``conversation_error`` naming the
file and the record index; a local medium that does not exist is an ``error`` row
``not_found`` naming both; a record without a medium (text-only chat) is ``rejected``
``text_only`` (final: understanding tasks read a medium). Turns must alternate human / gpt,
starting with human and ending with gpt; the medium's placeholder (``<image>`` / ``<video>``)
may appear at most once, in a human turn (none: the medium leads the conversation, as LLaVA
puts it before the first question).
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec

from curation.sources.manifest import _resolve_entry
from curation.sources.rows import error_input, input_row, rejected_input
from curation.sources.scope import OUTSIDE, Scope, local_path_of, scheme_of

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
PLACEHOLDERS = {"image": "<image>", "video": "<video>"}
PEEK_BYTES = 1 << 20  # a .json file's first record is looked for in its first MiB


def looks_like_conversations(fs, path: str) -> bool:
    """A JSON list (or JSONL) whose first record has ``conversations``."""
    try:
        with fs.open(path, "rb") as f:
            head = f.read(PEEK_BYTES).decode("utf-8", errors="ignore").lstrip()
    except OSError:
        return False
    if path.lower().endswith(".jsonl"):
        line = head.split("\n", 1)[0]
        try:
            first = json.loads(line)
        except ValueError:
            return False
    else:
        if not head.startswith("["):
            return False  # an object: a sidecar
        try:
            first, _ = json.JSONDecoder().raw_decode(head[1:].lstrip())
        except ValueError:
            return False
    return isinstance(first, dict) and "conversations" in first


def read_conversations(uri: str, scope: Scope | None = None, allow=()) -> list[dict]:
    """One row per record of the LLaVA-style file ``uri`` (see the module docstring)."""
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    scope = scope or Scope(base, allow)
    try:
        records = _records(uri)
    except (ValueError, UnicodeDecodeError) as e:
        return [error_input(uri, "conversation_error", f"{uri}: not a JSON list of records: {e}")]
    return [_row(rec, i, uri, base, scope) for i, rec in enumerate(records)]


def _records(uri: str) -> list[Any]:
    with fsspec.open(uri, "rb") as f:
        data = f.read().decode("utf-8")
    if uri.lower().endswith(".jsonl"):
        out: list[Any] = []
        for line in data.splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    out.append(_Broken(f"invalid JSON: {e}"))
        return out
    records = json.loads(data)
    if not isinstance(records, list):
        raise ValueError("the top level is not a list")
    return records


class _Broken:
    def __init__(self, problem: str):
        self.problem = problem


def _row(rec: Any, i: int, uri: str, base: str, scope: Scope) -> dict:
    where = f"{uri}#{i}"
    rid = rec.get("id") if isinstance(rec, dict) else None
    label = f"{uri} record {i}" + (f" (id {rid!r})" if rid is not None else "")

    def error(reason: str, problem: str) -> dict:
        return error_input(where, reason, f"{label}: {problem}")

    if isinstance(rec, _Broken):
        return error("conversation_error", rec.problem)
    if not isinstance(rec, dict):
        return error("conversation_error", "a record must be a JSON object")
    media = [k for k in PLACEHOLDERS if k in rec]
    if len(media) > 1:
        return error("conversation_error", "a record names an image or a video, not both")
    turns, problem = _turns(rec.get("conversations"), media[0] if media else None)
    if problem is not None:
        return error("conversation_error", problem)
    if not media:
        row = rejected_input(where, "text_only", f"{label}: no image or video")
        return {**row, "conversation": turns, "num_turns": len(turns), "record_uri": where}
    kind = media[0]
    given = rec[kind]
    if not isinstance(given, str) or not given.strip():
        return error("conversation_error", f"{kind!r} must be one path (got {given!r})")
    media_uri = _resolve_entry(given, base)
    resolved = scope.refusal(media_uri)
    if resolved is not None:
        return error(OUTSIDE, scope.detail(given, resolved))
    local = local_path_of(media_uri) if scheme_of(media_uri) else media_uri
    if local is not None and not os.path.exists(local):
        return error("not_found", f"{kind} {given!r} ({local}) does not exist")
    return input_row(
        media_uri,
        key_part=where,
        kind=kind,
        caption=None,
        conversation=turns,
        num_turns=len(turns),
        record_uri=where,
    )


def _turns(raw: Any, kind: str | None) -> tuple[list[dict], str | None]:
    """(turns as ``{"from": human | gpt, "value"}``, None) or ([], the problem)."""
    if not isinstance(raw, list) or not raw:
        return [], "'conversations' must be a non-empty list of turns"
    turns, placeholders = [], 0
    for n, turn in enumerate(raw):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return [], f"turn {n}: must be an object with a string 'value'"
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            return [], f"turn {n}: 'from' is {turn.get('from')!r}; allowed: {', '.join(ROLES)}"
        expected = "human" if n % 2 == 0 else "gpt"
        if role != expected:
            return [], f"turn {n}: expected a {expected} turn (human and gpt alternate)"
        value = turn["value"]
        for other, mark in PLACEHOLDERS.items():
            if mark in value and (role == "gpt" or other != kind):
                where = "a gpt turn" if role == "gpt" else f"a record without a {other}"
                return [], f"turn {n}: placeholder {mark} in {where}"
        placeholders += value.count(PLACEHOLDERS[kind]) if kind else 0
        turns.append({"from": role, "value": value})
    if turns[-1]["from"] != "gpt":
        return [], "the last turn must be a gpt answer"
    if placeholders > 1:
        return [], f"{placeholders} {PLACEHOLDERS[kind]} placeholders; one medium per record"
    return turns, None
