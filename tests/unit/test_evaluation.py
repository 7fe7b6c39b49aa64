from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lfdm.metrics.classifier import MotionClassifier, predict
from lfdm.metrics.evaluation import References, method_metrics, per_frame_l1

IDS = ["a-0", "a-1", "b-0"]


def references(classifier_size: int = 16) -> References:
    rng = np.random.default_rng(0)
    return References(
        video_ids=IDS,
        real={
            "i3d": rng.normal(size=(3, 400)),
            "i3d_frames": rng.normal(size=(9, 64)),
            "mobilenet": rng.normal(size=(9, 32)),
        },
        l1={"static": torch.rand(3, 3), "oracle": torch.rand(3, 3)},
        classifier=MotionClassifier(2).eval(),
        classes=["pan left", "zoom in"],
        classifier_size=classifier_size,
        metrics={"fvd/static": 12.5},
    )


def load(path: Path, **overrides) -> References:
    wanted = {
        "video_ids": IDS,
        "frames": 4,
        "classifier_size": 16,
        "device": torch.device("cpu"),
        **overrides,
    }
    return References.load(path, **wanted)


def test_references_round_trip(tmp_path: Path) -> None:
    saved, path = references(), tmp_path / "refs" / "references.pt"
    saved.save(path)
    loaded = load(path)
    assert loaded.video_ids == IDS and loaded.classes == saved.classes and loaded.metrics == saved.metrics
    for key, value in saved.real.items():
        np.testing.assert_array_equal(loaded.real[key], value)
    assert all(torch.equal(loaded.l1[m], saved.l1[m]) for m in saved.l1)
    videos = torch.rand(5, 4, 3, 16, 16)
    assert predict(loaded.classifier, loaded.classes, videos) == predict(
        saved.classifier, saved.classes, videos
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"video_ids": IDS[:2]}, "'test clips': ('3 clips', '2 clips')"),
        ({"frames": 6}, "'frames': (4, 6)"),
        ({"classifier_size": 32}, "'evaluate.classifier_size': (16, 32)"),
    ],
)
def test_references_made_for_other_inputs_are_refused(tmp_path: Path, overrides: dict, named: str) -> None:
    path = tmp_path / "references.pt"
    references().save(path)
    with pytest.raises(ValueError, match="dvc repro evaluate_references") as err:
        load(path, **overrides)
    assert str(path) in str(err.value) and named in str(err.value)


def test_references_without_a_feature_set_are_refused(tmp_path: Path) -> None:
    """References written before a metric existed (here: no frame features for fid_i3d) are made again."""
    path, older = tmp_path / "references.pt", references()
    del older.real["i3d_frames"]
    older.save(path)
    with pytest.raises(
        ValueError, match=r"'features': \(\['i3d', 'mobilenet'\], \['i3d', 'i3d_frames', 'mob"
    ):
        load(path)


def test_missing_references_name_the_file_and_the_stage(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"nothing\.pt: no evaluation references; run `dvc repro evaluate_"
    ):
        load(tmp_path / "nothing.pt")


def test_method_metrics() -> None:
    rng = np.random.default_rng(1)
    real = {
        "i3d": rng.normal(size=(6, 8)),
        "i3d_frames": rng.normal(size=(12, 4)),
        "mobilenet": rng.normal(size=(12, 4)),
    }
    labels, subjects = ["x", "x", "x", "y", "y", "z"], ["s"] * 6
    same = method_metrics("copy", real, real, torch.zeros(6, 2), labels, subjects)
    for key in ("fvd", "fid_i3d", "fid_mobilenetv2"):
        assert same[f"{key}/copy"] == pytest.approx(0, abs=1e-6)
    assert same["cfvd/copy"] == pytest.approx(0, abs=1e-6) and same["l1/copy"] == 0

    shifted = {key: value + 1 for key, value in real.items()}
    moved = method_metrics("shift", real, shifted, torch.full((6, 2), 0.25), labels, subjects)
    assert moved["fvd/shift"] == pytest.approx(8, rel=1e-4)  # a mean shift of 1 in 8 dimensions: |Δμ|² = 8
    assert (
        moved["sfvd/shift"] == pytest.approx(moved["fvd/shift"]) and moved["sfvd_std/shift"] == 0
    )  # one subject
    assert moved["cfvd_std/shift"] >= 0 and moved["l1/shift"] == 0.25
    assert moved["fid_i3d/shift"] == pytest.approx(4, rel=1e-4) == moved["fid_mobilenetv2/shift"]
    # "z" has one video: no covariance, so the grouped FVDs use the groups of two or more only
    assert method_metrics("one", real, shifted, torch.zeros(6, 2), list("abcdef"), subjects).keys() == {
        "fvd/one",
        "sfvd/one",
        "sfvd_std/one",
        "fid_i3d/one",
        "fid_mobilenetv2/one",
        "l1/one",
    }


def test_per_frame_l1_skips_the_given_frame() -> None:
    real = torch.zeros(2, 3, 3, 4, 4, dtype=torch.uint8)
    videos = real.clone()
    videos[:, 0] = 255  # frame 0 is x0 itself, never scored
    videos[1, 2] = 51
    assert torch.allclose(per_frame_l1(videos, real), torch.tensor([[0.0, 0.0], [0.0, 0.2]]))
