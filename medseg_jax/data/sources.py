"""Random-access data sources, selected by `config.data.source`.

A source is a Grain random-access data source (`__len__`, `__getitem__`) whose
records are dicts with `image` (uint8 `[*spatial, C]`), `mask` (uint8
`[*spatial]`, class indices), `patient_id` and `case_id`, plus a cheap
`patient_ids` list (one per record) used to split by patient without decoding.
"""

from medseg_jax.data import synthetic

KNOWN_SOURCES = ('synthetic',)


def build_source(data_cfg):
  """Returns the random-access source that `data_cfg.source` names.

  Args:
    data_cfg: the `config.data` section.

  Returns:
    A random-access source with a `patient_ids` attribute.

  Raises:
    ValueError: unknown source name, or options the source cannot honour.
  """
  if data_cfg.source == 'synthetic':
    if data_cfg.num_classes != 1 or data_cfg.in_channels != 3:
      raise ValueError(
          "config.data.source='synthetic' makes binary RGB lesions: it needs "
          f'config.data.num_classes=1 (got {data_cfg.num_classes}) and '
          f'config.data.in_channels=3 (got {data_cfg.in_channels}).')
    return synthetic.SyntheticLesions(
        num_patients=data_cfg.synthetic.num_patients,
        images_per_patient=data_cfg.synthetic.images_per_patient,
        image_size=data_cfg.image_size,
        seed=data_cfg.synthetic.get('seed', 0))
  raise ValueError(f'Unknown config.data.source={data_cfg.source!r}; known '
                   f'sources: {", ".join(KNOWN_SOURCES)}.')
