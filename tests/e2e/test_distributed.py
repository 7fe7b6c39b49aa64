"""Data-parallel training: ``nproc: 2`` runs the stage under torchrun (gloo on this CPU) and trains like one
process at the same global batch; its checkpoints load in one process; a frozen F stays frozen across
processes; a killed 2-process run resumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow import MlflowClient

from lfdm.data import FramePairDataset, FrameStore, read_manifest
from lfdm.diffusion import load_dm
from lfdm.models.lfae_checkpoints import load_lfae
from lfdm.training import BatchStream, sharded_loader

from .conftest import make_project, service_env, train_until_first_checkpoint

pytestmark = pytest.mark.slow


def stage(project: Path, name: str, env: dict) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "stages", name],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{output[-6000:]}"
    return output


def set_params(project: Path, **sections: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section] |= values
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def loss_curve(project: Path, name: str, column: str) -> list[float]:
    rows = (project / f"plots/{name}.tsv").read_text().splitlines()
    index = rows[0].split("\t").index(column)
    return [float(row.split("\t")[index]) for row in rows[1:]]


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖a‖ over every float tensor of two state dicts."""
    floats = [key for key, value in a.items() if value.is_floating_point()]
    norm = sum(a[k].square().sum() for k in floats).sqrt()
    return float(sum((a[k] - b[k]).square().sum() for k in floats).sqrt() / norm)


def test_process_shares_make_up_the_single_process_batches(tmp_path, monkeypatch):
    project = make_project(tmp_path / "project", {"tracking": {"enabled": False}})
    stage(project, "preprocess", service_env(tmp_path))
    pairs = FramePairDataset(
        FrameStore(project / "data/frames.zarr"),
        read_manifest(project / "data/manifest.parquet", split="train"),
    )

    def batches(world: int, rank: int) -> list[list[str]]:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", str(rank))
        loader = sharded_loader(
            pairs, 4, "train_lfae.batch_size", seed=3, num_workers=0, generator=torch.Generator()
        )
        stream = BatchStream(loader)
        return [next(stream)["video_id"] for _ in range(3 * len(loader))]  # three epochs

    whole = batches(1, 0)
    shares = [batches(2, rank) for rank in range(2)]
    assert [sorted(a + b) for a, b in zip(*shares, strict=True)] == [sorted(batch) for batch in whole]
    assert whole[: len(whole) // 3] != whole[len(whole) // 3 : 2 * len(whole) // 3]  # each epoch reshuffles
    with pytest.raises(ValueError, match="train_lfae.batch_size: 4 is not divisible by the 3"):
        batches(3, 0)


def test_two_processes_train_like_one_at_the_same_global_batch(tmp_path):
    # equivariance off: no random transforms, so both LFAE runs see the very same frames at every step
    project = make_project(
        tmp_path / "project",
        {
            "tracking": {"experiment": "ddp", "uri": f"sqlite:///{tmp_path}/mlflow.db"},
            "train_lfae": {"steps": 4, "batch_size": 4, "equivariance": {"weight": 0}},
            "train_dm": {"steps": 4, "batch_size": 2, "lr": 2e-4},
            # ε-prediction: at the zero-initialised output its loss is ≈ 1 whatever timesteps each process
            # draws; the v-prediction loss ranges from |x0|² to 1 with t, so 2-sample batches would not compare
            "dm": {"diffusion": {"prediction": "epsilon"}},
        },
    )
    env = service_env(tmp_path)
    stage(project, "preprocess", env)
    runs: dict[int, dict[str, tuple]] = {}
    for nproc in (1, 2):
        set_params(project, train_lfae={"nproc": nproc}, train_dm={"nproc": nproc})
        stage(project, "train_lfae", env)
        if nproc == 1:  # the DM trains on the flows of the same (single-process) LFAE both times
            stage(project, "extract_flow", env)
            stage(project, "embed_labels", env)
        stage(project, "train_dm", env)
        runs[nproc] = {
            name: (loss_curve(project, name, column), torch.load(project / path, weights_only=True)["model"])
            for name, column, path in (
                ("train_lfae", "loss/total", "data/models/lfae.pt"),
                ("train_dm", "loss/diffusion", "data/models/dm.pt"),
            )
        }

    # Not bit-equal, and cannot be on CPU: the LFAE's BatchNorm normalises each process's 2 samples, not
    # the global 4 (gloo has no SyncBatchNorm; on CUDA the layers are synchronised), and each process
    # draws its own diffusion noise and timesteps. Measured: losses within 7.3% at every step (LFAE
    # 82.10 vs 77.53 at step 1, DM 1.033 vs 0.965 at step 2), weights within 0.5% relative norm; the
    # tolerances leave 2-4x margin.
    for name in ("train_lfae", "train_dm"):
        (one_curve, one_weights), (two_curve, two_weights) = runs[1][name], runs[2][name]
        assert two_curve == pytest.approx(one_curve, rel=0.2), name
        assert relative_difference(one_weights, two_weights) < 0.02, name
    load_lfae(project / "data/models/lfae.pt", torch.device("cpu"))  # rank 0's weights load in one process
    load_dm(project / "data/models/dm.pt", torch.device("cpu"))

    # one MLflow run per stage run: rank 0 logged the step losses into the run the launcher opened
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs(
        [client.get_experiment_by_name("ddp").experiment_id],
        "tags.`lfdm.stage` = 'train_lfae'",
        order_by=["attributes.start_time DESC"],
    )
    assert len(found) == 2 and found[0].info.status == "FINISHED"
    history = client.get_metric_history(found[0].info.run_id, "loss/total")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(runs[2]["train_lfae"][0])
    assert found[0].data.params["steps"] == "4"  # a count: a param, not a metric


def test_two_processes_keep_a_frozen_motion_fixed(tmp_path):
    project = make_project(
        tmp_path / "project", {"tracking": {"enabled": False}, "train_lfae": {"steps": 2, "batch_size": 4}}
    )
    env = service_env(tmp_path)
    stage(project, "preprocess", env)
    stage(project, "train_lfae", env)  # a warm start with this config's sizes
    (project / "data/models/lfae.pt").rename(project / "init.pt")
    set_params(project, train_lfae={"init": "init.pt", "freeze_motion": True, "nproc": 2})
    stage(project, "train_lfae", env)

    before, _ = load_lfae(project / "init.pt", torch.device("cpu"))
    after, _ = load_lfae(project / "data/models/lfae.pt", torch.device("cpu"))
    motion = zip(before.flow_predictor.motion_modules(), after.flow_predictor.motion_modules(), strict=True)
    for frozen, trained in motion:
        for key, value in frozen.state_dict().items():  # BatchNorm statistics included
            assert torch.equal(value, trained.state_dict()[key]), key
    assert not torch.equal(before.decoder.final.weight, after.decoder.final.weight)
    assert not torch.equal(
        before.flow_predictor.pixelwise_flow_predictor.occlusion.weight,
        after.flow_predictor.pixelwise_flow_predictor.occlusion.weight,
    )


def test_killed_two_process_training_resumes_from_its_checkpoint(tmp_path):
    steps = 40
    project = make_project(
        tmp_path / "project",
        {
            "tracking": {"enabled": False},
            "train_lfae": {"steps": steps, "checkpoint_every": 5, "log_every": 1, "nproc": 2},
        },
    )
    env = service_env(tmp_path)
    stage(project, "preprocess", env)
    checkpoint = project / "data/checkpoints/train_lfae.pt"
    proc = train_until_first_checkpoint(project, env)
    # the launcher, torchrun and both workers at once, as a crash would (torchrun starts each worker in its
    # own session, so killing the launcher's process group would leave them running)
    for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        process.kill()
    proc.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < killed_at < steps

    assert f"resumed at step {killed_at}" in stage(project, "train_lfae", env)
    assert torch.load(project / "data/models/lfae.pt", weights_only=True)["step"] == steps
    assert not checkpoint.exists()
    rows = (project / "plots/train_lfae.tsv").read_text().splitlines()[1:]
    assert [int(row.split("\t")[0]) for row in rows] == list(range(1, steps + 1))
