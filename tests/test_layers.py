"""The package's shape, read from its source: no import circles, no private names across modules,
short files, no project history in docstrings or comments, and process-wide state named in one
place (tandem/settings.py's docstring).

The import graph is built with ``ast`` from every ``.py`` file under tandem/.
Every import statement is an edge, at module level and inside functions
alike (a function-local import only hides a circle until the function runs);
only imports under ``if TYPE_CHECKING:`` are left out: they never run and
only name types for annotations.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tandem"
MAX_LINES = 400

# Known exceptions, all in tandem/lm, that the LM-contract work of issue #17 removes
# (lm/base <-> lm/cache through a function-local import; the backends importing
# train.adapter while train imports lm.models and lm.hardware; vllm_server using
# vllm's private _cuda_available; lm/openai.py and lm/vllm.py doing several jobs).
# Each test fails when an entry is no longer true, so the lists only shrink:
# delete the entry in the change that removes it.
KNOWN_LM_CYCLES: list[set[str]] = []
KNOWN_LM_PACKAGE_EDGES: set[tuple[str, str]] = set()  # (importer, imported)
KNOWN_LM_PRIVATE: set[str] = set()
KNOWN_LONG_LM_FILES: set[str] = set()

HISTORY = re.compile(
    r"\bsessions? \d|\b(until|since|before|after) session\b|\b(earlier|previous|this|that) session"
    r"|\brounds? \d+ measured|\bmeasured in (session|round)\b",
    re.IGNORECASE,
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the tandem modules it imports, private names imported or used across modules)."""
    edges: dict[str, set[str]] = {}
    private: list[str] = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        targets: set[str] = set()
        aliases: dict[str, str] = {}  # local name -> a tandem module it is bound to
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES:
                        targets.add(a.name)
                        if a.asname:
                            aliases[a.asname] = a.name
                continue
            source = _absolute(mod, path.name == "__init__.py", node.level, node.module)
            if source not in MODULES:
                continue
            for a in node.names:
                sub = f"{source}.{a.name}"
                if sub in MODULES:
                    targets.add(sub)
                    aliases[a.asname or a.name] = sub
                    continue
                targets.add(source)
                if a.name.startswith("_") and not a.name.startswith("__") and source != mod:
                    private.append(f"{mod} imports {a.name} from {source}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                private.append(f"{mod} uses {aliases[node.value.id]}.{node.attr}")
        edges[mod] = targets - {mod}
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected sets of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    n = stack.pop()
                    on_stack.discard(n)
                    group.add(n)
                    if n == node:
                        break
                if len(group) > 1:
                    found.append(group)
    return found


def package_of(module: str) -> str:
    """``tandem.lm.vllm`` -> ``tandem.lm``; a top-level module (``tandem.serve``) is its own package."""
    return ".".join(module.split(".")[:2])


def package_graph(edges: dict[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    """package -> {package it imports: the module edges that make it}."""
    out: dict[str, dict[str, list[str]]] = {package_of(m): {} for m in edges}
    for a, targets in edges.items():
        for b in targets:
            pa, pb = package_of(a), package_of(b)
            if pa != pb and pa != "tandem":  # tandem/__init__.py re-exports the public API
                out[pa].setdefault(pb, []).append(f"{a} -> {b}")
    return out


def _describe(group: set[str], edges: dict[str, set[str]]) -> str:
    return "; ".join(f"{a} -> {', '.join(sorted(edges[a] & group))}" for a in sorted(group))


def test_the_graph_sees_function_local_imports_and_skips_type_checking_ones(tmp_path):
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
                     "def f():\n    import b\nimport c\n")
    names = sorted(n.names[0].name for n in _imports(tree))
    assert names == ["TYPE_CHECKING", "b", "c"]  # ``import a`` under TYPE_CHECKING is not an edge
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    edges, _ = import_graph()
    all_found = cycles(edges)
    found = [g for g in all_found if g not in KNOWN_LM_CYCLES]
    assert not found, "import circles:\n" + "\n".join(_describe(g, edges) for g in found)
    gone = [g for g in KNOWN_LM_CYCLES if g not in all_found]
    assert not gone, f"no longer a circle, delete it from KNOWN_LM_CYCLES: {gone}"


def test_no_package_cycles():
    """The packages (and top-level modules) form layers: no two import each other, even through others."""
    edges, _ = import_graph()
    pkgs = package_graph(edges)
    gone = {(p, q) for p, q in KNOWN_LM_PACKAGE_EDGES if q not in pkgs.get(p, {})}
    assert not gone, f"no longer imported, delete it from KNOWN_LM_PACKAGE_EDGES: {sorted(gone)}"
    pkg_edges = {p: {q for q in targets if (p, q) not in KNOWN_LM_PACKAGE_EDGES} for p, targets in pkgs.items()}
    found = cycles(pkg_edges)
    assert not found, "package circles:\n" + "\n".join(
        f"{sorted(g)}: " + "; ".join(e for p in sorted(g) for q in sorted(pkg_edges[p] & g) for e in pkgs[p][q][:3])
        for g in found)


def test_no_private_names_across_modules():
    _, private = import_graph()
    unexpected = [x for x in private if x not in KNOWN_LM_PRIVATE]
    assert not unexpected, "private names used across modules:\n" + "\n".join(unexpected)
    gone = KNOWN_LM_PRIVATE - set(private)
    assert not gone, f"no longer used, delete it from KNOWN_LM_PRIVATE: {sorted(gone)}"


def test_no_file_over_the_line_limit():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    unexpected = {p: n for p, n in long.items() if p not in KNOWN_LONG_LM_FILES}
    assert not unexpected, f"files over {MAX_LINES} lines: {unexpected}"
    gone = KNOWN_LONG_LM_FILES - set(long)
    assert not gone, f"no longer over {MAX_LINES} lines (or gone), delete from KNOWN_LONG_LM_FILES: {sorted(gone)}"


def test_no_project_history_in_docstrings_or_comments():
    """Docstrings and comments say what the code does; measurement history lives in docs/."""
    found = []
    for path in ROOT.rglob("*.py"):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING) and HISTORY.search(tok.string):
                found.append(f"{path.relative_to(ROOT.parent)}:{tok.start[0]}: {HISTORY.search(tok.string).group(0)!r}")
    assert not found, "project history in code (move it to docs/):\n" + "\n".join(found)


def test_the_history_pattern_catches_history_and_not_code():
    for text in ("sessions 1-3 used 6", "until session 4 its demo", "an earlier session's runs",
                 "round 2 measured 1.3x"):
        assert HISTORY.search(text), text
    for text in ("its own session, so signals", "rounds the score to 1 decimal", "the last round of sampling",
                 "start_new_session=True"):
        assert not HISTORY.search(text), text


# -- process-wide state ----------------------------------------------------------------------------
NOT_STATE_CALLS = re.compile(r"(logging\.getLogger|contextvars\.ContextVar|threading\.R?Lock|re\.compile|TypeVar)\b")
MUTATORS = {"append", "extend", "add", "update", "setdefault", "pop", "popitem", "clear", "remove", "discard",
            "insert", "set"}


def process_state() -> set[str]:
    """``module.name`` of each module-level object that holds state for the whole process: a name
    rebound with ``global``, a container or object the module changes (``NAME[k] = v``,
    ``NAME.append(...)``, ``NAME.set()``), a value read from the environment at import, or an
    object built at import under a lowercase name (``console = Console()``)."""
    found = set()
    for mod, path in MODULES.items():
        text = path.read_text()
        tree = ast.parse(text)
        top: dict[str, ast.AST] = {}
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name) and not t.id.startswith("__") and node.value is not None:
                    top[t.id] = node.value
        changed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                changed.update(node.names)
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                for t in node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]:
                    if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
                        changed.add(t.value.id)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS
                  and isinstance(node.func.value, ast.Name)):
                changed.add(node.func.value.id)
        for name, value in top.items():
            src = ast.get_source_segment(text, value) or ""
            from_env = "environ" in src or "getenv" in src
            built = name.lstrip("_")[:1].islower() and isinstance(value, ast.Call)
            if NOT_STATE_CALLS.match(src):  # a logger, a lock, a pattern, or a context variable (per context)
                continue
            if name in changed or from_env or built:
                found.add(f"{mod}.{name}")
    return found - {"tandem.settings.settings"}


def named_in_settings() -> set[str]:
    doc = ast.get_docstring(ast.parse((ROOT / "settings.py").read_text())) or ""
    return {m for m in re.findall(r"``(tandem(?:\.\w+)+)``", doc)
            if m not in MODULES and m.rsplit(".", 1)[0] in MODULES}


def test_process_wide_state_is_named_in_settings():
    """settings.py's docstring lists every piece of process-wide state; the list is neither short nor stale."""
    state, named = process_state(), named_in_settings()
    assert not state - named, f"process-wide state not named in tandem/settings.py's docstring: {sorted(state - named)}"
    assert not named - state, f"tandem/settings.py names state that is not there (any more): {sorted(named - state)}"
