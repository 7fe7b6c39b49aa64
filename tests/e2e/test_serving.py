"""The pipeline as a served MLflow model: logged and registered in a real ``mlflow server``, served by
``mlflow models serve -m models:/<name>@champion --env-manager local``, answering real HTTP requests."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from tiny import tiny_params

from lfdm.pipeline import LFDMPipeline, PipelineConfig
from lfdm.serving import encode_image, log_pipeline
from lfdm.video import count_frames

from .conftest import BIN, free_port, service_env, stop, wait_http

pytestmark = pytest.mark.slow
NAME = "lfdm-serving-e2e"
MINILM_DIM = 384  # the packaged BERT's (text.checkpoint: null), which embeds prompts not in the table


def tiny_pipeline() -> LFDMPipeline:
    """Untrained networks of the shrunk e2e config, with one embedded label."""
    p = tiny_params()
    config = PipelineConfig.from_params(p, MINILM_DIM)
    pipe = LFDMPipeline.from_config(config, {"zoom in": torch.randn(MINILM_DIM)})
    torch.nn.init.normal_(pipe.diffusion.denoiser.final_conv.weight, std=0.1)  # untrained but not all-zero ε
    return pipe


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_served_model_answers_with_a_video_and_names_a_bad_field(tmp_path, mlflow_server, monkeypatch):
    pipe = tiny_pipeline()
    # set_tracking_uri exports MLFLOW_TRACKING_URI: monkeypatch puts it back as it was at teardown
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        info = log_pipeline(pipe, registered_model_name=NAME)
        MlflowClient().set_registered_model_alias(NAME, "champion", info.registered_model_version)
    finally:
        mlflow.set_tracking_uri(previous)

    port, log = free_port(), tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                f"models:/{NAME}@champion",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=service_env(
                tmp_path, MLFLOW_TRACKING_URI=mlflow_server, SERVING_MODEL_CONFIG='{"device": "cpu"}'
            ),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ping", server, 240, log)
        image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
        rows = [
            {"image": encode_image(image), "label": "zoom in"},
            {"image": f"data:image/png;base64,{encode_image(image)}", "label": "pan to the left slowly"},
        ]
        params = {"steps": 3, "guidance": 1, "seed": 7}
        status, answer = post(f"{url}/invocations", {"dataframe_records": rows, "params": params})
        assert status == 200, answer
        first, second = answer["predictions"]
        expected = pipe(
            image,
            "zoom in",
            num_inference_steps=3,
            guidance_scale=1,
            generator=torch.Generator().manual_seed(7),
        ).frames(0)
        assert np.array_equal(np.asarray(first["video"], np.uint8), expected)  # the same video as in-process
        (tmp_path / "answer.mp4").write_bytes(base64.b64decode(second["mp4"]))
        assert count_frames(tmp_path / "answer.mp4") == pipe.num_frames  # a free-text prompt, BERT-embedded

        bad = [
            ({"dataframe_records": [{"label": "zoom in"}]}, "image"),
            ({"dataframe_records": [{**rows[0], "image": "@@@"}]}, "image: not base64"),
            ({"dataframe_records": [{**rows[0], "label": ""}]}, "label: empty"),
            ({"dataframe_records": rows[:1], "params": {"steps": 0}}, "steps: Input should be"),
        ]
        for body, named in bad:
            status, answer = post(f"{url}/invocations", body)
            assert status == 400 and named in answer["message"] and "Traceback" not in json.dumps(answer), (
                answer
            )
    finally:
        stop(server)
