"""The product as users meet it, on a shrunk config: ``dvc repro`` in a fresh git repo against a real
``mlflow server``; the Prefect deployment ``lfdm/full`` through a real Prefect server; a killed
training stage resuming from its checkpoint."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from PIL import Image

from lfdm.config import load_params
from lfdm.data import FrameStore, read_manifest
from lfdm.models.lfae_checkpoints import sampling_lfae_path
from lfdm.pipeline import LFDMPipeline, sampler_config
from lfdm.serving import encode_image
from lfdm.tracking import CODE_DIRS as CODE
from lfdm.video import count_frames
from stages import SHARDED, STAGES, TRAINING

from .conftest import BIN, make_project, service_env, stop, train_until_first_checkpoint

pytestmark = pytest.mark.slow
TRACKED = [stage for stage in STAGES if stage != "finetune_decoder"]  # off by default, so it opens no run


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 1200) -> str:
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{output[-6000:]}"
    return output


def stages_ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def assert_pipeline_outputs(project: Path) -> None:
    p = load_params(project / "params.yaml")
    for out in (
        p.paths.frames,
        p.paths.manifest,
        p.paths.lfae,
        p.paths.flows,
        p.paths.embeddings,
        p.paths.dm,
        p.paths.references,
    ):
        assert (project / out).exists(), out
    samples = project / p.paths.samples
    assert (samples / "manifest.parquet").is_file() and any((samples / "gifs").glob("*.gif"))
    for stage in STAGES:
        metrics = json.loads((project / p.paths.metrics / f"{stage}.json").read_text())
        assert metrics and all(isinstance(v, (int, float)) for v in metrics.values()), stage
    evaluate = json.loads((project / p.paths.metrics / "evaluate.json").read_text())
    for method in ("lfdm", "static", "oracle"):
        assert {
            f"l1/{method}",
            f"fvd/{method}",
            f"sfvd/{method}",
            f"accuracy/{method}",
            f"fid_i3d/{method}",
            f"fid_mobilenetv2/{method}",
        } <= set(evaluate)
    assert {"accuracy/real", "flow_cosine", "fvd_seen/lfdm", "fvd_unseen/lfdm"} <= set(evaluate)
    assert evaluate["seen_videos"] == 2 and evaluate["fvd/static"] > 0
    assert "| lfdm |" in (project / p.paths.metrics / "evaluate_table.md").read_text()
    for plot in ("train_lfae.tsv", "train_dm.tsv", "evaluate_l1_per_frame.json", "real_vs_generated.gif"):
        assert (project / p.paths.plots / plot).is_file(), plot
    grid = Image.open(project / p.paths.plots / "real_vs_generated.gif")
    assert grid.n_frames == p.data.num_frames  # the real clips move: every frame differs
    assert len(set(np.asarray(grid.convert("L")).ravel().tolist())) > 16  # images, not a thresholded mask


def first_test_clip(project: Path) -> str:
    return read_manifest(project / "data/manifest.parquet", split="test")[0].video_id


def pipeline_runs(tracking_uri: str, experiment: str) -> tuple[object, list]:
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("lfdm.kind") == "pipeline"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def assert_registered_champion(project: Path, tracking_uri: str, evaluate_run, evaluated: dict):
    """The pipeline run's model is ``models:/lfdm@champion`` (the first version on this server) and generates,
    for an image and a label, the video the pipeline's checkpoints do with the same seed. Returns the version."""
    champion = MlflowClient(tracking_uri).get_model_version_by_alias("lfdm", "champion")
    assert champion.run_id == evaluate_run.info.run_id
    assert float(champion.tags["fvd"]) == pytest.approx(evaluated["fvd/lfdm"])
    assert evaluate_run.data.tags["lfdm.registry.decision"] == "champion"
    p = load_params(project / "params.yaml")
    pipe = LFDMPipeline.from_checkpoints(
        project / sampling_lfae_path(p),
        project / p.paths.dm,
        project / p.paths.embeddings,
        p.text,
        torch.device("cpu"),
        sampler_config(p.sample),
    )
    image = FrameStore(project / p.paths.frames).read(first_test_clip(project), [0])[0]
    with _use_tracking_uri(tracking_uri):
        model = mlflow.pyfunc.load_model("models:/lfdm@champion", model_config={"device": "cpu"})
    request = pd.DataFrame({"image": [encode_image(image)], "label": ["zoom in"]})
    answer = model.predict(request, params={"steps": 3, "seed": 7})[0]["video"]
    expected = pipe(image, "zoom in", num_inference_steps=3, generator=torch.Generator().manual_seed(7))
    assert answer.shape == (p.data.num_frames, *image.shape) and np.array_equal(answer, expected.frames(0))
    return champion


def test_dvc_repro_tracks_into_mlflow_server_and_reruns_only_what_changed(tmp_path, mlflow_server):
    project = make_project(tmp_path / "project", {"tracking": {"experiment": "dvc-e2e"}})
    # a system-metrics sample every half second, so that the tiny training stages log some
    env = service_env(
        tmp_path, MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5"
    )

    first = run(["dvc", "repro"], project, env)
    assert sorted(stages_ran(first)) == sorted(STAGES)
    assert_pipeline_outputs(project)
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == set(STAGES)
    shown = subprocess.run(
        ["dvc", "metrics", "show", "--json"], cwd=project, env=env, capture_output=True, text=True, check=True
    )
    declared = json.loads(shown.stdout)[""]["data"]  # DVC's metrics: the headline and the training losses
    assert set(declared) == {"metrics/headline.json", "metrics/train_lfae.json", "metrics/train_dm.json"}
    assert declared["metrics/headline.json"]["data"]["fvd/lfdm"] == pytest.approx(
        json.loads((project / "metrics/evaluate.json").read_text())["fvd/lfdm"]
    )

    parent, children = pipeline_runs(mlflow_server, "dvc-e2e")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["dm.unet.dim"] == "8"
    assert sorted(r.info.run_name for r in children) == sorted(TRACKED)
    evaluated = json.loads((project / "metrics/evaluate.json").read_text())
    headline = parent.data.metrics  # evaluate's headline, on the parent
    assert headline["fvd/lfdm"] == pytest.approx(evaluated["fvd/lfdm"])
    assert headline["fvd_vs_static/oracle"] == pytest.approx(
        evaluated["fvd/oracle"] / evaluated["fvd/static"]
    )
    client, by_name = MlflowClient(mlflow_server), {r.info.run_name: r for r in children}
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for name, stage_run in by_name.items():  # each run names the outputs DVC recorded
        recorded = {f"dvc.md5.{out['path']}": out["md5"] for out in lock[name]["outs"]}
        assert recorded.items() <= stage_run.data.tags.items(), name
        data_deps = {
            d["path"]: d["md5"] for d in lock[name].get("deps", []) if not d["path"].startswith(CODE)
        }
        inputs = {
            i.dataset.name: i.dataset.digest
            for i in client.get_run(stage_run.info.run_id).inputs.dataset_inputs
        }
        assert inputs == data_deps, name  # what it read, by DVC's md5
        assert ("system/cpu_utilization_percentage" in stage_run.data.metrics) == (name in TRAINING), name
    assert len(client.get_metric_history(by_name["train_lfae"].info.run_id, "loss/total")) == 4
    assert "l1/lfdm" in by_name["evaluate"].data.metrics
    assert by_name["train_dm"].data.params["train_dm.train_dm.steps"] == "4"
    artifacts = {name: {a.path for a in client.list_artifacts(r.info.run_id)} for name, r in by_name.items()}
    assert "reconstructions.png" in artifacts["train_lfae"]
    assert {"train_dm.tsv", "flows_real_vs_sampled.png"} <= artifacts["train_dm"]  # loss table, sampled flows
    assert "pretrain_flow.tsv" in artifacts["pretrain_flow"]
    assert "real_vs_generated.gif" in artifacts["evaluate"]
    assert client.list_artifacts(by_name["sample"].info.run_id, "samples")
    champion = assert_registered_champion(project, mlflow_server, by_name["evaluate"], evaluated)

    assert stages_ran(run(["dvc", "repro"], project, env)) == []  # nothing changed → nothing runs

    # the CLI generates from the pipeline's models, for a free-text label never seen in training
    Image.fromarray(FrameStore(project / "data/frames.zarr").read(first_test_clip(project), [0])[0]).save(
        project / "face.png"
    )
    out = run(
        [
            str(BIN / "lfdm"),
            "generate",
            "--image",
            "face.png",
            "--label",
            "zoom in very slowly",
            "--out",
            "clip.mp4",
            "--flow-out",
            "flow.png",
            "--steps",
            "3",
            "--timestep-spacing",
            "trailing",
        ],
        project,
        env,
    )
    assert "wrote clip.mp4 (4 frames" in out
    assert count_frames(project / "clip.mp4") == 4 and Image.open(project / "flow.png").size == (
        4 * 8 * 4,
        8 * 4,
    )
    (project / "notes.png").write_text("not an image")
    bad = subprocess.run(
        [str(BIN / "lfdm"), "generate", "--image", "notes.png", "--label", "zoom in", "--out", "x.gif"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "notes.png: not a readable image" in bad.stderr

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_dm"]["lr"] = 1e-4
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_ran(run(["dvc", "repro"], project, env)) == ["train_dm", "sample", "evaluate"]
    # a second version on the same test set: champion only if its FVD is lower
    latest = client.search_runs(
        [parent.info.experiment_id], "tags.`lfdm.stage` = 'evaluate'", order_by=["attributes.start_time DESC"]
    )[0].data.tags
    second = client.get_model_version("lfdm", latest["lfdm.registry.version"])
    assert second.tags["test_set"] == champion.tags["test_set"]  # evaluate_references did not run again
    better = float(second.tags["fvd"]) < float(champion.tags["fvd"])
    assert latest["lfdm.registry.champion_fvd"] == champion.tags["fvd"]
    assert latest["lfdm.registry.decision"] == ("champion" if better else "kept")
    now = client.get_model_version_by_alias("lfdm", "champion").version
    assert str(now) == str(second.version if better else champion.version)


def test_prefect_deployment_runs_the_pipeline(tmp_path, prefect_server, mlflow_server):
    """The deployment as users run it, with the clip-by-clip stages sharded over 2 local Dask workers and a
    param set from the run; a second run triggered at once waits and then has nothing to do; the evaluation
    table and the MLflow run become a Prefect artifact."""
    project = make_project(
        tmp_path / "project",
        {"tracking": {"experiment": "prefect-e2e"}, "parallel": {"dask": True, "shards": 2, "workers": 2}},
    )
    env = service_env(tmp_path, PREFECT_API_URL=prefect_server, MLFLOW_TRACKING_URI=mlflow_server)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.serve"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(
            [str(BIN / "prefect"), "deployment", "inspect", "lfdm/full"],
            cwd=project,
            env=env,
            capture_output=True,
            check=False,
        ).returncode:
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        deployment_run = [str(BIN / "prefect"), "deployment", "run", "lfdm/full", "--watch"]
        first = subprocess.Popen(
            [*deployment_run, "--param", 'set_params={"sample.seed": 5}'],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(2)
        second = run(deployment_run, project, env)  # queued behind the first (one run at a time)
        output = first.communicate(timeout=1200)[0]
        assert first.returncode == 0 and "Completed" in output, output[-3000:] + log.read_text()[-3000:]
        assert "Completed" in second, second[-3000:]
        inspect = [str(BIN / "prefect"), "artifact", "inspect", "lfdm-evaluation"]
        artifact = " ".join(run(inspect, project, env | {"COLUMNS": "500"}).split())  # rich wraps long lines
    finally:
        stop(serve)
    served = log.read_text()
    for stage in SHARDED:
        assert f"{stage}-shards" in served, served[-3000:]  # the stage's shards ran as a Dask sub-flow
    # stage logs reach the runs' logs: training progress at each checkpoint and each stage's result
    assert re.search(r"train_dm: step 4/4 \(loss/diffusion [\d.e+-]+, lr", served), served[-3000:]
    assert re.search(r"evaluate: done in [\d.]+ s \(.*fvd/lfdm", served), served[-3000:]
    for stage in ("train_dm", "sample", "evaluate"):  # the second run found them up to date
        assert served.count(f"{stage}: up to date (dvc status), skipped") == 1, served[-3000:]
    assert yaml.safe_load((project / "params.yaml").read_text())["sample"]["seed"] == 5
    assert "| lfdm |" in artifact and f"MLflow: {mlflow_server}" in artifact, artifact

    assert_pipeline_outputs(project)
    # the flow recorded what it ran in dvc.lock, so DVC agrees that everything is up to date
    assert stages_ran(run(["dvc", "repro"], project, env)) == []
    parent, children = pipeline_runs(mlflow_server, "prefect-e2e")
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == sorted(TRACKED)


def test_killed_training_stage_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    steps = 60
    project = make_project(
        tmp_path / "project",
        {
            "tracking": {"enabled": False},
            "train_lfae": {"steps": steps, "checkpoint_every": 5, "log_every": 1},
        },
    )
    env = service_env(tmp_path)
    run([sys.executable, "-m", "stages", "preprocess"], project, env)
    checkpoint = project / "data/checkpoints/train_lfae.pt"
    proc = train_until_first_checkpoint(project, env)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < killed_at < steps

    output = run([sys.executable, "-m", "stages", "train_lfae"], project, env)
    assert f"resumed at step {killed_at}" in output
    resumed = torch.load(project / "data/models/lfae.pt", weights_only=True)
    assert resumed["step"] == steps
    assert not checkpoint.exists()  # a finished run leaves no resume state: the next run trains afresh
    plot = project / "plots/train_lfae.tsv"
    resumed_plot = plot.read_text()
    logged = [int(line.split("\t")[0]) for line in resumed_plot.splitlines()[1:]]
    assert logged == list(range(1, steps + 1))  # the history from before the kill came back

    output = run([sys.executable, "-m", "stages", "train_lfae"], project, env)  # uninterrupted, from step 0
    assert "resumed" not in output
    whole = torch.load(project / "data/models/lfae.pt", weights_only=True)
    for key, value in whole["model"].items():  # bit for bit: the data order and every generator came back
        assert torch.equal(value, resumed["model"][key]), key
    assert plot.read_text() == resumed_plot
