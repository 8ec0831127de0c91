"""Device mesh, shardings and host-batch -> global-array conversion.

Data parallelism is `jax.jit` over a one-axis `Mesh` ('data'): parameters are
replicated, batches are split along their leading axis over every device of
every process. The same code runs on 1 CPU, N GPUs or several hosts.
"""

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def create_mesh() -> Mesh:
  """Returns a 1-D mesh over all devices of all processes, axis 'data'."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Returns the sharding of arrays copied on every device (parameters)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Returns the sharding of arrays split along axis 0 over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, key: str) -> None:
  """Raises a clear error if `global_batch` does not split over the devices."""
  if global_batch % mesh.devices.size:
    raise ValueError(
        f'{key}={global_batch} must be divisible by the number of devices '
        f'({mesh.devices.size}); set it to a multiple of {mesh.devices.size}.')


def global_batch(local_batch, mesh: Mesh):
  """Turns this process's part of a batch (a pytree of NumPy arrays) into global arrays.

  Args:
    local_batch: arrays whose leading axis is this process's share of the
      global batch.
    mesh: the device mesh.

  Returns:
    The same pytree of `jax.Array`s, sharded along axis 0 over all devices.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def process_zero_says(flag: bool) -> bool:
  """Returns process 0's `flag` on every process (a collective when multi-process).

  Used at start-up, e.g. so that every process stops when process 0 could
  not lock the workdir, instead of waiting for it forever.
  """
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def barrier(name: str) -> None:
  """Waits until every process has reached `name` (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
