"""`--config.KEY=VALUE` flags applied to a saved config (a run's config.json).

absl's config flags (`ml_collections.config_flags`) only override a config
loaded by `--config=file.py`. evaluate and predict start from the run's
`config.json` instead, so main.py takes the `--config.KEY=VALUE` flags out of
the command line when `--config` is absent and applies them here:

    config = workdir.load_config(workdir)
    apply_overrides(config, [('eval.mc_samples', '20'), ('eval.tta', 'true')])

Values are parsed as the type of the field they replace, with the same
spellings as config_flags: bools true/false/1/0 (a bare `--config.KEY` is
True, `--noconfig.KEY` False), numbers and strings as written, tuples as
Python literals (`--config.data.patch_size=(8,16,16)`).
"""

import ast
import re

_CONFIG_FLAG = re.compile(r'^--?config(=|$)')
_OVERRIDE_FLAG = re.compile(r'^--?(no)?config\.([A-Za-z0-9_.]+)(?:=(.*))?$',
                            re.DOTALL)


def resolve_key(config, key: str):
  """Returns (parent section, leaf name) of the dotted `key` of `config`.

  Raises:
    ValueError: a part of the key does not exist; the message names the
      fields of the section where it was looked up.
  """
  node, parts = config, key.split('.')
  for depth, part in enumerate(parts):
    if not hasattr(node, 'keys') or part not in node:
      where = '.'.join(['config', *parts[:depth]])
      fields = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else ''
      raise ValueError(f'--config.{key}: {where} has no field {part!r}'
                       + (f' (its fields: {fields}).' if fields else '.'))
    if depth < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def _parse_bool(text: str) -> bool:
  lowered = text.strip().lower()
  if lowered not in ('true', 'false', '1', '0'):
    raise ValueError(text)
  return lowered in ('true', '1')


def _parse_sequence(text: str) -> tuple:
  value = ast.literal_eval(text) if text.strip() else ()
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _parse_any(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_value(text: str | None, old, key: str):
  """Returns `text` parsed as the type of `old`, the field's current value.

  Args:
    text: what followed '=' (None for a bare `--config.KEY`).
    old: the current value of the field.
    key: the dotted key, for error messages.

  Raises:
    ValueError: the text is not a value of that type, or the key is a section.
  """
  if hasattr(old, 'keys'):
    raise ValueError(f'--config.{key} is a section; set its fields, e.g. '
                     f'--config.{key}.{sorted(old.keys())[0]}=...')
  if text is None:
    if isinstance(old, bool):
      return True
    raise ValueError(f'--config.{key} needs a value: --config.{key}=VALUE.')
  if isinstance(old, bool):
    parse = _parse_bool
  elif isinstance(old, (int, float)):
    parse = type(old)
  elif isinstance(old, (tuple, list)):
    parse = _parse_sequence
  elif old is None:
    parse = _parse_any
  else:
    parse = str
  try:
    return parse(text)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f'--config.{key}={text!r} is not a valid '
                     f'{type(old).__name__} (the value in the config is '
                     f'{old!r}).') from e


def apply_overrides(config, overrides) -> None:
  """Sets `(dotted key, text)` pairs in `config` (in place), in order.

  Raises:
    ValueError: naming the key, for an unknown key or an unparsable value.
  """
  for key, text in overrides:
    parent, leaf = resolve_key(config, key)
    parent[leaf] = parse_value(text, parent[leaf], key)


def has_config_flag(argv) -> bool:
  """Whether the command line gives `--config` (a config file) itself."""
  return any(_CONFIG_FLAG.match(arg) for arg in argv[1:])


def split_overrides(argv) -> tuple[list[str], list[tuple[str, str | None]]]:
  """Takes the `--config.KEY[=VALUE]` flags out of a command line.

  Args:
    argv: the command line, program name first; parsing stops at '--'.

  Returns:
    (the other arguments, [(key, text)]): text is None for a bare flag and
    'false' for `--noconfig.KEY`.
  """
  rest, overrides = [argv[0]], []
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--':
      rest.extend(argv[i:])
      break
    match = _OVERRIDE_FLAG.match(arg)
    if not match:
      rest.append(arg)
      continue
    negated, key, text = match.groups()
    overrides.append((key, 'false' if negated and text is None else text))
  return rest, overrides
