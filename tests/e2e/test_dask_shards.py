"""The clip-by-clip stages sharded over 2 local Dask workers (Prefect's Dask task runner, a real Prefect
server) write what the serial ``dvc repro`` wrote."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import zarr

from lfdm.data import read_manifest

from .conftest import make_project, service_env
from .test_pipeline import run

pytestmark = pytest.mark.slow

# every stage gets several batches, so the shards split real work; redrawn training clips must not
# depend on the shards either
SMALL_BATCHES = {
    "tracking": {"enabled": False},
    "extract_flow": {"batch_size": 2, "draws": 3},
    "sample": {"batch_size": 2},
    "evaluate": {"batch_size": 2},
}

SHARDED_RUN = """
import sys
from flows.dask_shards import dask_map_shards
from lfdm.config import ParallelConfig, load_params
from stages import SHARDED, execute

p = load_params()
p = p.model_copy(update={"paths": p.paths.model_copy(update={
    "flows": "dask/flows.zarr", "samples": "dask/samples", "references": "dask/references.pt", "metrics": "dask/metrics",
    "plots": "dask/plots"})})
cluster = ParallelConfig(dask=True, shards=3, workers=2)
for name in SHARDED:
    execute(name, p, dask_map_shards(cluster, name))
"""


def arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for name, member in group.members(max_depth=None):
        if isinstance(member, zarr.Array):
            out[name] = member[...]
    return out


def test_two_dask_workers_write_what_the_serial_run_wrote(tmp_path, prefect_server):
    project = make_project(tmp_path / "project", SMALL_BATCHES)
    env = service_env(tmp_path, PREFECT_API_URL=prefect_server)
    run(["dvc", "repro"], project, env)
    output = run([sys.executable, "-c", SHARDED_RUN], project, env)
    assert "extract_flow-shards" in output and "Completed" in output  # the sub-flows ran on the task runner

    serial, sharded = project / "data", project / "dask"
    for store in ("flows.zarr", "samples/frames.zarr", "samples/flows.zarr"):
        want, got = arrays(serial / store), arrays(sharded / store)
        assert sorted(got) == sorted(want) and want, store
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=1e-3, err_msg=f"{store}/{name}")
    flows, train = arrays(serial / "flows.zarr"), read_manifest(serial / "manifest.parquet", split="train")
    assert {name for name in flows if name.startswith("redrawn_z0/")} == {
        f"redrawn_z0/{r.video_id}" for r in train
    }
    z0, redrawn = flows[f"z0/{train[0].video_id}"], flows[f"redrawn_z0/{train[0].video_id}"]
    assert redrawn.shape == (2, *z0.shape) and not np.allclose(redrawn[0], z0) and not np.allclose(*redrawn)
    assert read_manifest(sharded / "samples/manifest.parquet") == read_manifest(
        serial / "samples/manifest.parquet"
    )
    assert (sharded / "samples/gifs").is_dir() and len(list((sharded / "samples/gifs").iterdir())) == len(
        list((serial / "samples/gifs").iterdir())
    )

    for stage in ("evaluate_references", "evaluate"):
        want = json.loads((project / f"metrics/{stage}.json").read_text())
        got = json.loads((project / f"dask/metrics/{stage}.json").read_text())
        assert got.keys() == want.keys() and want, stage
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-3), f"{stage}: {key}"
