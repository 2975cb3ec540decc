"""The config's reference, rendered from the models in job/config.py, so
that it cannot drift from what the job accepts: the table in
docs/training.md (`python -m job.config_doc` rewrites it in place; name other
files to rewrite theirs) and `cifar-job check-config --explain`.
"""

from __future__ import annotations

import sys
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from job.config import Config

START = ("<!-- config-table:start: generated from job/config.py by `python -m job.config_doc docs/training.md`; "
         "edit the descriptions there -->")
END = "<!-- config-table:end -->"
# The file that holds the table, relative to the repository's root.
DEFAULT_TARGET = "docs/training.md"

_FIXED = " Fixed for a run: resuming under another value exits 2."
_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_WIDTH = 100


@dataclass(frozen=True)
class Entry:
    key: str
    type: str
    default: str
    description: str
    # The lr_schedule whose parameter this is; its value exists only under that schedule.
    schedule: str | None = None


@dataclass(frozen=True)
class Unused:
    """The value of a parameter of a schedule the config did not choose."""

    why: str


def entries(cfg: Config | None = None) -> list[tuple[Entry, Any]]:
    """Every leaf key of the config, in the models' order, with the value `cfg` gives it."""
    # Built without reading the environment: the reference is the models' own.
    defaults = Config.model_construct()
    # Keys in the fingerprint (or under one) cannot change across a resume; that
    # fact lives in Config.fingerprint, so it is read from there, not restated.
    fixed = defaults.fingerprint().keys()

    def noted(e: Entry) -> Entry:
        if any(e.key == f or e.key.startswith(f + ".") for f in fixed):
            return replace(e, description=e.description + _FIXED)
        return e

    return [(noted(e), value) for e, value in _walk(Config, "", cfg or defaults)]


def _walk(model: type[BaseModel], prefix: str, values: BaseModel) -> Iterator[tuple[Entry, Any]]:
    for name, field in model.model_fields.items():
        key, value = prefix + name, getattr(values, name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _walk(field.annotation, key + ".", value)
        elif field.discriminator:
            yield from _union(key, field, value)
        else:
            yield Entry(key, _type(field), _scalar(field.default), field.description or ""), value


def _union(key: str, field: FieldInfo, chosen: BaseModel) -> Iterator[tuple[Entry, Any]]:
    """A discriminated union (the schedule): one key for the name, which says
    what each choice does, then each choice's parameters."""
    variants = get_args(field.annotation)
    tag = field.discriminator
    names = [get_args(v.model_fields[tag].annotation)[0] for v in variants]
    choices = " ".join(f"`{n}`: {v.model_fields[tag].description}" for n, v in zip(names, variants, strict=True))
    yield (Entry(key, " | ".join(names), getattr(field.default, tag), f"{field.description} {choices}"),
           getattr(chosen, tag))
    for n, variant in zip(names, variants, strict=True):
        for param, f in variant.model_fields.items():
            if param != tag:
                value = getattr(chosen, param) if isinstance(chosen, variant) else \
                    Unused(f"{key} is {getattr(chosen, tag)}")
                yield Entry(f"{key}.{param}", _type(f), _scalar(f.default), f.description or "", schedule=n), value


def _type(field: FieldInfo) -> str:
    annotation = field.annotation
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    parts = []
    for member in members:
        if member is type(None):
            continue
        if get_origin(member) is Literal:
            parts.append(" | ".join(get_args(member)))
        elif member in (int, float):
            parts.append(member.__name__ + _bounds(field.metadata))
        else:
            pattern = next((m.pattern for m in field.metadata if getattr(m, "pattern", None)), None)
            parts.append(f"{member.__name__} matching `{pattern}`" if pattern else member.__name__)
    if type(None) in members:
        parts.append("null")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _bounds(metadata: list[Any]) -> str:
    """A number's limits: ` >= 1`, or both as an interval, ` in (0, 1]`."""
    found = {name: getattr(m, name) for m in metadata for name in _SIGNS if hasattr(m, name)}
    low = next(((bracket, found[n]) for n, bracket in (("ge", "["), ("gt", "(")) if n in found), None)
    high = next(((found[n], bracket) for n, bracket in (("le", "]"), ("lt", ")")) if n in found), None)
    if low and high:
        return f" in {low[0]}{low[1]}, {high[0]}{high[1]}"
    return "".join(f" {_SIGNS[n]} {v}" for n, v in found.items())


def _scalar(value: Any) -> str:
    """A value as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def markdown() -> str:
    """The table in docs/training.md."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for e, _ in entries():
        where = f"(`{e.schedule}`) " if e.schedule else ""
        rows.append(f"| `{e.key}` | {cell(e.type)} | `{cell(e.default)}` | {where}{cell(e.description)} |")
    return "\n".join(rows) + "\n"


def explain(cfg: Config) -> str:
    """Every key with the value `cfg` gives it, its type, default and meaning."""
    def indented(text: str) -> str:
        return textwrap.fill(text, _WIDTH, initial_indent="    ", subsequent_indent="    ")

    blocks = []
    for e, value in entries(cfg):
        where = f" (with {e.schedule})" if e.schedule else ""
        shown = f"unused, {value.why}" if isinstance(value, Unused) else _scalar(value)
        blocks.append(f"{e.key}{where}: {shown}\n    {e.type}; default {e.default}\n{indented(e.description)}")
    return "\n\n".join(blocks) + "\n"


def rewrite(text: str) -> str:
    """`text` (docs/training.md) with the table between START and END regenerated."""
    before, start, rest = text.partition(START)
    _, end, after = rest.partition(END)
    if not (start and end):
        raise ValueError(f"the table's markers are missing: {START!r} ... {END!r}")
    # Blank lines around the table, so that no renderer reads a marker as one of its rows.
    return f"{before}{START}\n\n{markdown()}\n{END}{after}"


if __name__ == "__main__":
    for path in map(Path, sys.argv[1:] or [DEFAULT_TARGET]):
        path.write_text(rewrite(path.read_text()))
