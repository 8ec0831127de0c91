"""config_lib: defaults merged once over a saved config, derived values, and
configs/run.py with absl's stock `--config.KEY=VALUE` flags."""

import json
import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from medseg_jax import config_lib
from medseg_jax import workdir as workdir_lib
from tests import conftest


def _saved(**sections):
  """Returns configs/default.py as a config.json dict, with `sections` set."""
  saved = json.loads(config_lib.default_config().to_json_best_effort())
  return conftest.set_fields(saved, sections)  # Plain dicts index alike.


def _old_run(tmp_path, saved):
  workdir = tmp_path / 'old_run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(saved))
  return str(workdir)


def test_an_old_config_json_gets_the_defaults_it_lacks(tmp_path):
  saved = _saved(data__patch_size=[8, 16, 16], model__features=[4, 8],
                 eval__overlap=0.25)
  del saved['eval']['sw_batch_size']  # Keys added after the run trained.
  del saved['data']['preprocess']
  saved['model']['num_heads'] = 4  # An experiment file's own key stays.
  config = workdir_lib.load_config(_old_run(tmp_path, saved))
  assert config.eval.sw_batch_size == 4  # configs/default.py's value.
  assert config.data.preprocess.intensity == 'zscore'
  assert config.data.preprocess.target_spacing == ()
  assert config.eval.overlap == 0.25  # The run's own values win.
  assert config.model.num_heads == 4
  # JSON lists come back as the tuples config files write.
  assert config.data.patch_size == (8, 16, 16)
  assert config.model.features == (4, 8)
  assert config_lib.sliding_window(config) == {
      'overlap': 0.25, 'blend': 'gaussian', 'batch_size': 4}


def test_loss_weights_are_the_runs_not_merged_with_the_defaults():
  saved = _saved()
  saved['loss']['weights'] = {'dice': 1.0}  # Trained with Dice alone.
  config = config_lib.from_saved(saved)
  assert config.loss.weights.to_dict() == {'dice': 1.0}


def test_derived_values():
  config = config_lib.default_config()
  assert config_lib.image_size(config) == (256, 256)
  assert config_lib.spatial_shape(config) == (256, 256)
  assert config_lib.model_input_shape(config) == (1, 256, 256, 3)
  assert config_lib.patch_size(config) == ()
  assert config_lib.slice_context(config) is None
  config = config_lib.from_saved(_saved(data__image_size=[48, 64]))
  assert config_lib.spatial_shape(config) == (48, 64)
  config.data.source = 'synthetic3d'
  config.data.synthetic3d.volume_size = (8, 16, 24)
  assert config_lib.spatial_shape(config) == (8, 16, 24)
  config.data.patch_size = (4, 8, 8)  # The patch wins over the volume size.
  assert config_lib.spatial_shape(config) == (4, 8, 8)
  # 2D slices of NIfTI volumes with one neighbour each side: 2 x 3 channels.
  config.data.update(source='nifti', volume_mode='2d', slice_context=1,
                     in_channels=6, patch_size=())
  assert config_lib.slice_context(config) == 1
  assert config_lib.volume_channels(config) == 2
  assert config_lib.spatial_shape(config) == (48, 64)
  config.data.volume_mode = '3d'
  assert config_lib.slice_context(config) is None
  assert config_lib.volume_channels(config) == 6


def test_with_overrides_copies_and_names_an_unknown_key():
  config = config_lib.default_config()
  changed = config_lib.with_overrides(config, {'eval.tta': True,
                                               'eval.postprocess.min_size': 5})
  assert changed.eval.tta and changed.eval.postprocess.min_size == 5
  assert not config.eval.tta  # The original is untouched.
  with pytest.raises(ValueError, match=r"config.eval has no field 'tt' "
                     r"\(its fields: .*tta"):
    config_lib.with_overrides(config, {'eval.tt': True})


def _parse(argv):
  """Parses argv with a fresh `--config` flag, as main.py defines it."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_run_config_file_takes_typed_config_flags(tmp_path):
  saved = _saved(data__patch_size=[8, 16, 16])
  del saved['eval']['blend']  # An old run: the default is merged in.
  workdir = _old_run(tmp_path, saved)
  config = _parse(['main', f'--config={config_lib.RUN_CONFIG}:{workdir}',
                   '--config.eval.mc_samples=3', '--config.eval.tta',
                   '--config.eval.threshold=0.3',
                   '--config.eval.postprocess.fill_holes=true',
                   '--config.data.patch_size=(8,32,32)',
                   '--config.eval.blend=constant'])
  assert config.eval.mc_samples == 3 and config.eval.tta is True
  assert config.eval.threshold == 0.3 and config.eval.postprocess.fill_holes
  assert config.data.patch_size == (8, 32, 32)
  assert config.eval.blend == 'constant'
  assert config.model.name == 'unetpp'  # The rest is the run's config.json.
  with pytest.raises(Exception):  # config_flags' own error for a bad value.
    _parse(['main', f'--config={config_lib.RUN_CONFIG}:{workdir}',
            '--config.eval.mc_samples=x'])


def test_defaults_load_from_another_folder_and_say_where_they_are_missing(
    tmp_path, monkeypatch):
  # An editable install run outside the repository still finds configs/.
  code = ('import sys; from medseg_jax import config_lib; '
          'print(config_lib.default_config().model.name, '
          "'jax' in sys.modules)")
  env = dict(os.environ, PYTHONPATH=conftest.REPO)
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60, check=True)
  assert out.stdout.split() == ['unetpp', 'False']
  monkeypatch.setattr(config_lib, 'CONFIGS_DIR', str(tmp_path / 'configs'))
  config_lib._default_module.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(FileNotFoundError,
                       match=r'configs/default.py does not exist.*pip install'):
      config_lib.default_config()
  finally:
    monkeypatch.undo()
    config_lib._default_module.cache_clear()  # pylint: disable=protected-access
