"""Prompt templates: `{column}` placeholders over a row, `{{` and `}}` for literal braces.

Pure: no I/O. A template is parsed once when the spec loads, so a placeholder naming a
column the input lacks is refused before any request is sent, and rendering a row is a
plain join of precomputed parts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any


class TemplateError(ValueError):
    """A template that cannot be parsed; `position` is the 0-based offset of the fault."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class Placeholder:
    column: str


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and placeholders, in order."""

    source: str
    parts: tuple[str | Placeholder, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns the template reads, in order of first use."""
        seen: dict[str, None] = {}
        for part in self.parts:
            if isinstance(part, Placeholder):
                seen.setdefault(part.column)
        return tuple(seen)

    @cached_property
    def _compiled(self) -> tuple[str, tuple[str, ...]]:
        """The template as a str.format pattern over positional values: rendering a million
        rows is then one C-level format call each instead of a Python loop over parts."""
        pattern = "".join(
            part.replace("{", "{{").replace("}", "}}") if isinstance(part, str) else "{}" for part in self.parts
        )
        return pattern, tuple(part.column for part in self.parts if isinstance(part, Placeholder))

    def render(self, row: Mapping[str, Any]) -> str:
        pattern, columns = self._compiled
        return pattern.format(*[format_value(row[column]) for column in columns])

    @property
    def single_column(self) -> str | None:
        """The column when the template is one placeholder and nothing else."""
        return self.parts[0].column if len(self.parts) == 1 and isinstance(self.parts[0], Placeholder) else None

    def value(self, row: Mapping[str, Any]) -> Any:
        """The cell itself when the template is one placeholder (bytes stay bytes), else the rendered text."""
        column = self.single_column
        return row[column] if column is not None else self.render(row)


def format_value(value: Any) -> str:
    """How a cell appears in a prompt: null is empty, lists and structs are JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def parse_template(source: str) -> Template:
    """Split `source` into literal text and `{column}` placeholders."""
    parts: list[str | Placeholder] = []
    literal: list[str] = []
    i, n = 0, len(source)
    while i < n:
        char = source[i]
        if char == "{":
            if source.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            end = source.find("}", i + 1)
            inner_open = source.find("{", i + 1)
            if end == -1 or (inner_open != -1 and inner_open < end):
                raise TemplateError("'{' is not closed; write '{{' for a literal brace", i)
            column = source[i + 1 : end]
            if not column.strip():
                raise TemplateError("empty placeholder '{}'; name a column, or write '{{}}' for literal braces", i)
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(Placeholder(column))
            i = end + 1
        elif char == "}":
            if source.startswith("}}", i):
                literal.append("}")
                i += 2
                continue
            raise TemplateError("'}' without a matching '{'; write '}}' for a literal brace", i)
        else:
            literal.append(char)
            i += 1
    if literal:
        parts.append("".join(literal))
    return Template(source, tuple(parts))


MEDIA_PARTS = {  # a content part's type -> (the field of its object that holds the media, the kind of media)
    "image_url": ("url", "image"),
    "file": ("file_data", "file"),
    "input_audio": ("data", "audio"),
    "video_url": ("url", "video"),
}


@dataclass(frozen=True)
class MediaValue:
    """A media field rendered from a row, before media.py resolves it into a URL or file content."""

    kind: str  # image, file, audio or video
    value: Any  # the cell (bytes stay bytes), or the rendered text
    column: str | None  # the column, when the field is one placeholder


@dataclass(frozen=True)
class PartTemplate:
    """One content part of a message: `text`, or a media part whose fields are templates."""

    type: str  # text, image_url, file, input_audio, video_url
    fields: tuple[tuple[str, Template], ...]  # the part's fields (a media part: its object's fields)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(column for _, template in self.fields for column in template.columns)

    def render(self, row: Mapping[str, Any]) -> dict[str, Any]:
        if self.type == "text":
            return {"type": "text", "text": self.fields[0][1].render(row)}
        media_field, kind = MEDIA_PARTS[self.type]
        inner: dict[str, Any] = {}
        for name, template in self.fields:
            if name == media_field:
                inner[name] = MediaValue(kind, template.value(row), template.single_column)
            else:
                inner[name] = template.render(row)
        return {"type": self.type, self.type: inner}


@dataclass(frozen=True)
class MessageTemplate:
    role: str
    content: Template | tuple[PartTemplate, ...]  # text, or a list of content parts

    @property
    def templates(self) -> list[Template]:
        if isinstance(self.content, Template):
            return [self.content]
        return [template for part in self.content for _, template in part.fields]

    def render(self, row: Mapping[str, Any]) -> str | list[dict[str, Any]]:
        if isinstance(self.content, Template):
            return self.content.render(row)
        return [part.render(row) for part in self.content]


@dataclass(frozen=True)
class PromptTemplate:
    """Everything a request's prompt is made of: chat messages, or one raw completion prompt."""

    messages: tuple[MessageTemplate, ...] = ()
    text: Template | None = None  # the `completions` endpoint's raw prompt

    @property
    def columns(self) -> tuple[str, ...]:
        templates = [t for m in self.messages for t in m.templates] + ([self.text] if self.text else [])
        seen: dict[str, None] = {}
        for template in templates:
            for column in template.columns:
                seen.setdefault(column)
        return tuple(seen)

    @property
    def media_kinds(self) -> set[str]:
        """The kinds of media the prompt's parts carry (image, file, audio, video)."""
        return {kind for kind, _ in self.media_fields()}

    def media_fields(self) -> list[tuple[str, Template]]:
        """(kind, template) of each media field of the prompt's parts."""
        found = []
        for m in self.messages:
            if isinstance(m.content, Template):
                continue
            for part in m.content:
                if part.type in MEDIA_PARTS:
                    media_field, kind = MEDIA_PARTS[part.type]
                    found += [(kind, template) for name, template in part.fields if name == media_field]
        return found

    def render_messages(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The messages for a row; a media part's field holds a MediaValue for media.py to resolve."""
        return [{"role": m.role, "content": m.render(row)} for m in self.messages]

    def render_text(self, row: Mapping[str, Any]) -> str:
        assert self.text is not None, "render_text needs a completions template"
        return self.text.render(row)
