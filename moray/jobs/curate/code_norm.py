"""Code normalization: canonical formatting of Python sources, optional identifier standardization,
and a dedup key on the normalized form so reformatted and renamed clones are caught.

Canonical form = `ast.unparse(ast.parse(src))` with docstrings removed: comments, blank lines,
quoting and spacing disappear. With `standardize_identifiers`, local names (function and class
names, arguments, assigned variables) become v0, v1, ... in order of first appearance; builtins,
imported names and attributes keep their names, so `sorted(x)` stays `sorted`.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
from dataclasses import dataclass

_BUILTINS = frozenset(dir(builtins))


@dataclass
class CodeNormConfig:
    enabled: bool = True
    standardize_identifiers: bool = True
    strip_docstrings: bool = True


class _Renamer(ast.NodeTransformer):
    def __init__(self, keep: set[str]):
        self.keep = keep
        self.names: dict[str, str] = {}

    def _new(self, name: str) -> str:
        if name in self.keep or name in _BUILTINS or (name.startswith("__") and name.endswith("__")):
            return name
        return self.names.setdefault(name, f"v{len(self.names)}")

    def visit_Name(self, node):
        node.id = self._new(node.id)
        return node

    def visit_arg(self, node):
        node.arg = self._new(node.arg)
        node.annotation = None
        return node

    def _visit_def(self, node):
        node.name = self._new(node.name)
        self.generic_visit(node)
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_def


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(getattr(body[0], "value", None), ast.Constant)
            ):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]


def normalize_python(src: str, cfg: CodeNormConfig | None = None) -> str | None:
    """Canonical source, or None when it does not parse (Python 2, templates...)."""
    cfg = cfg or CodeNormConfig()
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError, RecursionError):
        return None
    if cfg.strip_docstrings:
        _strip_docstrings(tree)
    if cfg.standardize_identifiers:
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                imported.update((a.asname or a.name).split(".")[0] for a in node.names)
        tree = _Renamer(imported).visit(tree)
    try:
        return ast.unparse(tree)
    except (ValueError, RecursionError):
        return None


def code_key(text: str, lang: str, cfg: CodeNormConfig) -> str | None:
    """Dedup key of a source file on its normalized form (None: not normalizable)."""
    if lang != "python":
        return None
    norm = normalize_python(text, cfg)
    return None if norm is None else "code:" + hashlib.blake2b(norm.encode(), digest_size=12).hexdigest()
