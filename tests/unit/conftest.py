"""Fixtures of the unit tests that talk to a real (SQLite) MLflow store."""

import pytest


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def clean_env(monkeypatch):
    """No tracking URI, DVC root or parent run inherited from the shell or an earlier test."""
    from lfdm import tracking  # here: every unit test session loads this file, few need mlflow

    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", tracking.PARENT_ENV):
        monkeypatch.delenv(name, raising=False)
