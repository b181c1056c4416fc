"""Names and ``catalog://`` references.

A dataset is referred to as ``catalog://NAME@VERSION`` where VERSION is a positive integer or
``latest`` (the newest committed version). Recipes add a filter expression on index columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import StringConstraints

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
DatasetName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]

SCHEME = "catalog://"
_REF = re.compile(
    r"^catalog://(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@(?P<version>[^@/]+))?$"
)


def check_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name or ""):
        raise ValueError(
            f"dataset name {name!r} is invalid: use letters, digits, '.', '_' or '-' "
            "(start with a letter or digit, at most 128 characters)"
        )
    return name


@dataclass(frozen=True)
class DatasetRef:
    """``catalog://NAME@VERSION``; ``version`` is an int or the string ``"latest"``."""

    name: str
    version: int | str = "latest"

    @classmethod
    def parse(cls, text: str) -> DatasetRef:
        """Parse ``catalog://NAME[@VERSION]`` (also accepts a bare ``NAME[@VERSION]``)."""
        text = text.strip()
        if not text.startswith(SCHEME):
            text = SCHEME + text
        m = _REF.match(text)
        if not m:
            raise ValueError(
                f"{text!r} is not a dataset reference: expected catalog://NAME@VERSION with "
                "VERSION a positive integer or 'latest'"
            )
        version: int | str = m.group("version") or "latest"
        if version != "latest":
            if not str(version).isdigit() or int(version) < 1:
                raise ValueError(
                    f"{text!r}: version must be a positive integer or 'latest', got {version!r}"
                )
            version = int(version)
        return cls(m.group("name"), version)

    def __str__(self) -> str:
        return f"{SCHEME}{self.name}@{self.version}"


def is_catalog_uri(text: str) -> bool:
    return isinstance(text, str) and text.startswith(SCHEME)
