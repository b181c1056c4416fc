"""Inputs of a curation run: one row per input, listed deterministically so partitions are stable.

Accepted inputs (``--input``):
- a local directory or fsspec prefix (``s3://bucket/raw/``), scanned recursively; kinds are
  detected from content later (probe), not from extensions. Sidecar files (``.json``, ``.txt``,
  ``.yaml``, ``.csv``, ``.md``) are skipped; ``.jsonl`` / ``.parquet`` files that look like
  manifests are read as manifests, and the media they reference are not listed twice.
- a manifest (JSONL or Parquet): ``uri`` (+ ``caption``), or for edits ``source``, ``target``,
  ``instruction`` (+ ``kind``). Relative paths are relative to the manifest; a ``file://`` URL
  is listed as its local path.
- a conversation corpus (LLaVA-style QA, ``curation.sources.conversations``): a ``.json`` list
  or ``.jsonl`` file of records ``{"id", "image" | "video", "conversations"}``, given as
  ``--input`` or found in a scanned folder (recognised by its first record); one row per
  record, the media it names not listed twice. ``--kind conversation`` also reads a file whose
  first record is broken, and rejects (``not_referenced``) the media of a scanned folder that
  no record names.
- WebDataset tars (a ``.tar`` file, a brace pattern ``data-{000..009}.tar``, or a directory of
  tars): regular members are unpacked into ``OUTPUT/_staging/``; members with absolute paths
  or ``..`` (``unsafe_member_path``) and links, devices or fifos (``unsafe_member_type``)
  become error rows, so nothing is written or read outside the staging folder.

Inputs are confined to the input root: the directory for a directory input, the manifest's
folder for a manifest, the staging folder for tar members, the prefix for an fsspec URI.
Symlinks and ``..`` are resolved before the check (a symlinked folder is never followed
outside the root), and in a manifest a ``file://`` URL is checked as the local path it is,
while any other scheme (``http``, ``s3``, ...) is outside unless allowed. ``allow`` (the
config's ``allow_inputs``) lists more places: local folders, or URI prefixes such as
``s3://bucket/raw/``. An input outside all of them is an error row ``outside_input_root``
whose detail names the resolved target; nothing is read from it.

Every input is a row, even one that is not read: hidden and underscore files (``.name``,
``_name``, or anything inside such a folder) are ``rejected`` rows with the reason
``skipped_hidden`` (final: no stage reads them, see ``curation/stages/base.py``), files that
are not regular files (fifos, sockets, devices) are ``not_a_regular_file`` errors, and a line
that cannot be read (broken JSON, missing ``uri``, broken UTF-8) is an error row, so
inputs = accepted + rejected + error holds. Not listed at all: the run's staging folder and
its output folder (the staging folder's parent) when they lie inside the input folder, so a
rerun never reads its own shards.

The package, one concept a module: ``listing`` (``list_inputs``, directories and single
files), ``manifest``, ``tars`` (WebDataset), ``conversations`` (LLaVA-style QA), ``scope``
(the input root and the allow-list) and ``rows`` (the row an input becomes).
"""

from __future__ import annotations

from curation.sources.listing import list_inputs

__all__ = ["list_inputs"]
