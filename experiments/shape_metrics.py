"""Shape metrics of the clx source tree (issue 14's before → after figures), read with ``ast``.

Command:   python experiments/shape_metrics.py [--root DIR] [--duplicates] [--import-test]
Hardware:  any; reads files only (``--duplicates`` / ``--import-test`` run those commands).
Run time:  about a second (the options add ~20 s / ~1 min).
Expected:  the figures of the closing note of issue 14 for the tree it reads.

Prints, for the package under ``DIR/clx`` (default: this repository):

* the two longest functions in the library and in ``clx/methods`` (lines from ``def`` to the
  last line of the body, decorators excluded);
* nested functions (a ``def`` inside another function's body, at any depth) in
  ``clx/methods`` and in the whole library;
* line counts of ``data/text`` (a module before the split, a package after), ``checkpoint``
  (idem) and ``train/loop.py``;
* docstring, full-type-hint and Args/Returns-section coverage of the public functions of
  the packages ``clx.methods`` and ``clx.ops`` (the package and its submodules, matched
  exactly: ``clx.methods_extra`` is not ``clx.methods``): module-level functions and methods
  of classes, whose name (and class name) does not start with ``_``. Functions of private
  modules (``clx/methods/_options.py``) are counted: they are the package's own helpers,
  held to the same standard. A function is fully typed when every parameter except
  ``self``/``cls`` (``*args``/``**kwargs`` included) and its return are annotated; its
  docstring has its sections when it has an ``Args:`` section if it takes a parameter
  (``self``/``cls`` excepted) and a ``Returns:`` (or ``Yields:``) section unless it is
  annotated ``-> None`` or is a property;
* with ``--duplicates``: the pair count of the ``duplicates`` command on ``DIR/clx``;
* with ``--import-test``: the summary line of ``pytest tests/test_imports.py`` run in ``DIR``.

To measure an older tree: ``git archive REV clx tests | tar -x -C /tmp/old`` and pass
``--root /tmp/old``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class Function:
  """One ``def`` of the tree.

  Attributes:
    module: dotted module name (``clx.methods.sparc``).
    qualname: ``Class.method`` / ``outer.inner`` / ``name``.
    lines: lines from ``def`` to the end of the body.
    nested: defined inside another function's body.
    public: module-level or class-level, with no ``_``-prefixed name on its path.
    documented: has a docstring.
    typed: every parameter (but ``self``/``cls``) and the return are annotated.
    sections: documented, with ``Args:`` / ``Returns:`` sections where it has parameters /
      a result (see the module docstring).
  """

  module: str
  qualname: str
  lines: int
  nested: bool
  public: bool
  documented: bool
  typed: bool
  sections: bool = False


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> list[ast.arg]:
  """The parameters of a ``def``, ``self``/``cls`` of a method excepted."""
  args = node.args
  positional = [*args.posonlyargs, *args.args]
  if in_class and positional and positional[0].arg in ("self", "cls"):
    positional = positional[1:]
  return [*positional, *args.kwonlyargs, *(a for a in (args.vararg, args.kwarg) if a)]


def _has_sections(node: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> bool:
  """A docstring with ``Args:`` when there are parameters and ``Returns:``/``Yields:`` when
  there is a result (not annotated ``-> None``, not a property)."""
  doc = ast.get_docstring(node)
  if doc is None:
    return False
  lines = {line.strip() for line in doc.splitlines()}
  returns_none = isinstance(node.returns, ast.Constant) and node.returns.value is None
  is_property = any(isinstance(d, ast.Name) and d.id in ("property", "cached_property")
                    or isinstance(d, ast.Attribute) and d.attr in ("property", "cached_property")
                    for d in node.decorator_list)
  needs_args = bool(_parameters(node, in_class))
  needs_returns = not (returns_none or is_property)
  return ((not needs_args or "Args:" in lines)
          and (not needs_returns or bool(lines & {"Returns:", "Yields:"})))


def _fully_typed(node: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> bool:
  """Every parameter (``self``/``cls`` of a method excepted) and the return annotated."""
  return (node.returns is not None
          and all(p.annotation is not None for p in _parameters(node, in_class)))


def functions(path: pathlib.Path, module: str) -> Iterator[Function]:
  """Every function and method defined in the file at ``path``."""
  tree = ast.parse(path.read_text(), filename=str(path))

  def visit(node: ast.AST, prefix: str, in_function: bool, in_class: bool,
            public_path: bool) -> Iterator[Function]:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        name = f"{prefix}{child.name}"
        public = public_path and not in_function and not child.name.startswith("_")
        yield Function(module, name, child.end_lineno - child.lineno + 1, in_function, public,
                       ast.get_docstring(child) is not None, _fully_typed(child, in_class),
                       _has_sections(child, in_class))
        yield from visit(child, f"{name}.", True, False, False)
      elif isinstance(child, ast.ClassDef):
        yield from visit(child, f"{prefix}{child.name}.", in_function, True,
                         public_path and not in_function and not child.name.startswith("_"))
      else:
        yield from visit(child, prefix, in_function, in_class, public_path)

  yield from visit(tree, "", False, False, True)


def library(root: pathlib.Path) -> list[Function]:
  """Every function of the ``clx`` package under ``root``."""
  out = []
  package = root / "clx"
  for path in sorted(package.rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out.extend(functions(path, module))
  return out


def _lines(path: pathlib.Path) -> int:
  """Lines of a file, or of every ``.py`` file of a package folder."""
  if path.is_dir():
    return sum(_lines(p) for p in sorted(path.rglob("*.py")))
  return len(path.read_text().splitlines()) if path.is_file() else 0


def _size(root: pathlib.Path, name: str) -> str:
  """``name``'s line count, as a module (``name.py``) or a package (``name/``)."""
  module, package = root / "clx" / f"{name}.py", root / "clx" / name
  if package.is_dir():
    files = sorted(package.rglob("*.py"))
    return f"{_lines(package)} lines in {len(files)} modules (package clx/{name}/)"
  return f"{_lines(module)} lines (module clx/{name}.py)"


def _coverage(fns: Sequence[Function]) -> str:
  public = [f for f in fns if f.public]
  if not public:
    return "no public functions"
  n = len(public)
  doc, typed = sum(f.documented for f in public), sum(f.typed for f in public)
  sections = sum(f.sections for f in public)
  return (f"{n} public: docstrings {doc}/{n} ({100 * doc / n:.0f} %), "
          f"full type hints {typed}/{n} ({100 * typed / n:.0f} %), "
          f"Args/Returns sections {sections}/{n} ({100 * sections / n:.0f} %)")


def in_package(fn: Function, package: str) -> bool:
  """``fn`` is defined in ``package`` or one of its submodules (not a prefix match)."""
  return fn.module == package or fn.module.startswith(package + ".")


def _longest(fns: Sequence[Function], n: int = 2) -> str:
  top = sorted(fns, key=lambda f: -f.lines)[:n]
  return "; ".join(f"{f.module}.{f.qualname} {f.lines} lines "
                   f"({sum(g.module == f.module and g.qualname.startswith(f.qualname + '.') for g in fns)}"
                   " nested)" for f in top)


def _duplicates(root: pathlib.Path) -> str:
  try:
    out = subprocess.run(["duplicates", "--repo", str(root / "clx"), "--seconds", "600"],
                         capture_output=True, text=True, check=False).stdout
  except FileNotFoundError:
    return "the duplicates command is not on PATH"
  lines = out.splitlines()
  # On a loaded machine the command may stop before reading every file: say so with the count.
  caveats = [line for line in lines if line.startswith(("incomplete:", "left out:"))]
  return " ".join(lines[:1] + caveats) if lines else "(no output)"


def _import_test(root: pathlib.Path) -> str:
  env = {**os.environ, "PYTHONPATH": str(root)}
  out = subprocess.run([sys.executable, "-m", "pytest", "tests/test_imports.py", "-p",
                        "no:cacheprovider"], cwd=root, env=env, capture_output=True, text=True,
                       check=False).stdout
  lines = [line for line in out.splitlines() if re.search(r"\b(passed|failed|error)", line)]
  return lines[-1].strip("= ") if lines else "(no summary line)"


def report(root: pathlib.Path, *, duplicates: bool = False, import_test: bool = False) -> str:
  """The metrics of the tree under ``root`` as text lines."""
  fns = library(root)
  methods = [f for f in fns if in_package(f, "clx.methods")]
  ops = [f for f in fns if in_package(f, "clx.ops")]
  nested_methods, nested_all = sum(f.nested for f in methods), sum(f.nested for f in fns)
  rows = [
      f"tree: {root}",
      f"longest functions (library): {_longest(fns)}",
      f"longest functions (clx/methods): {_longest(methods)}",
      f"nested functions: {nested_methods} in clx/methods of {nested_all} in the library",
      f"data/text: {_size(root, 'data/text')}",
      f"checkpoint: {_size(root, 'checkpoint')}",
      f"train/loop.py: {_lines(root / 'clx' / 'train' / 'loop.py')} lines",
      f"clx/methods: {_coverage(methods)}",
      f"clx/ops: {_coverage(ops)}",
  ]
  if duplicates:
    rows.append(f"duplicates (clx/): {_duplicates(root)}")
  if import_test:
    rows.append(f"tests/test_imports.py: {_import_test(root)}")
  return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", type=pathlib.Path,
                      default=pathlib.Path(__file__).resolve().parents[1],
                      help="folder holding clx/ (and tests/ for --import-test)")
  parser.add_argument("--duplicates", action="store_true", help="count `duplicates` pairs")
  parser.add_argument("--import-test", action="store_true", help="run tests/test_imports.py")
  args = parser.parse_args(argv)
  if not (args.root / "clx").is_dir():
    parser.error(f"{args.root} holds no clx/ package")
  print(report(args.root, duplicates=args.duplicates, import_test=args.import_test))
  return 0


if __name__ == "__main__":
  sys.exit(main())
