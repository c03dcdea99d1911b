"""Griffe extensions for the API reference: option help as docs, and plain Sphinx roles.

Options are declared as ``batch_size: int = opt(64, "per-worker batch size")``
(:mod:`resdistill.fields`); their help lives in the ``opt`` call rather than in a docstring.
This extension (mkdocs.yml, mkdocstrings ``extensions``) makes that help the attribute's
docstring and shows the default alone as its value, so the reference lists every option with
the same text and default as ``--help``. Help given as anything but a string literal is left out.

The docstrings cross-reference with Sphinx roles (``:func:`train```); the site renders Markdown,
so :class:`PlainRoles` shows them as code (``train``) instead of raw role markup.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from griffe import Attribute, Docstring, Extension


class OptHelp(Extension):
    """Turns ``opt(default, "help", ...)`` field values into a default and a docstring."""

    def on_attribute_instance(self, *, node: Any, attr: Attribute, **_: Any) -> None:
        call = getattr(node, "value", None)
        if not (isinstance(node, ast.AnnAssign) and isinstance(call, ast.Call)):
            return
        if not (isinstance(call.func, ast.Name) and call.func.id == "opt"):
            return
        args = list(call.args)
        help_node = (
            args[1]
            if len(args) > 1
            else next((k.value for k in call.keywords if k.arg == "help"), None)
        )
        literal = isinstance(help_node, ast.Constant) and isinstance(help_node.value, str)
        if literal and attr.docstring is None:
            attr.docstring = Docstring(help_node.value, parent=attr)
        default = (
            args[0] if args else next((k.value for k in call.keywords if k.arg == "default"), None)
        )
        attr.value = ast.unparse(default) if default is not None else None


#: ``:role:`target``` or ``:role:`~target``` of a Sphinx-style docstring
ROLE = re.compile(r":(?:py:)?[a-z]+:`~?([^`]+)`")


class PlainRoles(Extension):
    """Docstrings' Sphinx roles (``:func:`x```) become inline code (```x```)."""

    def on_instance(self, *, obj: Any, **_: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
