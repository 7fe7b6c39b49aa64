"""The pipeline as an MLflow model: logged and registered in a real (SQLite) tracking store, loaded back with
``mlflow.pyfunc`` and ``LFDMPipeline.from_pretrained``, generating what the pipeline does; a bad request is an
HTTP-400 error that names the field."""

import base64
import os

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from _tiny_bert import write_tiny_bert
from mlflow.exceptions import MlflowException
from test_generate import seeded, tiny_pipeline

from lfdm.pipeline import LFDMPipeline
from lfdm.serving import decode_image, encode_image, log_pipeline
from lfdm.video import count_frames

NAME = "lfdm-unit"
IMAGE = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(write_tiny_bert(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def logged(pipe, tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow")
    previous, previous_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")  # also exports MLFLOW_TRACKING_URI
    try:
        experiment = mlflow.create_experiment("serving", artifact_location=str(home / "artifacts"))
        with mlflow.start_run(experiment_id=experiment):
            info = log_pipeline(pipe, registered_model_name=NAME)
        yield info, mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu"})  # as the pipe
    finally:  # as before: lfdm.tracking lets MLFLOW_TRACKING_URI win over params, so a leftover would leak
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def request(**columns) -> pd.DataFrame:
    return pd.DataFrame({"image": [encode_image(IMAGE)], "label": ["zoom in"]} | columns)


def test_logged_model_generates_what_the_pipeline_does(pipe, logged, tmp_path):
    info, model = logged
    rows = pd.DataFrame({"image": [encode_image(IMAGE)] * 2, "label": ["zoom in", "pan to the left"]})
    answers = model.predict(rows, params={"steps": 3, "seed": 4})
    for i, (answer, label) in enumerate(zip(answers, rows["label"], strict=True)):
        expected = pipe(IMAGE, label, num_inference_steps=3, generator=seeded(4 + i)).frames(
            0
        )  # row i: seed + i
        assert answer["video"].dtype == np.uint8 and np.array_equal(answer["video"], expected)
        (tmp_path / "answer.mp4").write_bytes(base64.b64decode(answer["mp4"]))
        assert count_frames(tmp_path / "answer.mp4") == pipe.num_frames
    default = model.predict(request())[0]["video"]  # the pipeline's own sampler, seed 0
    assert np.array_equal(default, pipe(IMAGE, "zoom in", generator=seeded(0)).frames(0))
    signature = mlflow.models.get_model_info(info.model_uri).signature
    assert signature.inputs.input_names() == ["image", "label"]
    assert {p.name: p.default for p in signature.params.params} == {"steps": 2, "guidance": 1.0, "seed": 0}


def test_device_comes_from_the_model_config(logged):
    info, _ = logged
    with pytest.raises(ValueError, match="model_config device: 'cuda:99'"):
        mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cuda:99"})


def test_registered_version_loads_as_a_pipeline(pipe, logged):
    info, _ = logged
    assert info.registered_model_version == 1
    loaded = LFDMPipeline.from_pretrained(f"models:/{NAME}/1")
    assert loaded.config.model_dump(exclude={"text"}) == pipe.config.model_dump(exclude={"text"})
    ours, theirs = (p(IMAGE, "zoom in", generator=seeded(5)).videos for p in (pipe, loaded))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("rows", "params", "named"),
    [
        (pd.DataFrame({"label": ["zoom in"]}), {}, "missing inputs ['image']"),
        (request(image=["@@@"]), {}, "image: not base64"),
        (
            request(image=[base64.b64encode(b"GIF89a not really").decode()]),
            {},
            "image: not a decodable image",
        ),
        (request(image=[""]), {}, "image: empty"),
        (request(label=["  "]), {}, "label: empty"),
        (pd.concat([request(), request(label=[""])], ignore_index=True), {}, "'zoom in' (row 1)"),
        (request(), {"steps": 0}, "steps: Input should be greater than or equal to 1"),
        (request(), {"steps": 51}, "steps: 51 is more than the model's 50 training timesteps"),
        (request(), {"steps": "many"}, "Failed to validate type and shape for 'steps'"),
        (request(), {"guidance": -1.0}, "guidance: Input should be greater than or equal to 0"),
        (request(), {"seed": -1}, "seed: -1 is negative"),
    ],
    ids=[
        "no-image",
        "not-base64",
        "not-an-image",
        "empty-image",
        "empty-label",
        "second-row",
        "steps-0",
        "steps-over",
        "steps-type",
        "guidance",
        "seed",
    ],
)
def test_bad_request_is_a_400_naming_the_field(logged, rows, params, named):
    _, model = logged
    with pytest.raises(MlflowException) as err:
        model.predict(rows, params=params)
    assert err.value.get_http_status_code() == 400 and named in err.value.message


def test_data_url_images_decode():
    png = encode_image(IMAGE)
    assert np.array_equal(decode_image(f"data:image/png;base64,{png}"), IMAGE)
