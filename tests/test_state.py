"""Tests of medseg_jax.state (the TrainState is built replicated on the mesh)
and medseg_jax.parallel (host batches are split over the devices).

The suite's process has one CPU device, so the two-device check runs in a
subprocess with XLA_FLAGS forcing two host devices (conftest.subprocess_env).
"""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medseg_jax import parallel
from medseg_jax import state as state_lib
from tests import conftest

INPUT_SHAPE = (1, 4, 4, 2)


class TinyNet(nn.Module):
  """Conv -> BatchNorm -> Conv: params of rank 4 and 1, and batch stats."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(3, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Conv(1, (1, 1))(nn.relu(x))


def _leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def test_abstract_state_matches_the_created_state():
  model, tx, rng = TinyNet(), optax.adam(1e-3), jax.random.key(0)
  mesh = parallel.create_mesh()
  abstract = state_lib.abstract_train_state(model, tx, INPUT_SHAPE, rng)
  state = state_lib.create_train_state(model, tx, INPUT_SHAPE, rng, mesh)
  assert (jax.tree.structure(abstract) == jax.tree.structure(state))
  for (path, a), (_, b) in zip(_leaves(abstract), _leaves(state)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype), jax.tree_util.keystr(path)
  assert int(state.step) == 0 and state.step.dtype == jnp.int32
  assert state.params['Conv_0']['kernel'].shape == (3, 3, 2, 3)
  np.testing.assert_array_equal(state.batch_stats['BatchNorm_0']['mean'], 0.0)
  # Adam's moments start at zero, shaped like the parameters.
  mu = optax.tree_utils.tree_get(state.opt_state, 'mu')
  assert jax.tree.structure(mu) == jax.tree.structure(state.params)
  assert all(float(jnp.abs(m).max()) == 0 for m in jax.tree.leaves(mu))


def test_state_shardings_are_replicated_on_every_leaf():
  mesh = parallel.create_mesh()
  abstract = state_lib.abstract_train_state(TinyNet(), optax.adam(1e-3),
                                            INPUT_SHAPE, jax.random.key(0))
  shardings = state_lib.state_shardings(abstract, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
  for sharding in jax.tree.leaves(shardings):
    assert sharding == parallel.replicated_sharding(mesh)
    assert sharding.spec == jax.sharding.PartitionSpec()


_TWO_DEVICE_SCRIPT = """
import json
import jax, numpy as np, optax
from medseg_jax import parallel, state as state_lib
from tests.test_state import TinyNet, INPUT_SHAPE
mesh = parallel.create_mesh()
state = state_lib.create_train_state(TinyNet(), optax.adamw(1e-3),
                                     INPUT_SHAPE, jax.random.key(0), mesh)
leaves = jax.tree_util.tree_leaves_with_path(state)
out = {'devices': mesh.devices.size, 'leaves': []}
for path, leaf in leaves:
  shards = [np.asarray(s.data) for s in leaf.addressable_shards]
  out['leaves'].append({
      'path': jax.tree_util.keystr(path),
      'replicated': leaf.sharding.is_equivalent_to(
          parallel.replicated_sharding(mesh), leaf.ndim),
      'fully_replicated': leaf.is_fully_replicated,
      'devices': sorted(d.id for d in leaf.sharding.device_set),
      'shard_shapes': sorted({s.shape for s in shards}),
      'shape': list(leaf.shape),
      'identical': all(np.array_equal(s, shards[0]) for s in shards),
  })
# A host batch of 4 rows becomes one global array, 2 rows per device.
batch = parallel.global_batch({'x': np.arange(12).reshape(4, 3)}, mesh)['x']
out['batch_shape'] = list(batch.shape)
out['batch_shards'] = sorted(
    (s.device.id, np.asarray(s.data).tolist())
    for s in batch.addressable_shards)
try:
  parallel.check_batch_size(3, mesh, 'train.batch_size')
except ValueError as e:
  out['batch_size_error'] = str(e)
parallel.check_batch_size(4, mesh, 'train.batch_size')
print('RESULT ' + json.dumps(out, default=list))
"""


def test_state_on_two_devices_is_a_full_copy_on_each_batch_is_split():
  proc = subprocess.run([sys.executable, '-c', _TWO_DEVICE_SCRIPT],
                        cwd=conftest.REPO, env=conftest.subprocess_env(2),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  out = json.loads(line[len('RESULT '):])
  assert out['devices'] == 2
  # step, 4 conv params, 2 BatchNorm params, 2 batch stats, Adam state.
  assert len(out['leaves']) >= 9
  for leaf in out['leaves']:
    assert leaf['replicated'] and leaf['fully_replicated'], leaf
    assert leaf['devices'] == [0, 1], leaf
    # Each device holds the whole array, and the same values.
    assert leaf['shard_shapes'] == [leaf['shape']], leaf
    assert leaf['identical'], leaf
  # parallel.global_batch splits along axis 0 in device order.
  assert out['batch_shape'] == [4, 3]
  assert out['batch_shards'] == [[0, [[0, 1, 2], [3, 4, 5]]],
                                 [1, [[6, 7, 8], [9, 10, 11]]]]
  assert 'train.batch_size=3' in out['batch_size_error']
  assert 'multiple of 2' in out['batch_size_error']
