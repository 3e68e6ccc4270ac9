"""Architecture figures of ``canary``: counts, import edges, largest classes and functions.

Usage::

    python scripts/arch_stats.py [--root canary] [--top 5] [--edges]

Prints the number of modules and packages, the median and largest module sizes, the import
edges between top-level units (``canary.proxy``, ``canary.controller``, ...; imports inside
``if TYPE_CHECKING:`` counted separately), the classes with the most lines and methods, and
the longest functions. ``docs/architecture.md`` quotes these figures; rerun to refresh them.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
from pathlib import Path


def _unit(module: str) -> str:
    """``canary.proxy.server`` -> ``proxy``; ``canary.cli`` -> ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.Module, package: str) -> list[tuple[str, bool]]:
    """Every ``canary`` module imported, with whether it is under ``if TYPE_CHECKING``."""
    out: list[tuple[str, bool]] = []

    def visit(nodes: list[ast.stmt], typing_only: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _type_checking(node):
                visit(node.body, True)
                visit(node.orelse, typing_only)
                continue
            if isinstance(node, ast.Import):
                out.extend((a.name, typing_only) for a in node.names if a.name.startswith(package))
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and node.module.startswith(package)
            ):
                out.append((node.module, typing_only))
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child], typing_only)

    visit(tree.body, False)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="canary", help="package directory (default: canary)")
    ap.add_argument("--top", type=int, default=5, help="how many classes/functions to list")
    ap.add_argument("--edges", action="store_true", help="list every edge between units")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    package = root.name
    files = sorted(root.rglob("*.py"))
    sizes: dict[str, int] = {}
    edges: set[tuple[str, str]] = set()
    typing_edges: set[tuple[str, str]] = set()
    classes: list[tuple[int, int, str]] = []
    functions: list[tuple[int, str]] = []
    no_all: list[str] = []
    for path in files:
        name = _module_name(root, path)
        text = path.read_text()
        sizes[name] = len(text.splitlines())
        tree = ast.parse(text)
        if not any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
            for n in tree.body
        ):
            no_all.append(name)
        src = _unit(name)
        for target, typing_only in imports(tree, package):
            dst = _unit(target) if target != package else package
            if dst != src and dst != package:
                (typing_edges if typing_only else edges).add((src, dst))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                methods = sum(
                    isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in node.body
                )
                span = (node.end_lineno or node.lineno) - node.lineno + 1
                classes.append((span, methods, f"{name}.{node.name}"))
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                span = (node.end_lineno or node.lineno) - node.lineno + 1
                functions.append((span, f"{name}.{node.name}"))
    packages = [p for p in files if p.name == "__init__.py"]
    units = sorted({_unit(n) for n in sizes if n != package})
    types_only = typing_edges - edges
    print(f"modules: {len(files)}   packages: {len(packages)}   top-level units: {len(units)}")
    print(
        f"module lines: median {statistics.median(sizes.values()):.0f}, "
        f"largest {max(sizes.values())} ({max(sizes, key=lambda k: sizes[k])}), "
        f"total {sum(sizes.values())}"
    )
    print(f"modules without __all__: {len(no_all)} of {len(files)}")
    print(
        f"import edges between top-level units: {len(edges)} "
        f"(+{len(types_only)} under TYPE_CHECKING only)"
    )
    if args.edges:
        for src in units:
            out = sorted(d for s, d in edges if s == src)
            typ = sorted(d for s, d in types_only if s == src)
            extra = f"   (types: {', '.join(typ)})" if typ else ""
            print(f"  {src:<12} -> {', '.join(out) or '-'}{extra}")
    print("largest classes (lines, methods):")
    for span, methods, qual in sorted(classes, reverse=True)[: args.top]:
        print(f"  {span:5d} {methods:3d}  {qual}")
    print("longest functions (lines):")
    for span, qual in sorted(functions, reverse=True)[: args.top]:
        print(f"  {span:5d}  {qual}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
