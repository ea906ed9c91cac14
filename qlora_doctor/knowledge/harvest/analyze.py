"""What a release's code imports and defines, read with `ast` (its code is never run).

Two questions, answered conservatively (a false "breaks" is worse than a missed one):

- `runtime_imports(code, entries, targets)`: the `from B.mod import name` statements that run when the
  `entries` modules are imported: module-level statements only, following the package's own unguarded imports.
  Skipped: anything under `try:` (its handlers and `else:` too), under any `if` (availability checks,
  version checks; the `else:` of `if TYPE_CHECKING:` does run and is followed), in loops, functions and classes.
- `Defines(code, module).has(name)`: whether `from module import name` can succeed, read generously: a name
  bound in any branch, a submodule, a star import resolved inside the package, and for lazy modules
  (transformers' `_LazyModule`, huggingface_hub's `_attach`, `define_import_structure`) every identifier-like
  string of the module plus the `__all__` lists of the package's files. `None` (unknown) where the module
  computes its names in ways not read here (a hand-written `__getattr__`, a compiled module, a star import
  from another package): such a release is never said to lack the name.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from typing import Protocol

DOTTED = re.compile(r"[A-Za-z_][\w.]*\Z")
ALL_LIST = re.compile(r"^__all__\s*(?::[^=]*)?[+]?=\s*[\[(]([^\])]*)[\])]", re.MULTILINE)
LAZY_CALLS = {"_LazyModule", "_attach", "attach", "lazy_import", "LazyModule"}


class Files(Protocol):
    names: frozenset[str]

    def read(self, member: str) -> bytes: ...


@dataclass(frozen=True)
class ImportSite:
    target: str
    """The module imported from: `accelerate.utils.memory`."""
    name: str
    file: str
    """The importing file, as in the wheel: `peft/utils/loftq_utils.py`."""
    line: int


class Code:
    """A wheel's Python modules by dotted name, parsed once each."""

    def __init__(self, files: Files):
        self.files = files
        self.paths: dict[str, str] = {}
        self.compiled: set[str] = set()
        for name in files.names:
            if ".dist-info/" in name or ".data/" in name:
                continue
            if name.endswith(".py"):
                parts = name[:-3].split("/")
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                self.paths[".".join(parts)] = name
            elif name.endswith((".so", ".pyd")):
                parts = name.split("/")
                parts[-1] = parts[-1].split(".")[0]
                self.compiled.add(".".join(parts))
        self._trees: dict[str, ast.Module | None] = {}
        self._sources: dict[str, str] = {}

    def is_package(self, module: str) -> bool:
        return self.paths.get(module, "").endswith("__init__.py")

    def exists(self, module: str) -> bool:
        return module in self.paths or module in self.compiled

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.paths.get(module)
            try:
                self._trees[module] = ast.parse(self.source(path)) if path else None
            except (SyntaxError, ValueError):
                self._trees[module] = None
        return self._trees[module]

    def source(self, path: str) -> str:
        if path not in self._sources:
            self._sources[path] = self.files.read(path).decode("utf-8", "replace")
        return self._sources[path]

    def children(self, module: str) -> set[str]:
        prefix = module + "."
        return {m[len(prefix):].split(".")[0] for m in (*self.paths, *self.compiled) if m.startswith(prefix)}

    def resolve(self, module: str, node: ast.ImportFrom) -> str:
        """The absolute module a `from ... import` in `module` names."""
        if not node.level:
            return node.module or ""
        package = module if self.is_package(module) else module.rpartition(".")[0]
        base = package.split(".")
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))


# --- imports that run ---------------------------------------------------------------------------

def _is_type_checking(test: ast.expr) -> bool:
    return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def _unguarded(body: list[ast.stmt]):
    """Module-level statements that always run: see the module docstring for what counts as guarded."""
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
            yield from _unguarded(stmt.orelse)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            yield from _unguarded(stmt.body)
        elif isinstance(stmt, ast.Try) and stmt.finalbody:
            yield from _unguarded(stmt.finalbody)


def runtime_imports(code: Code, entries: tuple[str, ...], targets: set[str]) -> list[ImportSite]:
    """`from B... import name` sites (B's top-level name in `targets`) that importing `entries` runs."""
    top = next(iter(entries)).split(".")[0]
    queue = [e for e in entries if code.exists(e)]
    for entry in list(queue):  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = entry.split(".")
        queue += [".".join(parts[:i]) for i in range(1, len(parts))]
    seen: set[str] = set()
    sites: list[ImportSite] = []
    while queue:
        module = queue.pop()
        if module in seen:
            continue
        seen.add(module)
        tree = code.tree(module)
        if tree is None:
            continue
        for stmt in _unguarded(tree.body):
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.name.split(".")[0] == top:
                        parts = alias.name.split(".")
                        queue += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
                continue
            target = code.resolve(module, stmt)
            head = target.split(".")[0]
            if head == top:
                parts = target.split(".")
                queue += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
                queue += [f"{target}.{a.name}" for a in stmt.names if code.exists(f"{target}.{a.name}")]
            elif head in targets and not stmt.level:
                sites += [ImportSite(target, a.name, code.paths[module], stmt.lineno)
                          for a in stmt.names if a.name != "*"]
    return sorted(set(sites), key=lambda s: (s.file, s.line, s.name))


# --- names a module defines ---------------------------------------------------------------------

def _bound_names(body: list[ast.stmt], names: set[str], stars: list[ast.ImportFrom], imports: list[ast.ImportFrom]) -> None:
    """Every name a statement list binds at module level, in any branch (functions and classes: their own name)."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        elif isinstance(stmt, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            imports.append(stmt)
            for alias in stmt.names:
                if alias.name == "*":
                    stars.append(stmt)
                else:
                    names.add(alias.asname or alias.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.For, ast.AsyncFor, ast.With,
                               ast.AsyncWith)):
            targets = (stmt.targets if isinstance(stmt, ast.Assign) else
                       [stmt.target] if isinstance(stmt, (ast.AnnAssign, ast.AugAssign, ast.For, ast.AsyncFor)) else
                       [item.optional_vars for item in stmt.items if item.optional_vars is not None])
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        for child in ("body", "orelse", "finalbody"):
            if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and hasattr(stmt, child):
                _bound_names(getattr(stmt, child), names, stars, imports)
        for handler in getattr(stmt, "handlers", []):
            if handler.name:
                names.add(handler.name)
            _bound_names(handler.body, names, stars, imports)
        for case in getattr(stmt, "cases", []):
            _bound_names(case.body, names, stars, imports)
    for node in (n for stmt in body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 for n in ast.walk(stmt) if isinstance(n, ast.NamedExpr)):
        names.add(node.target.id)


class Defines:
    """The names `from module import name` finds in one release (module docstring: how generously)."""

    def __init__(self, code: Code, module: str, _depth: int = 0):
        self.code, self.module = code, module
        self.names: set[str] = set()
        self.closed = True
        self.missing = False
        """The module does not exist in this release (the import fails with ModuleNotFoundError)."""
        self.all: list[str] | None = None
        self._package_all = False
        top = module.split(".")[0]
        if module in code.compiled:
            self.closed = False
            return
        tree = code.tree(module)
        if tree is None:
            aliases = _strings(code.tree(top)) if module != top else set()
            if module in code.paths:  # a file that does not parse
                self.closed = False
            elif module in aliases or module[len(top) + 1:] in aliases:
                self.closed = False  # an alias the package registers in sys.modules (transformers 5)
            else:
                self.missing = True
            return
        stars: list[ast.ImportFrom] = []
        imports: list[ast.ImportFrom] = []
        _bound_names(tree.body, self.names, stars, imports)
        self.names |= code.children(module)
        for stmt in tree.body:
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and any(
                    isinstance(t, ast.Name) and t.id == "__all__" for t in
                    (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])):
                try:
                    value = ast.literal_eval(stmt.value) if stmt.value is not None else None
                except ValueError:
                    value = None
                self.all = [v for v in value if isinstance(v, str)] if isinstance(value, (list, tuple)) else None
        calls = {getattr(n.func, "id", getattr(n.func, "attr", None)) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        lazy = bool(calls & LAZY_CALLS) or "__getattr__" in self._assigned(tree)
        if lazy:
            self.names |= _strings(tree)
            self._package_all = "define_import_structure" in calls or "_import_structure" in self.names
        elif any(isinstance(s, ast.FunctionDef) and s.name == "__getattr__" for s in tree.body):
            self.closed = False
        for node in ast.walk(tree):  # [n for n in dir(dummy_pt_objects)]: the names of that module
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dir" and node.args and \
                    isinstance(node.args[0], ast.Name):
                origin = self._origin(imports, node.args[0].id)
                if origin and _depth < 8:
                    self.names |= Defines(code, origin, _depth + 1).names
        for star in stars:
            if self._package_all:  # a lazy module's `if TYPE_CHECKING:` star imports: its __all__ lists cover them
                break
            origin = code.resolve(module, star)
            if origin.split(".")[0] != top or _depth >= 8:
                self.closed = False
                continue
            inner = Defines(code, origin, _depth + 1)
            self.closed = self.closed and inner.closed
            self.names |= set(inner.all) if inner.all is not None else {n for n in inner.names if not n.startswith("_")}
            self._package_all = self._package_all or inner._package_all

    def _origin(self, imports: list[ast.ImportFrom], name: str) -> str | None:
        for stmt in imports:
            for alias in stmt.names:
                if (alias.asname or alias.name) == name:
                    candidate = f"{self.code.resolve(self.module, stmt)}.{alias.name}"
                    return candidate if self.code.exists(candidate) else None
        return None

    @staticmethod
    def _assigned(tree: ast.Module) -> set[str]:
        found = set()
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign):
                found.update(n.id for t in stmt.targets for n in ast.walk(t) if isinstance(n, ast.Name))
        return found

    @functools.cached_property
    def _all_lists(self) -> set[str]:
        """Every string of every `__all__` list in the package's files (define_import_structure reads them)."""
        top = self.module.split(".")[0] + "/"
        found: set[str] = set()
        for path in self.code.paths.values():
            if path.startswith(top):
                text = self.code.source(path)
                if "__all__" in text:
                    for block in ALL_LIST.findall(text):
                        found.update(re.findall(r"['\"]([A-Za-z_][A-Za-z0-9_]*)['\"]", block))
        return found

    def has(self, name: str) -> bool | None:
        """True: importable; False: this release lacks it (a closed module, or no such module); None: unknown."""
        if self.missing:
            return False
        if name in self.names:
            return True
        if self._package_all and name in self._all_lists:
            return True
        return False if self.closed else None


def _strings(tree: ast.Module | None) -> set[str]:
    if tree is None:
        return set()
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and DOTTED.match(n.value)}
