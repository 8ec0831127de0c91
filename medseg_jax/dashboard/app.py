"""The Streamlit page (run by `python -m medseg_jax.dashboard`, not imported).

Streamlit re-runs this script on every interaction. The model is loaded and
compiled once per server process (`st.cache_resource`); each upload is read
and predicted once per browser session (its probabilities are kept in
`st.session_state`), so the sliders only re-threshold and redraw.
"""

import html
import sys

import numpy as np
import pandas as pd
import streamlit as st

from medseg_jax import gradcam
from medseg_jax.dashboard import cli
from medseg_jax.dashboard import loading
from medseg_jax.dashboard import results
from medseg_jax.dashboard import uploads
from medseg_jax.dashboard import views
from medseg_jax.data import sources

ARGS = cli.parse_args(sys.argv[1:])
st.set_page_config(page_title='medseg_jax · segmentation', page_icon='🩺',
                   layout='wide')


@st.cache_resource(show_spinner='Loading and compiling the model…')
def _predictor(workdirs: tuple, choice: int, ensemble: bool, checkpoint: str):
  return loading.load_predictor(workdirs, choice, ensemble, checkpoint)


@st.cache_resource(show_spinner=False)
def _gradcam_layers(workdirs: tuple, choice: int, ensemble: bool,
                    checkpoint: str) -> list[str]:
  predictor = _predictor(workdirs, choice, ensemble, checkpoint)
  return views.gradcam_layers(loading.gradcam_layer_names(predictor))


def _model_sidebar():
  """The model picker and run facts; returns (model key, Predictor)."""
  labels = loading.choices(ARGS.workdir, ARGS.ensemble)
  st.sidebar.header('medseg_jax')
  choice = 0
  if len(labels) > 1:
    choice = st.sidebar.selectbox('Model', range(len(labels)),
                                  format_func=labels.__getitem__)
  key = (tuple(ARGS.workdir), choice, ARGS.ensemble, ARGS.checkpoint)
  try:
    predictor = _predictor(*key)
  except (ValueError, FileNotFoundError) as e:
    st.error(f'Cannot load {labels[choice]}: {e}')
    st.stop()
  config = predictor.config
  kind = '2D images' if loading.is_two_d(predictor) else 'volumes'
  st.sidebar.caption(
      f'Model **{labels[choice]}**: {config.model.name} for {kind}, '
      f'checkpoint step {predictor.step}'
      + (f', {len(predictor.members)} models' if len(predictor.members) > 1
         else ''))
  return key, predictor


def _settings_sidebar(key, predictor) -> dict:
  """Threshold, opacity, MC-dropout and Grad-CAM settings."""
  config = predictor.config
  binary = config.data.num_classes <= 1
  settings = {'threshold': st.sidebar.slider(
      'Confidence threshold', 0.0, 1.0, views.default_threshold(config), 0.05,
      help=('A pixel is shown as lesion when its probability exceeds this.'
            if binary else 'A pixel keeps its most likely class only when '
            'that probability reaches this (0: always).'))}
  settings['alpha'] = st.sidebar.slider('Overlay opacity', 0.0, 1.0, 0.4, 0.05)
  samples = int(config.eval.mc_samples)
  settings['mc'] = st.sidebar.toggle(
      'Uncertainty (MC dropout)', disabled=not samples,
      help=(f'{samples} stochastic passes with dropout on: mean, std and '
            'entropy maps.' if samples else
            'Needs a single model trained with dropout '
            '(config.model.dropout_rate > 0).'))
  layers = _gradcam_layers(*key)
  settings['gradcam'] = st.sidebar.toggle(
      'Grad-CAM', disabled=not layers,
      help='Where the model looked (2D single models only).')
  settings['layer'] = None
  if settings['gradcam'] and layers:
    start = layers.index(config.eval.gradcam_layer) if (
        config.eval.gradcam_layer in layers) else len(layers) - 1
    settings['layer'] = st.sidebar.selectbox('Grad-CAM layer', layers, start)
  st.sidebar.divider()
  st.sidebar.caption('Uploads stay in this browser session\'s memory and are '
                     'never written to the server\'s disk beyond a temporary '
                     'folder removed once read. Research use only: not a '
                     'medical device.')
  return settings


def _analysed(key, predictor, files):
  """Reads and predicts each upload once per session.

  Returns:
    ([(name, (Case, Prediction, extras))], [(name, error line)]).
  """
  cache = st.session_state.setdefault('analysed', {})
  entries = [(key, f.file_id) for f in files]
  todo = sum(entry not in cache for entry in entries)
  progress = st.progress(0.0, 'Segmenting…') if todo else None
  two_d = loading.is_two_d(predictor)
  cases, failures = [], []
  for f, entry in zip(files, entries):
    if entry not in cache:
      try:
        case = uploads.read_case(f.name, f.getvalue(),
                                 predictor.read_file, two_d)
        prediction = predictor.predict(case.image, case.spacing,
                                       uncertainty=False)
        cache[entry] = (case, prediction, {})
      except Exception as e:  # pylint: disable=broad-except
        # A file the model cannot take (wrong channels, a volume for a 2D
        # model, ...) is reported like an unreadable one.
        cache[entry] = str(e) if isinstance(e, uploads.UploadError) else (
            f'{f.name}: {e}')
      progress.progress(sum(e in cache for e in entries) / len(entries),
                        f'Segmented {f.name}')
    value = cache[entry]
    (failures if isinstance(value, str) else cases).append((f.name, value))
  if progress is not None:
    progress.empty()
  for stale in set(cache) - set(entries):
    del cache[stale]  # Removed uploads leave the session's memory.
  return cases, failures


def _ground_truths(cases, mask_files, config):
  """Returns ({case name: class map}, automatic pairs, error lines).

  Each (mask upload, case) pair is read once per session.
  """
  by_name = {f.name: f for f in mask_files}
  pairs = uploads.match_ground_truth([n for n, _ in cases], list(by_name))
  cache = st.session_state.setdefault('truths', {})
  truths, failures, used = {}, [], set()
  for name, (case, _, _) in cases:
    chosen = st.session_state.get(f'gt::{name}', pairs.get(name, '(none)'))
    if chosen not in by_name:
      continue
    entry = (by_name[chosen].file_id, name, case.image.shape)
    used.add(entry)
    if entry not in cache:
      try:
        cache[entry] = uploads.read_ground_truth(
            chosen, by_name[chosen].getvalue(), case, config)
      except uploads.UploadError as e:
        cache[entry] = str(e)
    if isinstance(cache[entry], str):
      failures.append(cache[entry])
    else:
      truths[name] = cache[entry]
  for stale in set(cache) - used:
    del cache[stale]
  return truths, pairs, failures


def _legend(names) -> None:
  chips = ''.join(
      f'<span style="display:inline-block;margin-right:1.2em">'
      f'<span style="display:inline-block;width:0.9em;height:0.9em;'
      f'border-radius:2px;vertical-align:middle;margin-right:0.35em;'
      f'background:rgb{views.class_colour(k)}"></span>{html.escape(n)}</span>'
      for k, n in enumerate(names, 1))
  st.markdown(chips, unsafe_allow_html=True)


def _width(image):
  """Stretches wide images to their column; tall ones (coronal views of thick
  slices) are kept about 460 px high instead of running off the screen."""
  height, width = image.shape[:2]
  return 'stretch' if height <= width else max(96, round(460 * width / height))


def _slice_view(name, case, labels, first_labels):
  """For a volume, the axis and slice pickers; returns the 2D arrays shown.

  The slice slider starts at the slice with the most foreground of the run's
  own labels (`first_labels`), fixed per case so it does not jump.
  """
  if case.kind == 'image':
    return case.image, labels, case.spacing, None
  axis = st.radio('View', list(views.AXES), horizontal=True,
                  key=f'axis::{name}', format_func=str.capitalize)
  depth = case.image.shape[views.AXES[axis]]
  counts = (first_labels > 0).sum(axis=tuple(
      a for a in range(3) if a != views.AXES[axis]))
  start = int(np.argmax(counts)) if counts.any() else depth // 2
  index = st.slider('Slice', 0, depth - 1, start, key=f'slice::{name}::{axis}')
  window = views.intensity_window(case.image)
  return (views.slice_of(case.image, axis, index),
          views.slice_of(labels, axis, index),
          views.slice_spacing(case.spacing, axis), (axis, index, window))


def _detail(name, case, prediction, extras, settings, names, truth,
            predictor):
  """One case: input, overlay, legend, measurements, maps."""
  labels = views.labels_at(prediction.probabilities, settings['threshold'],
                           predictor.config.eval.postprocess)
  image2d, labels2d, spacing2d, where = _slice_view(name, case, labels,
                                                    prediction.labels)
  window = where[2] if where else None
  shown = lambda rgb: views.physical_aspect(rgb, spacing2d)
  rgb = views.to_rgb(image2d, window)
  panels = [('Input', rgb),
            ('Segmentation', views.overlay(rgb, labels2d, settings['alpha']))]
  if settings['gradcam'] and case.kind == 'image':
    layer = settings['layer']
    if ('gradcam', layer) not in extras:
      with st.spinner('Computing Grad-CAM…'):
        extras[('gradcam', layer)] = views.gradcam_heatmap(
            predictor, case.image, layer)
    panels.append((f'Grad-CAM ({layer})', gradcam.overlay(
        rgb, extras[('gradcam', layer)])))
  for column, (title, image) in zip(st.columns(len(panels)), panels):
    picture = shown(image)
    column.image(picture, caption=title, width=_width(picture))
  _legend(names)
  sizes = results.class_sizes(labels, case, names)
  _, unit = results.size_unit(case)
  what = 'area' if case.kind == 'image' else 'volume'
  scores = (results.dice_per_class(labels, truth, len(names))
            if truth is not None else None)
  shown_metrics = [(f'{n} {what}', results.format_size(sizes[n], unit))
                   for n in names]
  if scores is not None:  # Each class's Dice right after its size.
    shown_metrics = [m for pair in zip(shown_metrics, [
        (f'{n} Dice', f'{d:.3f}') for n, d in zip(names, scores)])
                     for m in pair]
  columns = st.columns(min(max(len(shown_metrics), 3), 6))
  hint = None if case.spacing else ('No pixel spacing in this file: sizes '
                                    'are in pixels.')
  for i, (label, value) in enumerate(shown_metrics):
    columns[i % len(columns)].metric(label, value, help=hint)
  if settings['mc']:
    _mc_maps(case, extras, predictor, where, shown)


def _mc_maps(case, extras, predictor, where, shown):
  if 'mc' not in extras:
    with st.spinner(f'{predictor.config.eval.mc_samples} MC-dropout passes…'):
      extras['mc'] = views.uncertainty_maps(predictor.predict(
          case.image, case.spacing, uncertainty=True).uncertainty)
  st.markdown('**Uncertainty (MC dropout)** · brighter = higher')
  maps = extras['mc']
  titles = {'mean': 'Mean foreground probability (0–1)',
            'std': 'Standard deviation', 'entropy': 'Predictive entropy'}
  for column, (key, title) in zip(st.columns(3), titles.items()):
    values = maps[key] if where is None else views.slice_of(maps[key],
                                                            where[0], where[1])
    high = 1.0 if key == 'mean' else float(maps[key].max())
    image = shown(views.heat_rgb(values, high))
    column.image(image, width=_width(image),
                 caption=f'{title} · max {high:.3g}')


def _batch(cases, truths, settings, names, predictor, failures):
  """The table of all uploads and the downloads."""
  config = predictor.config
  items, rows = [], []
  for name, (case, prediction, _) in cases:
    labels = views.labels_at(prediction.probabilities, settings['threshold'],
                             config.eval.postprocess)
    items.append((case, labels))
    rows.append(results.table_row(case, labels, names, truths.get(name)))
  rows += [results.failure_row(n, m) for n, m in failures]
  st.subheader(f'All uploads ({len(rows)})')
  st.dataframe(pd.DataFrame(rows), hide_index=True, width='stretch')
  left, right, _ = st.columns([1.4, 1, 2.6])
  left.download_button(
      'Download ZIP (masks + CSV)', lambda: results.zip_bytes(items, rows,
                                                              config),
      file_name='segmentations.zip', mime='application/zip', type='primary',
      disabled=not items, on_click='ignore')
  right.download_button('Download CSV', results.csv_text(rows),
                        file_name=results.CSV_NAME, mime='text/csv',
                        on_click='ignore')


def main():
  """Draws the page."""
  key, predictor = _model_sidebar()
  settings = _settings_sidebar(key, predictor)
  config = predictor.config
  names = list(sources.class_names(config.data))
  st.title('Segmentation dashboard')
  st.caption('Upload photographs (PNG/JPEG), DICOM (a file or a zipped '
             'series) or NIfTI volumes. Research use only.')
  files = st.file_uploader('Images or volumes', accept_multiple_files=True,
                           type=None, key='uploads')
  with st.expander('Ground-truth masks (optional, for Dice)'):
    mask_files = st.file_uploader(
        'Masks named like their image (e.g. ISIC_0001_segmentation.png)',
        accept_multiple_files=True, type=None, key='masks')
  if not files:
    st.info('Upload one or more files to segment them.')
    return
  cases, failures = _analysed(key, predictor, files)
  for _, message in failures:
    st.error(f'Cannot use {message}')
  truths, pairs, gt_errors = _ground_truths(cases, mask_files or [], config)
  for message in gt_errors:
    st.warning(f'Ground truth not used: {message}')
  if cases:
    names_shown = [n for n, _ in cases]
    current = (st.selectbox('Case', names_shown) if len(cases) > 1 else
               names_shown[0])
    case, prediction, extras = dict(cases)[current]
    if mask_files:
      options = ['(none)', *[f.name for f in mask_files]]
      default = pairs.get(current, '(none)')
      st.selectbox('Ground truth', options, options.index(default)
                   if default in options else 0, key=f'gt::{current}')
    _detail(current, case, prediction, extras, settings, names,
            truths.get(current), predictor)
  st.divider()
  _batch(cases, truths, settings, names, predictor, failures)



# Streamlit runs this script with __name__ == '__main__'; a multiprocessing
# child spawned from a process that ran it re-imports it as '__mp_main__'
# and must not start the app.
if __name__ == '__main__':
  main()
