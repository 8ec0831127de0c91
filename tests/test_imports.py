"""The import graph of `medseg_jax`: no cycles, arrows point one way.

The graph is read from the source with `ast` (nothing is imported), so a test
fails by naming the modules and the import lines at fault. Every `import` and
`from ... import` counts, at module level or inside a function: an import
deferred into a function still ties the two modules together.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'medseg_jax'
# Third-party packages that data code must not import (DESIGN.md: data code
# imports no JAX, so Grain workers and the data check stay light).
JAX_FAMILY = ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'chex')


def package_modules(root=os.path.join(REPO, PACKAGE), package=PACKAGE):
  """Returns {dotted module name: file path} for every .py file of a package.

  Args:
    root: the package folder.
    package: its dotted name.

  Returns:
    A package maps to its `__init__.py` ('medseg_jax.data' ->
    'medseg_jax/data/__init__.py').
  """
  modules = {}
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs
                     if os.path.isfile(os.path.join(folder, d, '__init__.py')))
    rel = os.path.relpath(folder, root)
    prefix = package if rel == '.' else package + '.' + rel.replace(os.sep, '.')
    for name in sorted(files):
      if name.endswith('.py'):
        stem = name[:-3]
        dotted = prefix if stem == '__init__' else f'{prefix}.{stem}'
        modules[dotted] = os.path.join(folder, name)
  return modules


def _resolve_from(module, path, node):
  """Returns the absolute base of a `from X import ...` (relative resolved)."""
  if not node.level:
    return node.module or ''
  is_package = os.path.basename(path) == '__init__.py'
  parts = module.split('.')
  base = parts if is_package else parts[:-1]
  base = base[:len(base) - (node.level - 1)]
  return '.'.join(base + ([node.module] if node.module else []))


def _innermost_module(name, modules):
  """Returns the longest prefix of dotted `name` that is a package module."""
  parts = name.split('.')
  for end in range(len(parts), 0, -1):
    candidate = '.'.join(parts[:end])
    if candidate in modules:
      return candidate
  return None


def imports_of(module, path, modules):
  """Returns the imports of one module file.

  Args:
    module: its dotted name.
    path: its file.
    modules: every module of the package, from `package_modules`.

  Returns:
    (internal, external): internal is {imported package module: first line
    number}; `from medseg_jax import losses` gives 'medseg_jax.losses',
    `from medseg_jax.data.check import Problem` gives 'medseg_jax.data.check'.
    external is {top-level third-party name: first line number}.
  """
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), filename=path)
  internal, external = {}, {}

  def add(target, line):
    inner = _innermost_module(target, modules)
    if inner is not None:
      if inner != module:
        internal.setdefault(inner, line)
    elif target.split('.')[0] != PACKAGE:
      external.setdefault(target.split('.')[0], line)

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name, node.lineno)
    elif isinstance(node, ast.ImportFrom):
      base = _resolve_from(module, path, node)
      for alias in node.names:
        # `from pkg import name`: name is a submodule or an attribute of pkg.
        full = f'{base}.{alias.name}' if base else alias.name
        add(full if full in modules else base, node.lineno)
  return internal, external


def import_graph():
  """Returns (modules, internal edges, external imports) of the package."""
  modules = package_modules()
  edges, external = {}, {}
  for module, path in modules.items():
    edges[module], external[module] = imports_of(module, path, modules)
  return modules, edges, external


def find_cycles(edges):
  """Returns one cycle (a list of modules, first == last) per strongly
  connected component of more than one module (Tarjan), or of a module
  importing itself.

  Args:
    edges: {module: iterable of imported modules}.
  """
  index, low, on_stack, stack, components = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in edges.get(v, ()):
        components.append(set(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return [_cycle_within(component, edges) for component in components]


def _cycle_within(component, edges):
  """Returns the shortest closed path from the first module of a strongly
  connected `component` back to itself."""
  start = min(component)
  inside = {v: [w for w in edges[v] if w in component] for v in component}
  if start in inside[start]:
    return [start, start]
  # In a strongly connected component every successor leads back to start.
  chains = [import_path(inside, first, start)
            for first in sorted(inside[start])]
  return [start] + min(chains, key=len)


def import_path(edges, source, target):
  """Returns the shortest import chain source -> ... -> target, or None."""
  previous, frontier = {source: None}, [source]
  while frontier:
    next_frontier = []
    for v in frontier:
      for w in sorted(edges.get(v, ())):
        if w not in previous:
          previous[w] = v
          next_frontier.append(w)
    frontier = next_frontier
  if target not in previous:
    return None
  chain = [target]
  while previous[chain[-1]] is not None:
    chain.append(previous[chain[-1]])
  return chain[::-1]


def _packages_above(module):
  """'a.b.c' -> ['a', 'a.b']: the packages Python runs before the module."""
  parts = module.split('.')
  return ['.'.join(parts[:i]) for i in range(1, len(parts))]


def _describe(chain, modules, edges):
  lines = []
  for a, b in zip(chain, chain[1:]):
    line = edges[a].get(b, '?')
    lines.append(f'  {os.path.relpath(modules[a], REPO)}:{line} imports {b}')
  return '\n'.join(lines)


# ------------------------------------------------------------- graph tools


def test_graph_tools_on_a_known_graph():
  """The cycle finder and path search on a hand-made graph."""
  edges = {'a': {'b': 1}, 'b': {'c': 1}, 'c': {'a': 1, 'd': 1}, 'd': {},
           'e': {'e': 1}, 'f': {'d': 1}}
  cycles = find_cycles(edges)
  assert sorted(map(tuple, cycles)) == [('a', 'b', 'c', 'a'), ('e', 'e')]
  assert import_path(edges, 'a', 'd') == ['a', 'b', 'c', 'd']
  assert import_path(edges, 'd', 'a') is None
  assert find_cycles({'x': {'y': 1}, 'y': {}}) == []


def test_parser_resolves_absolute_relative_and_nested_imports(tmp_path):
  """Relative imports, `from pkg import submodule`, imports in functions."""
  pkg = tmp_path / 'pkg'
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('VERSION = 1\n')
  (pkg / 'sub' / '__init__.py').write_text('from . import leaf\n')
  (pkg / 'sub' / 'leaf.py').write_text(
      'import numpy as np\n'
      'from .. import top\n'
      'def f():\n'
      '  from pkg.sub import other  # deferred\n'
      '  import jax.numpy\n')
  (pkg / 'sub' / 'other.py').write_text('from pkg import VERSION\n'
                                        'from pkg.top import thing\n')
  (pkg / 'top.py').write_text('import pkg.sub.leaf as l\n')
  modules = package_modules(str(pkg), 'pkg')
  assert set(modules) == {'pkg', 'pkg.sub', 'pkg.sub.leaf', 'pkg.sub.other',
                          'pkg.top'}
  got = {m: imports_of(m, p, modules) for m, p in modules.items()}
  assert got['pkg.sub.leaf'] == ({'pkg.top': 2, 'pkg.sub.other': 4},
                                 {'numpy': 1, 'jax': 5})
  assert got['pkg.sub'][0] == {'pkg.sub.leaf': 1}
  assert got['pkg.sub.other'][0] == {'pkg': 1, 'pkg.top': 2}
  assert got['pkg.top'][0] == {'pkg.sub.leaf': 1}
  edges = {m: internal for m, (internal, _) in got.items()}
  assert find_cycles(edges) == [['pkg.sub.leaf', 'pkg.top', 'pkg.sub.leaf']]


# --------------------------------------------------------- the real package


@pytest.fixture(scope='module')
def graph():
  return import_graph()


def test_graph_sees_the_package(graph):
  """Guards the tests below against an empty or mis-resolved graph."""
  modules, edges, external = graph
  assert {'medseg_jax.train', 'medseg_jax.steps', 'medseg_jax.data.pipeline',
          'medseg_jax.models'} <= set(modules)
  assert 'medseg_jax.losses' in edges['medseg_jax.steps']
  assert 'jax' in external['medseg_jax.steps']


def test_no_import_cycles(graph):
  modules, edges, _ = graph
  cycles = find_cycles(edges)
  message = '\n\n'.join(' -> '.join(c) + '\n' + _describe(c, modules, edges)
                        for c in cycles)
  assert not cycles, f'Import cycles in {PACKAGE}:\n{message}'


@pytest.mark.parametrize('source,target', [
    ('medseg_jax.evaluate', 'medseg_jax.predict'),
    ('medseg_jax.evaluate', 'medseg_jax.train'),
    ('medseg_jax.predict', 'medseg_jax.evaluate'),
    ('medseg_jax.predict', 'medseg_jax.train'),
])
def test_evaluate_and_predict_stay_off_each_other_and_train(graph, source,
                                                            target):
  """Directly or through other modules (DESIGN.md: arrows point one way)."""
  modules, edges, _ = graph
  chain = import_path(edges, source, target)
  assert chain is None, (f'{source} imports {target}:\n'
                         f'{_describe(chain, modules, edges)}')


LOOP = ('train', 'steps', 'state', 'optim', 'parallel', 'checkpoint',
        'workdir', 'evaluate', 'predict', 'predictor')


@pytest.mark.parametrize('source', ['models', 'losses', 'metrics'])
def test_models_losses_metrics_import_nothing_from_the_loop(graph, source):
  """DESIGN.md: they are a library usable in someone else's training loop."""
  modules, edges, _ = graph
  found = []
  for target in LOOP:
    chain = import_path(edges, f'{PACKAGE}.{source}', f'{PACKAGE}.{target}')
    if chain:
      found.append(_describe(chain, modules, edges))
  assert not found, f'{PACKAGE}.{source} reaches the loop:\n' + '\n'.join(
      found)


def test_data_code_imports_no_jax(graph):
  """Modules under medseg_jax/data, and every package module they reach
  (package `__init__` files included, since Python runs them first)."""
  modules, edges, external = graph
  data = [m for m in modules if m.startswith(f'{PACKAGE}.data')]
  assert len(data) > 5
  offenders = []
  for module in data:
    reached, todo = set(), [module]
    while todo:
      m = todo.pop()
      for above in _packages_above(m) + [m]:
        if above not in reached:
          reached.add(above)
          todo.extend(edges[above])
    for m in sorted(reached):
      for name, line in sorted(external[m].items()):
        if name in JAX_FAMILY:
          via = import_path(edges, module, m) or [module, '(package)', m]
          offenders.append(f'{module}: {os.path.relpath(modules[m], REPO)}:'
                           f'{line} imports {name} (via {" -> ".join(via)})')
  assert not offenders, 'Data code imports JAX:\n' + '\n'.join(offenders)
