"""The trial engine on a ('trial', 'data') mesh of 8 fake CPU devices: same results, really sharded,
one compiled chunk program per (strategy, group size). The sharded run uses 'map' (each device maps over its
block of trials); tests/test_multihost.py runs 'vmap' sharded over two processes."""

import pytest
from scaleout import assert_same_results, results, run_probe

from agejax.errors import ConfigError
from agejax.parallel.sharding import MeshConfig, trial_axis_size


@pytest.fixture(scope="module")
def sharded(tiny_reference, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sharded")
  probe = run_probe(workdir, "--config.mesh.trial=4", "--config.mesh.data=2", "--config.checkpoint.enabled=False",
                    "--config.trials.parallel=map", "--config.mesh.cpu_devices=8", AGEJAX_CPU_DEVICES="")
  return workdir, probe


def test_sharded_study_matches_unsharded(tiny_reference, sharded):
  got = results(sharded[0])
  assert {r["strategy"] for r in got} == {"map"}
  assert_same_results(got, results(tiny_reference[0]), exact=False, ignore=("strategy",))


def test_group_state_is_sharded_over_the_mesh(sharded):
  probe = sharded[1]
  assert probe["devices"] == 8  # made by config.mesh.cpu_devices
  # 3 trials padded to 4 on the 4-device trial axis: one trial per device pair, copied on the 'data' axis.
  group = probe["groups"]["3"]
  assert group["sharding"] == "NamedSharding" and group["spec"] == "P('trial',)"
  assert group["shape"][0] == 4 and group["devices"] == 8 and group["shard_rows"] == [1]
  assert probe["data_allreduce"] > 0  # gradients are summed over the 'data' axis: data parallelism in a trial


def test_one_trace_per_strategy_and_group_size(tiny_reference, sharded):
  # Two sizes x (8 or 4) chunks each: one trace per group size. Unsharded: groups of 2 and 1 trials.
  assert tiny_reference[1]["traces"] == {"vmap,2": 1, "vmap,1": 1}
  assert tiny_reference[1]["groups"]["3"]["sharding"] == "SingleDeviceSharding"
  # Sharded: the 3 trials of each size form one group padded to 4, so one program serves both sizes.
  assert sharded[1]["traces"] == {"map,4": 1}


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
  """'loop' on 2 CPU devices: one trial per device at a time, the engine's default on a 2-core CPU."""
  workdir = tmp_path_factory.mktemp("looped")
  probe = run_probe(workdir, "--config.checkpoint.enabled=False", "--config.trials.parallel=loop",
                    AGEJAX_CPU_DEVICES="2")
  return workdir, probe


def test_loop_over_devices_matches_one_device(tiny_reference, looped):
  got = results(looped[0])
  assert {r["strategy"] for r in got} == {"loop"}
  assert_same_results(got, results(tiny_reference[0]), exact=False, ignore=("strategy",))
  probe = looped[1]
  assert probe["devices"] == 2
  group = probe["groups"]["3"]  # 3 trials: groups of 2, one trial per device, the last padded
  assert group["spec"] == "P('trial',)" and group["shape"][0] == 2 and group["shard_rows"] == [1]
  assert probe["traces"] == {"loop,2": 1}  # one program for both sizes and every group


def test_trial_axis_size_rule():
  auto = MeshConfig()
  assert [trial_axis_size(auto, g, 8) for g in (1, 7, 8, 32)] == [1, 1, 8, 8]
  assert [trial_axis_size(MeshConfig(data=2), g, 8) for g in (3, 4)] == [1, 4]
  assert trial_axis_size(MeshConfig(trial=2), 1, 8) == 2
  with pytest.raises(ConfigError):
    MeshConfig(data=0)
  assert MeshConfig.from_config({"mesh": {"trial": 4, "data": 2}}) == MeshConfig(4, 2)
  assert MeshConfig.from_config({}) == MeshConfig(0, 1)


def test_group_layout_per_strategy(monkeypatch):
  from agejax.parallel import sharding

  unsharded = {s: sharding.group_layout(None, s, 5, trial_chunk=2) for s in ("loop", "vmap", "map")}
  assert unsharded["loop"] == sharding.GroupLayout(None, 1, tuple(slice(i, i + 1) for i in range(5)))
  assert unsharded["vmap"] == sharding.GroupLayout(None, 2, (slice(0, 2), slice(2, 4), slice(4, 5)))
  assert unsharded["map"] == sharding.GroupLayout(None, 5, (slice(0, 5),))  # trial_chunk: trials per lax.map step
  assert sharding.group_layout(None, "vmap", 3).slices == (slice(0, 3),)  # trial_chunk 0: all trials

  class FakeMesh:  # a 'trial' axis of 4 devices, whatever the group
    shape = {"trial": 4, "data": 1}

  asked = []
  monkeypatch.setattr(sharding, "mesh_for_group", lambda config, n: asked.append(n) or FakeMesh())
  sharded = {s: sharding.group_layout(MeshConfig(), s, 6, trial_chunk=3) for s in ("loop", "vmap", "map")}
  assert asked == [6, 3, 6]  # 'loop' asks for the whole size, the others for their nominal group
  assert (sharded["loop"].group_size, sharded["loop"].slices) == (4, (slice(0, 4), slice(4, 6)))  # one per device
  assert (sharded["vmap"].group_size, sharded["vmap"].slices) == (4, (slice(0, 4), slice(4, 6)))  # 3 padded to 4
  assert (sharded["map"].group_size, sharded["map"].slices) == (8, (slice(0, 6),))  # 6 padded to 8
