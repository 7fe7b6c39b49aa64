"""The condition-accuracy classifier, trained once on the embedded dataset's real train clips."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from lfdm.config import DataConfig, EmbeddedDataConfig
from lfdm.data.embedded import MOTIONS, generate_clips
from lfdm.metrics.classifier import (
    MotionClassifier,
    UnscoredLabelWarning,
    accuracy,
    as_videos,
    predict,
    train_classifier,
)

K, SIZE = 6, 32
OPPOSITE = {
    "pan left": "pan right",
    "pan up": "pan down",
    "zoom in": "zoom out",
    "rotate clockwise": "rotate counterclockwise",
}
OPPOSITE |= {b: a for a, b in OPPOSITE.items()}


@pytest.fixture(scope="module")
def clips() -> dict[str, tuple[np.ndarray, list[str]]]:
    """split → (videos ``(N, K, H, W, 3)`` uint8, labels): 320 train clips, 64 test clips of unseen photos."""
    cfg = DataConfig(image_size=SIZE, num_frames=K, embedded=EmbeddedDataConfig())
    frames = np.linspace(0, cfg.embedded.source_frames - 1, K).round().astype(int)
    out: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for clip in generate_clips(cfg, seed=0):
        out[clip.split][0].append(clip.frames[frames])
        out[clip.split][1].append(clip.label)
    return {split: (np.stack(videos), labels) for split, (videos, labels) in out.items()}


@pytest.fixture(scope="module")
def trained(clips) -> tuple[MotionClassifier, list[str]]:
    videos, labels = clips["train"]
    return train_classifier(videos, labels, steps=200, batch_size=32, lr=1e-3, seed=0, device="cpu")


@pytest.mark.parametrize(("frames", "size"), [(10, 64), (2, 32), (6, 24)])
def test_model_shapes(frames: int, size: int) -> None:
    model = MotionClassifier(num_classes=8)
    assert model(torch.rand(3, frames, 3, size, size)).shape == (3, 8)
    assert sum(p.numel() for p in model.parameters()) < 100_000  # seconds on a CPU, not minutes


def test_classifies_real_motion(clips, trained) -> None:
    model, classes = trained
    assert classes == sorted(MOTIONS)
    assert not model.training
    # measured: train 1.00, test 0.94 (0.88–0.94 over classifier seeds 0–3); chance is 1/8
    assert accuracy(model, classes, *clips["train"]) >= 0.95
    assert accuracy(model, classes, *clips["test"]) >= 0.7


def test_static_videos_score_near_chance(clips, trained) -> None:
    videos, labels = clips["test"]
    static = np.repeat(videos[:, :1], K, axis=1)  # the conditioning frame, never moving
    # measured: 0.09 (0.08–0.13 over seeds 0–3): the label is read from the motion, not the picture
    assert accuracy(*trained, static, labels) <= 0.3


def test_time_reversal_gives_the_opposite_motion(clips, trained) -> None:
    videos, labels = clips["test"]
    predicted = predict(*trained, videos[:, ::-1])
    # measured: 0.91 of the 64 reversed test clips (0.86–0.91 over seeds 0–3); 6 of the 8 reversed
    # "zoom in" → "zoom out" (5–6 over seeds), the rest mostly "pan down"
    assert np.mean([p == OPPOSITE[label] for p, label in zip(predicted, labels, strict=True)]) >= 0.7
    zoom_in = Counter(p for p, label in zip(predicted, labels, strict=True) if label == "zoom in")
    assert zoom_in.most_common(1)[0][0] == "zoom out"


def test_layouts_and_ranges_agree(clips, trained) -> None:
    videos = clips["test"][0][:16]
    channels_first = torch.from_numpy(videos).permute(0, 1, 4, 2, 3).float() / 255
    assert predict(*trained, videos) == predict(*trained, channels_first, batch_size=5)
    assert as_videos(videos).shape == (16, K, 3, SIZE, SIZE)


def test_training_is_seeded_and_leaves_the_global_rng_alone(clips) -> None:
    videos, labels = clips["train"][0][:24], clips["train"][1][:24]
    state = torch.random.get_rng_state()
    runs = [train_classifier(videos, labels, steps=3, batch_size=8, seed=s, device="cpu") for s in (1, 1, 2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = [run[0].head.weight for run in runs]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


@pytest.mark.parametrize(
    ("videos", "message"),
    [
        (np.zeros((2, K, SIZE, SIZE), np.uint8), r"or \(N, K, 3, H, W\), got \(2, 6, 32, 32\)"),
        (np.zeros((2, K, SIZE, SIZE, 4), np.uint8), r"got \(2, 6, 32, 32, 4\)"),
        (np.zeros((2, 1, SIZE, SIZE, 3), np.uint8), r"K ≥ 2 frames.*got \(2, 1, 3, 32, 32\)"),
        (np.zeros((2, K, 3, 28, 28), np.uint8), r"divisible by 8.*got \(2, 6, 3, 28, 28\)"),
        (np.zeros((0, K, 3, SIZE, SIZE), np.uint8), r"N ≥ 1 videos"),
        (np.full((2, K, 3, SIZE, SIZE), -1.0, np.float32), r"\[0, 1\], got values in \[-1, -1\]"),
        (np.full((2, K, 3, SIZE, SIZE), 255.0, np.float32), r"\[0, 1\], got values in \[255, 255\]"),
        (np.zeros((2, K, 3, SIZE, SIZE), np.int64), r"uint8 or floating point, got torch.int64"),
    ],
)
def test_bad_videos(trained, videos: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        predict(*trained, videos)


def test_a_label_without_training_clips_is_left_out_and_named(clips, trained) -> None:
    videos, labels = clips["test"]
    known = accuracy(*trained, videos, labels)
    unknown = ["dolly zoom"] * 2
    with pytest.warns(UnscoredLabelWarning, match=r"leaves out 2 of .* videos: .*\['dolly zoom'\]"):
        assert accuracy(*trained, np.concatenate([videos, videos[:2]]), [*labels, *unknown]) == known
    with pytest.warns(UnscoredLabelWarning):
        assert np.isnan(accuracy(*trained, videos[:2], unknown))


def test_bad_labels(clips, trained) -> None:
    videos, labels = clips["test"][0][:2], ["zoom in", "dolly zoom"]
    with pytest.raises(ValueError, match="2 videos, 1 labels"):
        accuracy(*trained, videos, labels[:1])
    with pytest.raises(ValueError, match="2 videos, 3 labels"):
        train_classifier(videos, ["zoom in"] * 3, steps=1)
