"""Prompt templates: placeholders, literal braces, and refusals."""

from __future__ import annotations

import pytest

from batchrunner.prompt import MessageTemplate, PromptTemplate, TemplateError, format_value, parse_template


def test_render_substitutes_columns_in_order() -> None:
    """Each {column} is replaced by the row's value; text around it is kept."""
    template = parse_template("Ticket {id}: {text} ({id})")
    assert template.columns == ("id", "text")
    assert template.render({"id": "T-1", "text": "broken"}) == "Ticket T-1: broken (T-1)"


def test_doubled_braces_are_literal() -> None:
    """{{ and }} render as single braces and are not placeholders, so JSON examples survive."""
    template = parse_template('Reply as {{"label": "..."}} for {text}')
    assert template.columns == ("text",)
    assert template.render({"text": "x"}) == 'Reply as {"label": "..."} for x'


@pytest.mark.parametrize(
    ("source", "position"),
    [("Hello {name", 6), ("a } b", 2), ("empty {} here", 6), ("nested {a{b}}", 7)],
)
def test_malformed_templates_are_refused_with_position(source: str, position: int) -> None:
    """An unclosed, stray, empty or nested brace is an error that points at the character."""
    with pytest.raises(TemplateError) as info:
        parse_template(source)
    assert info.value.position == position


def test_values_are_formatted_for_prompts() -> None:
    """Nulls render empty, numbers as text, lists and structs as JSON."""
    assert format_value(None) == ""
    assert format_value(3.5) == "3.5"
    assert format_value(["a", 1]) == '["a", 1]'
    assert format_value({"k": "é"}) == '{"k": "é"}'


def test_prompt_template_renders_messages_and_collects_columns() -> None:
    """A chat prompt renders every message and reports the union of its columns."""
    prompt = PromptTemplate(
        messages=(
            MessageTemplate("system", parse_template("You judge {topic}.")),
            MessageTemplate("user", parse_template("{text} about {topic}")),
        )
    )
    assert prompt.columns == ("topic", "text")
    assert prompt.render_messages({"topic": "tea", "text": "Hot"}) == [
        {"role": "system", "content": "You judge tea."},
        {"role": "user", "content": "Hot about tea"},
    ]
