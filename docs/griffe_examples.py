"""Griffe extension for the API reference: gradsafe's docstrings head their doctests with
``Example:`` (singular), which Griffe's Google parser reads as an admonition (plain Markdown)
instead of an examples section (code blocks). Rename the heading before parsing."""

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
