"""A griffe extension for the API pages: the reST of numpydoc docstrings, rendered as Markdown.

The docstrings follow numpydoc, whose cross-references are reST roles (``:func:`forward_train```,
``:meth:`~BatchNorm.backward```) and whose literal blocks are introduced by ``::``. Python's
``help()`` shows them as they are; mkdocstrings renders docstrings as Markdown, where both would
appear raw. This extension rewrites each docstring once the package is loaded:

- a role becomes a cross-reference to the object's page (the name is resolved from where the
  docstring stands, then through aliases to the object's own path, so ``batchnorm.precise_bn``
  links to ``batchnorm.precise.precise_bn``); a name the site does not document stays code;
- ``text::`` before an indented block becomes ``text:``, and a lone ``::`` disappears, as in
  Sphinx; the indented block is a code block in Markdown already.

Used by mkdocs.yml (``extensions`` of the mkdocstrings python handler); the source files are
not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")
LITERAL_MARKER = re.compile(r"(\s*)::[ \t]*$", re.MULTILINE)


class RestRoles(griffe.Extension):
    """Rewrite every docstring of the package for Markdown."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = to_markdown(obj.docstring.value, obj, pkg)


def _objects(obj: griffe.Object) -> list[griffe.Object]:
    """obj and every object defined in it (aliases are documented where they point)."""
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found.extend(_objects(member))  # type: ignore[arg-type]
    return found


def to_markdown(text: str, obj: griffe.Object, pkg: griffe.Module) -> str:
    """The docstring `text` of `obj` with roles as cross-references and no ``::`` markers."""

    def role(match: re.Match[str]) -> str:
        short, name = match[1] == "~", match[2].strip()
        shown = name.rsplit(".", 1)[-1] if short else name
        target = _resolve(name.lstrip("."), obj, pkg)
        return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'

    def marker(match: re.Match[str]) -> str:
        # "text::" -> "text:", "text ::" -> "text", "::" alone -> "" (Sphinx's rules)
        start = match.start()
        alone = start == 0 or text[start - 1] == "\n"
        return "" if alone or match[1] else ":"

    return LITERAL_MARKER.sub(marker, ROLE.sub(role, text))


def _resolve(name: str, obj: griffe.Object, pkg: griffe.Module) -> str:
    """The path under which the site documents `name`, as seen from `obj` (best effort)."""
    head, _, rest = name.partition(".")
    if head != pkg.name:
        try:
            head = obj.resolve(head)
        except Exception:  # a name from outside the package: leave it as written
            return name
    path = f"{head}.{rest}" if rest else head
    try:
        found = pkg.get_member(path.removeprefix(pkg.name + ".")) if path != pkg.name else pkg
        return str(found.final_target.path if found.is_alias else found.path)
    except Exception:
        return path
