"""Metadata columns of a data set's cases (sex, site, age, diagnosis), host side.

Subgroup and decision analyses (`config.eval.subgroups`, `config.eval.
decision.truth_column`) need columns per case. They come from, in order:

  1. `config.eval.subgroups_csv`: a CSV (absolute, relative to the working
     directory, or to `config.data.root`) with a `case_id` column (or an
     image id column `image`, `image_id`, `isic_id`: the file name without
     extension) or a `patient_id` column, and any other columns. Case ids
     are matched first; a patient's row applies to all its cases.
  2. The ISIC metadata CSV the data set uses (`config.data.isic.
     metadata_csv`, or the one found in the root), keyed by image id.
  3. The folder manifest (`config.data.folder.manifest`): its other columns,
     keyed by image.

Column names are matched case-insensitively (they are lower-cased). A
column that is asked for but not there is one ValueError listing the
columns that are, raised before anything is predicted. Imports no JAX.
"""

import csv
import os

from medseg_jax.data import photo_layout

ID_COLUMNS = ('case_id',) + photo_layout.ISIC_IMAGE_ID_COLUMNS


def read_table(path: str) -> list[dict]:
  """Returns the rows of a metadata CSV.

  Args:
    path: the CSV file (UTF-8, an optional BOM).

  Returns:
    One dict per row, keys lower-cased and stripped, values stripped.

  Raises:
    ValueError: the file cannot be read as CSV (names it).
  """
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      rows = list(csv.DictReader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise ValueError(f'Cannot read the metadata CSV {path} ({e}).') from e
  return [{k.strip().lower(): (v or '').strip() for k, v in r.items()
           if isinstance(k, str)} for r in rows]


def _stem(value: str) -> str:
  return os.path.splitext(os.path.basename(value))[0]


def _resolve_csv(path: str, data_root: str) -> str:
  """`path` as given if it exists (absolute or relative to the cwd), else under root."""
  if os.path.isabs(path) or os.path.isfile(path) or not data_root:
    return path
  return os.path.join(data_root, path)


def from_table(rows: list[dict], case_ids, patient_ids, path: str
              ) -> dict[str, dict]:
  """Returns {case_id: {column: value}} from the rows of a metadata table.

  Args:
    rows: CSV rows (`read_table`), with an id column (ID_COLUMNS) or patient_id.
    case_ids: the data set's case ids.
    patient_ids: their patients, in the same order.
    path: the CSV, for error messages.

  Raises:
    ValueError: the table has no id column.
  """
  header = set(rows[0]) if rows else set()
  id_col = next((c for c in ID_COLUMNS if c in header), None)
  if id_col is None and 'patient_id' not in header:
    raise ValueError(
        f'Metadata CSV {path} needs a case id column ({", ".join(ID_COLUMNS)})'
        f' or a patient_id column; found columns {sorted(header)}.')
  by_case = {_stem(r[id_col]): r for r in rows} if id_col else {}
  by_patient = {r['patient_id']: r for r in rows} if (
      'patient_id' in header) else {}
  out = {}
  for case, patient in zip(case_ids, patient_ids):
    row = by_case.get(case) or by_case.get(_stem(case)) or by_patient.get(
        patient)
    if row is not None:
      out[case] = row
  return out


def _manifest_metadata(source, path: str) -> dict[str, dict]:
  """{case_id: manifest row} matched by the image path of each case."""
  rows = read_table(path)
  by_image = {photo_layout.resolve(source.root, r['image']): r for r in rows
              if r.get('image')}
  return {p.case_id: by_image[p.image] for p in source.pairs
          if p.image in by_image}


def metadata_file(config, source) -> str:
  """Returns the CSV the metadata columns come from, or '' when there is none.

  Args:
    config: the experiment config (eval.subgroups_csv, data.*).
    source: the data source (a `PhotoSource` may name its metadata CSV).
  """
  root = config.data.get('root', '')
  if config.eval.get('subgroups_csv', ''):
    return _resolve_csv(config.eval.subgroups_csv, root)
  isic_csv = getattr(source, 'metadata_csv', '')
  if isic_csv:
    return photo_layout.resolve(source.root, isic_csv)
  manifest = config.data.get('folder', {}).get('manifest', '')
  if config.data.source == 'folder' and manifest:
    return photo_layout.resolve(root, manifest)
  return ''


def case_metadata(config, source) -> tuple[dict[str, dict], str]:
  """Returns ({case_id: {column: value}}, the CSV read, '' if none).

  Args:
    config: the experiment config.
    source: the data source of the evaluated cases (`case_ids`,
      `patient_ids`).

  Raises:
    ValueError: the CSV named cannot be read or has no id column.
  """
  path = metadata_file(config, source)
  if not path:
    return {}, ''
  if not os.path.isfile(path):
    raise ValueError(f'config.eval.subgroups_csv={path!r}: file not found '
                     '(give an absolute path, one relative to the working '
                     'directory, or to config.data.root).')
  if not config.eval.get('subgroups_csv', '') and hasattr(source, 'pairs') and (
      config.data.source == 'folder'):
    return _manifest_metadata(source, path), path
  return from_table(read_table(path), list(source.case_ids),
                    list(source.patient_ids), path), path


def required_columns(config) -> list[tuple[str, str]]:
  """Returns the (config key, column) pairs an evaluation needs.

  Args:
    config: the experiment config (eval.subgroups, eval.decision).

  Returns:
    Lower-cased columns of eval.subgroups, and decision.truth_column when
    the decision's truth is a column.
  """
  needed = [('config.eval.subgroups', str(c).strip().lower())
            for c in config.eval.get('subgroups', ())]
  decision = config.eval.get('decision')
  if decision is not None and decision.rule and decision.truth == 'column':
    needed.append(('config.eval.decision.truth_column',
                   str(decision.truth_column).strip().lower()))
  return needed


def metadata_for_evaluation(config, source) -> dict[str, dict]:
  """Returns the cases' metadata, after checking every column asked for exists.

  Args:
    config: the experiment config.
    source: the data source of the evaluated cases.

  Returns:
    {case_id: {column: value}}; {} when no column is asked for.

  Raises:
    ValueError: one line naming the missing column(s), the file and the
      columns that exist (or how to give a CSV when there is none).
  """
  needed = required_columns(config)
  if not needed:
    return {}
  metadata, path = case_metadata(config, source)
  if not path:
    keys = ', '.join(sorted({k for k, _ in needed}))
    raise ValueError(
        f'{keys}: the data set (config.data.source={config.data.source!r}) '
        f'has no metadata columns for {", ".join(c for _, c in needed)}; give '
        'a CSV with a case_id (or patient_id) column and those columns with '
        '--config.eval.subgroups_csv=FILE.')
  rows = read_table(path)
  available = sorted(rows[0]) if rows else []
  missing = [(k, c) for k, c in needed if c not in available]
  if missing:
    raise ValueError(
        '; '.join(f'{k}: column {c!r}' for k, c in missing) + f' is not in '
        f'{path}; available columns: {", ".join(available)}.')
  if not metadata:
    raise ValueError(f'{path}: no row matches a case of the data set (e.g. '
                     f'{list(source.case_ids)[:3]}); match case_id or '
                     'patient_id.')
  return metadata
