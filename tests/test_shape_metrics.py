"""experiments/shape_metrics.py counts what its docstring says, on a small synthetic tree."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import textwrap

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "shape_metrics.py"


def _load():
  spec = importlib.util.spec_from_file_location("shape_metrics_under_test", _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclass resolves string annotations in its module
  spec.loader.exec_module(module)
  return module


def _write(root: pathlib.Path, rel: str, text: str) -> None:
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text))


def _tree(root: pathlib.Path) -> None:
  _write(root, "clx/__init__.py", "")
  _write(root, "clx/methods/__init__.py", "")
  _write(root, "clx/methods/m.py", '''
      def full(a: int, b: int = 0) -> int:
        """Sum.

        Args:
          a: first.
          b: second.

        Returns:
          a + b.
        """
        def inner(c):
          return c
        return inner(a + b)

      def no_sections(a: int) -> int:
        """Identity."""
        return a

      def untyped(a):
        """Identity.

        Args:
          a: the value.

        Returns:
          a.
        """
        return a

      def undocumented(a: int) -> None:
        pass

      def returns_none(a: int) -> None:
        """Nothing.

        Args:
          a: ignored.
        """

      def _private(a):
        return a

      class Thing:
        """A class."""

        def method(self, x: int) -> int:
          """Double.

          Args:
            x: value.

          Returns:
            2 x.
          """
          return 2 * x

        @property
        def size(self) -> int:
          """The size (a property needs no Returns section)."""
          return 1

        def _hidden(self):
          return 0
      ''')
  # a private module of the package: counted with it
  _write(root, "clx/methods/_helpers.py", '''
      def helper(a):
        return a
      ''')
  # a sibling package whose name starts like "clx.methods": not part of it
  _write(root, "clx/methods_extra/__init__.py", '''
      def stray(a):
        return a
      ''')
  _write(root, "clx/ops/__init__.py", '''
      def op(x: float) -> float:
        """Square.

        Args:
          x: value.

        Returns:
          x².
        """
        return x * x
      ''')


def test_counter_on_a_synthetic_tree(tmp_path):
  sm = _load()
  _tree(tmp_path)
  fns = sm.library(tmp_path)
  by_name = {(f.module, f.qualname): f for f in fns}
  methods = [f for f in fns if sm.in_package(f, "clx.methods")]
  public = {f.qualname for f in methods if f.public}
  # public: module-level and class-level, no "_" name on the path; private modules counted;
  # nested functions and clx.methods_extra are not
  assert public == {"full", "no_sections", "untyped", "undocumented", "returns_none",
                    "Thing.method", "Thing.size", "helper"}
  assert not any(f.module == "clx.methods_extra" for f in methods)
  assert by_name[("clx.methods.m", "full.inner")].nested
  assert by_name[("clx.methods.m", "full")].lines == 13
  # documented / typed / sections
  assert {f.qualname for f in methods if f.public and f.documented} == public - {
      "undocumented", "helper"}
  assert {f.qualname for f in methods if f.public and f.typed} == public - {"untyped", "helper"}
  assert {f.qualname for f in methods if f.public and f.sections} == {
      "full", "untyped", "returns_none", "Thing.method", "Thing.size"}


def test_report_lines_on_a_synthetic_tree(tmp_path):
  sm = _load()
  _tree(tmp_path)
  text = sm.report(tmp_path)
  assert ("clx/methods: 8 public: docstrings 6/8 (75 %), full type hints 6/8 (75 %), "
          "Args/Returns sections 5/8 (62 %)") in text
  assert ("clx/ops: 1 public: docstrings 1/1 (100 %), full type hints 1/1 (100 %), "
          "Args/Returns sections 1/1 (100 %)") in text
  assert "nested functions: 1 in clx/methods of 1 in the library" in text
