"""The package's layout: no module-level import cycle in agejax/ (imports inside functions are fine)."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def module_imports(root: pathlib.Path, package: str) -> dict[str, set[str]]:
  """{module: the package's modules it imports when it is imported} for every .py file under root/package.

  Counts the statements that run at import time (module level, also under `if`/`try` and in class bodies),
  not those in function bodies; `from a.b import c` names module a.b.c where that is a module, else a.b."""
  files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
           for p in (root / package).rglob("*.py")}
  graph = {}
  for name, path in files.items():
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
      node = todo.pop()
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        continue
      if isinstance(node, ast.Import):
        out.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
          parts = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
          base = ".".join(parts + ([base] if base else []))
        out.add(base)
        out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files)
      todo.extend(ast.iter_child_nodes(node))
    graph[name] = {m for m in out if m in files and m != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_no_module_level_import_cycle():
  graph = module_imports(REPO, "agejax")
  assert "agejax.models.layers" in graph and "agejax.engine.autotune" in graph
  assert "agejax.models.layers" in graph["agejax.engine.autotune"]  # the checker sees real imports
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_a_cycle(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg.sub import b\n\ndef f():\n  from pkg import c  # lazy: no edge\n")
  (pkg / "sub" / "b.py").write_text("import os\ntry:\n  from .. import c\nexcept ImportError:\n  pass\n")
  (pkg / "c.py").write_text("def g():\n  from pkg.a import f\n")
  graph = module_imports(tmp_path, "pkg")
  assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg", "pkg.c"}
  assert graph["pkg.c"] == set() and find_cycle(graph) is None
  (pkg / "c.py").write_text("class C:\n  from pkg.a import f  # a class body runs at import time\n")
  cycle = find_cycle(module_imports(tmp_path, "pkg"))
  assert cycle == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
