"""The layout: the library apart from its research, and the documentation's commands."""

import ast
import functools
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from cmtdp_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESEARCH = ('cmtdp_jax.studies', 'cmtdp_jax.benchmarks')


def _imported_modules(path: pathlib.Path):
  """Every module `path` imports (top level and inside functions), absolute names."""
  package = '.'.join(path.relative_to(ROOT).with_suffix('').parts[:-1])
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] +
                        ([base] if base else []))
      yield base
      yield from (f'{base}.{alias.name}' for alias in node.names)


def library_files():
  research = tuple(ROOT.joinpath(*name.split('.')) for name in RESEARCH)
  return [path for path in sorted(ROOT.joinpath('cmtdp_jax').rglob('*.py'))
          if not any(path.is_relative_to(folder) for folder in research)]


def test_the_library_never_imports_the_studies_or_the_benchmarks():
  offending = [f'{path.relative_to(ROOT)} imports {name}' for path in library_files()
               for name in _imported_modules(path)
               if name.startswith(RESEARCH)]
  assert not offending, offending


def test_the_import_check_sees_an_import_of_the_research(tmp_path):
  """The check above can fail: a function-level import of a study module is found."""
  module = ROOT / 'cmtdp_jax' / 'tools' / '_layout_probe.py'
  module.write_text('def f():\n  from cmtdp_jax.studies.tool import design\n')
  try:
    assert 'cmtdp_jax.studies.tool.design' in set(_imported_modules(module))
    assert module in library_files()
  finally:
    module.unlink()


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def package_imports() -> dict[str, set[str]]:
  """{module: the package's modules it imports}, its own enclosing packages left out (a
  submodule that names its package reaches an `__init__` that is already loading)."""
  modules = {_module_name(path): path for path in ROOT.joinpath('cmtdp_jax').rglob('*.py')}
  return {name: {other for other in _imported_modules(path)
                 if other in modules and other != name and not name.startswith(other + '.')}
          for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The groups of two or more modules that reach one another through imports (strongly
  connected components, Tarjan's algorithm)."""
  order, low, stack, cycles = {}, {}, [], []

  def visit(node):
    order[node] = low[node] = len(order)
    stack.append(node)
    for other in sorted(graph.get(node, ())):
      if other not in order:
        visit(other)
        low[node] = min(low[node], low[other])
      elif other in stack:
        low[node] = min(low[node], order[other])
    if low[node] == order[node]:
      group = stack[stack.index(node):]
      del stack[stack.index(node):]
      if len(group) > 1:
        cycles.append(sorted(group))

  for node in sorted(graph):
    if node not in order:
      visit(node)
  return cycles


def test_no_two_modules_of_the_package_import_each_other():
  """A circle of imports, even through function-level ones, ties two modules into one: the
  benchmarks share their helpers through `benchmarks.common` instead."""
  assert not import_cycles(package_imports())


def test_the_cycle_check_finds_a_circle_through_a_third_module():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}, 'e': set()}
  assert import_cycles(graph) == [['a', 'b', 'c']]
  assert import_cycles({'a': {'b'}, 'b': set()}) == []


DOCUMENTS = ['README.md', *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob('docs/*.md')),
             *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob('cmtdp_jax/**/README.md'))]


def documented_commands():
  """(document, command) for every `python -m cmtdp_jax...` line of a ```bash block in the
  README, docs/ and the studies' and benchmarks' READMEs, continuation lines joined."""
  found = []
  for document in DOCUMENTS:
    text = (ROOT / document).read_text()
    for block in re.findall(r'```bash\n(.*?)```', text, re.S):
      for line in block.replace('\\\n', ' ').splitlines():
        line = line.split(' #')[0].strip()
        match = re.search(r'python -m (cmtdp_jax[\w.]*)(.*)', line)
        if match:
          found.append((document, match.group(1), match.group(2)))
  return found


def test_the_documentation_has_commands_to_check():
  modules = {module for _, module, _ in documented_commands()}
  assert {'cmtdp_jax.main', 'cmtdp_jax.data.prepare', 'cmtdp_jax.studies.tool'} <= modules


def _is_placeholder(value: str) -> bool:
  return bool(re.search(r'<|\.\.\.|\bDIR\b|\$|\[|^[A-Z_]+$', value))


def _literal(value: str):
  """A `--config.field=value` value as ml_collections reads it: a Python literal, else text."""
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


@functools.lru_cache(maxsize=None)
def _help(module: str) -> str:
  """`python -m module --help`, once per module (absl's exits 1 after the usage, argparse's 0)."""
  done = subprocess.run([sys.executable, '-m', module, '--help'], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  text = done.stdout + done.stderr
  assert done.returncode in (0, 1) and re.search(r'^(flags|usage|options):', text,
                                                  re.MULTILINE | re.IGNORECASE), (
                                                      f'{module} --help: {text[-2000:]}')
  return text


def _defines(help_text: str, flag: str) -> bool:
  """Whether a --help text lists `flag` (absl's booleans as --[no]name)."""
  name = flag[2:].split('=', 1)[0]
  return bool(re.search(rf'--(\[no\])?{re.escape(name)}\b', help_text) or (
      name.startswith('no') and re.search(rf'--\[no\]{re.escape(name[2:])}\b', help_text)))


@pytest.mark.parametrize('document,module,arguments', documented_commands(),
                         ids=lambda x: x if isinstance(x, str) and '/' in x else None)
def test_documented_command_parses(document, module, arguments):
  """Each documented command names a module that exists and whose --help lists every flag
  the command passes; a `--config` file loads with the CLI's loader and every
  `--config.field=value` names a field and fits its type, which is what
  `--mode=print_config` checks (a full run is too long). Placeholder values (`DIR`, `<...>`,
  `...`) are left out."""
  assert importlib.util.find_spec(module) is not None, f'{document}: no module {module}'
  words = shlex.split(arguments)
  help_text = _help(module)
  for word in words:
    if word.startswith('--') and not word.startswith('--config.'):
      assert _defines(help_text, word), f'{document}: {module} has no flag {word}'
  config_file = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == '--config'), None)
  config_file = config_file or next((w[len('--config='):] for w in words
                                     if w.startswith('--config=')), None)
  if config_file is None:
    assert module != 'cmtdp_jax.main', f'{document}: no --config in {arguments}'
    return
  path, _, variant = config_file.partition(':')
  config = config_lib.load_config_file(str(ROOT / path) + (f':{variant}' if variant else ''))
  for word in words:
    if not word.startswith('--config.'):
      continue
    field, _, value = word[len('--config.'):].partition('=')
    assert config_lib.unknown_field(config, field) is None, f'{document}: {word}'
    if _is_placeholder(value):
      continue
    *parents, leaf = field.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = _literal(value)  # a locked ConfigDict refuses another type
