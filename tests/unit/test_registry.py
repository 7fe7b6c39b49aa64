"""After evaluate, each pipeline run registers a version of the model in a real (SQLite) MLflow store, and the
alias champion moves to it only when its FVD beats the champion's on the same test set."""

from __future__ import annotations

import os

import mlflow
import pytest
from _tiny_bert import write_tiny_bert
from mlflow import MlflowClient
from test_generate import tiny_pipeline

from lfdm import serving, tracking

NAME = "lfdm-registry"
pytestmark = pytest.mark.usefixtures("clean_env")  # and `store`: tests/unit/conftest.py


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(write_tiny_bert(tmp_path_factory.mktemp("bert")))


def evaluated(pipe, fvd: float, test_set: str, name: str = NAME) -> str:
    """What the end of an evaluate stage does, in a pipeline run of its own; returns the stage's run id."""
    with tracking.pipeline_run({}), tracking.stage_run("evaluate", {}, {}) as run_id:
        serving.register(pipe, {"fvd/lfdm": fvd, "l1/lfdm": fvd / 1000}, test_set, name)
    assert run_id
    return run_id


def test_champion_moves_only_to_a_better_fvd_on_the_same_test_set(pipe, store, capsys):
    assert tracking.configure(store, "registry")
    fluent_uri = mlflow.get_tracking_uri()
    runs = [
        evaluated(pipe, fvd, test_set)
        for fvd, test_set in [(300.0, "a"), (350.0, "a"), (250.0, "a"), (100.0, "b")]
    ]
    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias(NAME, serving.CHAMPION).version) == "3"
    tags = [client.get_run(run_id).data.tags for run_id in runs]
    assert [t["lfdm.registry.decision"] for t in tags] == ["champion", "kept", "champion", "kept"]
    assert [t["lfdm.registry.version"] for t in tags] == ["1", "2", "3", "4"]
    assert (
        "lfdm.registry.champion_fvd" not in tags[0] and tags[0]["lfdm.registry.reason"] == "no champion yet"
    )
    assert (tags[1]["lfdm.registry.fvd"], tags[1]["lfdm.registry.champion_fvd"]) == ("350.0", "300.0")
    assert tags[1]["lfdm.registry.reason"] == "FVD 350.00 does not beat version 1's 300.00"
    assert tags[2]["lfdm.registry.reason"] == "FVD 250.00 beats version 1's 300.00"
    assert tags[3]["lfdm.registry.reason"] == "version 3 was scored on another test set"
    assert (
        "lfdm-registry version 4 is not champion: version 3 was scored on another test set"
        in capsys.readouterr().err
    )
    version = client.get_model_version(NAME, "4")
    assert version.run_id == runs[3] and version.tags == {"fvd": "100.0", "test_set": "b"}
    model = client.get_logged_model(
        client.get_run(runs[3]).outputs.model_outputs[0].model_id
    )  # evaluate's metrics, on the logged model
    assert {m.key: m.value for m in model.metrics or []} == {"fvd/lfdm": 100.0, "l1/lfdm": 0.1}
    assert all(client.get_run(run_id).info.status == "FINISHED" for run_id in runs)
    assert mlflow.get_tracking_uri() == fluent_uri and "MLFLOW_TRACKING_URI" not in os.environ  # restored


def test_without_a_run_nothing_is_registered(pipe, store):
    assert tracking.configure(store, "registry")
    serving.register(pipe, {"fvd/lfdm": 1.0}, "a", "unregistered")  # tracking off (no stage run): no error
    assert not MlflowClient(store).search_registered_models("name = 'unregistered'")


def test_a_registration_failure_is_one_warning_unless_tracking_is_required(pipe, store, capsys):
    assert tracking.configure(store, "registry")
    run_id = evaluated(pipe, 1.0, "a", name="not/a/name")  # the registry refuses it
    assert "warning: registering the pipeline as 'not/a/name' in MLflow" in capsys.readouterr().err
    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"  # the stage went on
    assert tracking.configure(store, "registry", required=True)
    with pytest.raises(tracking.TrackingError, match="Names cannot contain '/'.*tracking.required is true"):
        evaluated(pipe, 1.0, "a", name="not/a/name")
