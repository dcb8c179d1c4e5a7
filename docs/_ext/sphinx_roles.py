"""Griffe extension for the docs build: render Sphinx roles in cbo's docstrings as code.

cbo's numpy-style docstrings cross-reference with Sphinx roles
(:func:`hypergrad`, :class:`~cbo.kkt.KKTOperator`, ...), which Markdown would
show verbatim. This rewrites each role to an inline code span of its target
(the last dotted component when the target starts with ``~``), before
mkdocstrings parses the docstring. Loaded by mkdocs.yml; not part of the package.
"""
from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
