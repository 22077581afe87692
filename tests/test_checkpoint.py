"""gdistill.checkpoint on one host: each replicated array written once, read back exactly."""

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gdistill import checkpoint


def test_one_host_writes_each_replicated_array_once_and_reads_it_back(devices8, tmp_path):
  """On one process the manager's jax.Array handler is not replica-parallel (that slices
  every array per device, compiling a slice per shape, to write the same bytes from the
  same process); the saved state restores bit-exactly with its sharding."""
  rep = NamedSharding(Mesh(np.array(devices8), ('data',)), P())
  rng = np.random.default_rng(0)
  state = {f'p{i}': jax.device_put(rng.standard_normal(s).astype(np.float32), rep)
           for i, s in enumerate([(3, 3, 4, 8), (8,), (16, 8)])}
  mgr = checkpoint.manager(str(tmp_path / 'phase'))
  assert jax.process_count() == 1
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert handler._use_replica_parallel is False  # pylint: disable=protected-access
  checkpoint.save(mgr, 3, state, {'phase': 'teacher'})
  mgr.wait_until_finished()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), state)
  got = checkpoint.restore(mgr, 3, abstract)
  mgr.close()
  for k, v in state.items():
    assert got[k].sharding == rep
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v))
