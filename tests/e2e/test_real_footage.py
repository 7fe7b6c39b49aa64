"""The paper's use case on a shrunk config: a ``folder`` dataset of real footage (``lfdm footage``: a face, a
body, street scenes) through the whole pipeline with default settings but sizes, label-free stage one
included, with a few unusable clips among the good ones."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lfdm.config import load_params
from lfdm.data import read_manifest
from lfdm.data.footage import write_footage
from lfdm.video import write_video

from .conftest import BIN, make_project, service_env

pytestmark = pytest.mark.slow


def add_bad_clips(root: Path) -> None:
    """A clip of one frame, a clip that never moves, a frame folder whose frames differ in size."""
    still = np.full((12, 32, 32, 3), 90, np.uint8)
    still[:, 8:24, 8:24] = 200
    write_video(root / "clips/one-frame.mp4", still[:1], fps=25)
    write_video(root / "clips/still.mp4", still, fps=25)
    (root / "clips/mixed").mkdir()
    for i, side in enumerate((32, 32, 40)):
        Image.fromarray(np.full((side, side, 3), 60 * i, np.uint8)).save(root / f"clips/mixed/{i}.png")
    with (root / "labels.csv").open("a", newline="") as f:
        writer = csv.writer(f)
        for video in ("clips/one-frame.mp4", "clips/still.mp4", "clips/mixed"):
            writer.writerow([video, "a man talking in a car", "odd", "train"])


def test_real_footage_runs_end_to_end_and_bad_clips_are_named(tmp_path):
    project = make_project(
        tmp_path / "project",
        {
            "data": {"dataset": "folder", "root": "footage", "max_frames": 12},
            "train_lfae": {
                "init": "pretrain_flow",
                "freeze_motion": True,
            },  # the default path, which the other tests skip
            "tracking": {"enabled": False},
        },
    )
    write_footage(project / "footage", size=32)
    add_bad_clips(project / "footage")
    result = subprocess.run(
        [str(BIN / "dvc"), "repro"],
        cwd=project,
        env=service_env(project),
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Traceback" not in output

    p = load_params(project / "params.yaml")
    skipped = {
        s["video_id"]: s["reason"]
        for s in json.loads((project / p.paths.metrics / "preprocess_skipped.json").read_text())["skipped"]
    }
    assert set(skipped) == {"clips-one-frame", "clips-mixed"}
    assert "1 frame(s)" in skipped["clips-one-frame"] and "differ in size" in skipped["clips-mixed"]
    assert "clips-still: the teacher sees no motion" in output
    train = read_manifest(project / p.paths.manifest, split="train")
    assert len(train) == 32 and {r.subject for r in train} == {
        "carphone",
        "bunny",
        "bikes-left",
        "bikes-right",
        "odd",
    }

    distilled = json.loads((project / p.paths.metrics / "pretrain_flow.json").read_text())
    assert distilled["teacher_static_clips"] == 1 and distilled["teacher_clips_computed"] == 32
    assert 0 < distilled["warp_l1_ratio/teacher"] < 1  # the teacher explains real motion
    assert abs(sum(v for k, v in distilled.items() if k.startswith("mask_share/")) - 1) < 1e-4
    evaluate = json.loads((project / p.paths.metrics / "evaluate.json").read_text())
    assert (
        evaluate["test_videos"] == 8 and evaluate["l1/oracle"] > 0 and 0 <= evaluate["accuracy/oracle"] <= 1
    )
