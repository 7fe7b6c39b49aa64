"""The data layer: embedded dataset, frame sampling, frame/flow stores, manifest, datasets."""

from __future__ import annotations

import itertools
import math
import pickle
from collections import Counter
from dataclasses import asdict, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from lfdm.config import DataConfig, EmbeddedDataConfig
from lfdm.data import (
    MOTIONS,
    FlowSequenceDataset,
    FlowStore,
    FlowStoreAttrs,
    FramePairDataset,
    FrameStore,
    ManifestRow,
    flow_store,
    generate_clips,
    jitter_colours,
    read_manifest,
    sample_frame_indices,
    to_tensor,
    write_manifest,
)
from lfdm.data import frames as frames_module
from lfdm.data.embedded import _render, _window, true_flow
from lfdm.data.manifest import SCHEMA
from lfdm.models.warp import warp

# ------------------------------------------------------------------------------------ embedded data


@pytest.fixture(scope="module")
def default_clips():
    return list(generate_clips(DataConfig(), seed=0))


def _small(**embedded) -> DataConfig:
    base = {"clips_per_image": 2, "test_images": 2, "max_train_images": 4, "source_frames": 6}
    return DataConfig(image_size=32, num_frames=4, embedded=EmbeddedDataConfig(**{**base, **embedded}))


def test_embedded_is_deterministic_per_seed():
    a, b, c = (list(generate_clips(_small(), seed)) for seed in (3, 3, 4))
    assert [x.video_id for x in a] == [x.video_id for x in b]
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b, strict=True))
    assert not all(
        x.video_id == y.video_id and np.array_equal(x.frames, y.frames) for x, y in zip(a, c, strict=True)
    )


def test_embedded_default_dataset_layout(default_clips):
    cfg = DataConfig()
    subjects = {s: {c.subject for c in default_clips if c.split == s} for s in ("train", "test")}
    assert len(subjects["test"]) == cfg.embedded.test_images
    assert len(subjects["train"]) + len(subjects["test"]) >= 40
    assert len(default_clips) == len(set().union(*subjects.values())) * cfg.embedded.clips_per_image
    assert len({c.video_id for c in default_clips}) == len(default_clips)
    assert all(c.frames.shape == (cfg.embedded.source_frames, 64, 64, 3) for c in default_clips)
    assert all(c.frames.dtype == np.uint8 for c in default_clips)
    # 8 classes, balanced within each split
    for split in ("train", "test"):
        counts = Counter(c.label for c in default_clips if c.split == split)
        assert set(counts) == set(MOTIONS) and len(MOTIONS) == 8
        assert max(counts.values()) - min(counts.values()) <= 1


def test_embedded_split_is_by_source_photo(default_clips):
    photos = {s: {c.source.split("#")[0] for c in default_clips if c.split == s} for s in ("train", "test")}
    subjects = {s: {c.subject for c in default_clips if c.split == s} for s in ("train", "test")}
    assert photos["train"].isdisjoint(photos["test"])
    assert subjects["train"].isdisjoint(subjects["test"])


def test_embedded_held_out_photo_surplus_is_dropped_and_train_capped():
    clips = list(generate_clips(_small(test_images=5, max_train_images=3, clips_per_image=1), seed=0))
    test = {c.subject for c in clips if c.split == "test"}
    train = {c.subject for c in clips if c.split == "train"}
    assert len(test) == 5 and len(train) == 3
    test_photos = {c.source.split("#")[0] for c in clips if c.split == "test"}
    assert len(test_photos) == 2  # 4 subjects per photo: two whole photos held out
    assert not any(c.source.split("#")[0] in test_photos for c in clips if c.split == "train")
    assert len({c.source.split("#")[0] for c in clips if c.split == "train"}) == 3  # the cap spreads photos


def test_embedded_has_no_black_borders(default_clips):
    frames = np.stack([c.frames for c in default_clips])
    black = frames.max(-1) == 0
    assert black.mean() < 1e-4
    ring = np.concatenate([black[..., 0, :], black[..., -1, :], black[..., :, 0], black[..., :, -1]], -1)
    assert ring.mean() < 1e-3


def _gray(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float64).mean(-1)


def _phase_shift(f0: np.ndarray, f1: np.ndarray) -> tuple[float, float]:
    """Content displacement (dx, dy) in pixels from ``f0`` to ``f1`` by phase correlation."""
    win = np.outer(np.hanning(f0.shape[0]), np.hanning(f0.shape[1]))
    a, b = (np.fft.fft2((f - f.mean()) * win) for f in (f0, f1))
    cross = b * np.conj(a)
    corr = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    dy, dx = np.unravel_index(np.argmax(corr), corr.shape)
    size = f0.shape[0]
    return (dx + size // 2) % size - size // 2, (dy + size // 2) % size - size // 2


def _best_similarity(
    f0: np.ndarray, f1: np.ndarray, candidates: list[tuple[float, float]]
) -> tuple[float, float]:
    """The (magnification, clockwise degrees) of the picture about the centre that best maps f0 onto f1:
    f1(p) ≈ f0(R(-θ)·p / m) with y pointing down, compared on the central disc."""
    size = f0.shape[0]
    centres = (np.arange(size) + 0.5) / size * 2 - 1  # grid_sample's align_corners=False
    v, u = np.meshgrid(centres, centres, indexing="ij")
    disc = u**2 + v**2 < 0.4
    errors = []
    for m, deg in candidates:
        c, s = math.cos(math.radians(deg)) / m, math.sin(math.radians(deg)) / m
        x, y = c * u + s * v, -s * u + c * v
        inside = disc & (np.abs(x) < 1) & (np.abs(y) < 1)
        pred = ndimage.map_coordinates(f0, [(y + 1) * size / 2 - 0.5, (x + 1) * size / 2 - 0.5], order=1)
        errors.append(((pred - f1) ** 2)[inside].mean())
    return candidates[int(np.argmin(errors))]


PAN_DIRECTION = {"pan left": (1, 0), "pan right": (-1, 0), "pan up": (0, 1), "pan down": (0, -1)}


def test_embedded_motion_matches_label(default_clips):
    """Every clip of the default dataset: the estimated global motion has its label's direction."""
    zooms = [(m, 0.0) for m in np.exp(np.linspace(-0.8, 0.8, 17))]
    turns = [(1.0, d) for d in range(-45, 46, 5)]
    for clip in default_clips:
        f0, f1 = _gray(clip.frames[0]), _gray(clip.frames[-1])
        if clip.label in PAN_DIRECTION:
            dx, dy = _phase_shift(f0, f1)
            ex, ey = PAN_DIRECTION[clip.label]
            along, across = dx * ex + dy * ey, abs(dx * ey) + abs(dy * ex)
            assert along >= 6 and across <= 2, (clip.video_id, dx, dy)  # pans move ≥ 9 px at 64 px
        elif clip.label.startswith("zoom"):
            m, _ = _best_similarity(f0, f1, zooms)
            assert math.log(m) * (1 if clip.label == "zoom in" else -1) > 0.15, (clip.video_id, m)
        else:
            _, deg = _best_similarity(f0, f1, turns)
            assert deg * (1 if clip.label == "rotate clockwise" else -1) >= 10, (clip.video_id, deg)


@pytest.mark.parametrize(
    ("label", "right_end_lower"), [("rotate clockwise", True), ("rotate counterclockwise", False)]
)
def test_embedded_rotation_label_is_the_on_screen_direction(label, right_end_lower):
    """A horizontal bar through the window centre: turning clockwise on screen lowers its right end."""
    photo = torch.full((1, 3, 300, 300), 0.5)
    cx, cy, _ = _window(photo, 0)
    photo[..., round(cy) - 5 : round(cy) + 5, round(cx) - 40 : round(cx) + 40] = 1.0
    last = _render(photo, 0, MOTIONS[label], 8, 64, np.random.default_rng(0))[0][-1, ..., 0]
    ys, xs = np.nonzero(last > 200)
    left, right = ys[xs < xs.mean()].mean(), ys[xs > xs.mean()].mean()  # y points down
    assert (right > left + 5) if right_end_lower else (left > right + 5)


@pytest.mark.parametrize("label", list(MOTIONS))
def test_embedded_true_flow_warps_one_frame_into_another(default_clips, label):
    """The camera each clip carries gives the exact flow: warping an earlier frame by it renders a later
    one (inside the region both frames see), far closer than the unwarped frame is."""
    clip = next(c for c in default_clips if c.label == label)
    frames = to_tensor(clip.frames)
    for source, driving in ((0, 5), (4, 2), (3, 9)):
        grid = torch.from_numpy(true_flow(clip.camera, source, driving, frames.shape[-1], frames.shape[-1]))[
            None
        ]
        inside = (grid.abs() < 0.9).all(-1)[
            0
        ]  # driving pixels whose source lies well inside the source frame
        warped_error = (
            (warp(frames[source : source + 1], grid) - frames[driving])[0].abs().mean(0)[inside].mean()
        )
        still_error = (frames[source] - frames[driving]).abs().mean(0)[inside].mean()
        assert warped_error < 0.4 * still_error and warped_error < 0.02, (clip.video_id, source, driving)


def test_embedded_motion_is_smooth(default_clips):
    """A pan moves the picture a little at every frame (sub-pixel rendering, no jumps), a lot over the clip."""
    for clip in [c for c in default_clips if c.label == "pan right"][:4]:
        gray = [_gray(f) for f in clip.frames]
        steps = [abs(_phase_shift(a, b)[0]) for a, b in itertools.pairwise(gray)]
        assert max(steps) <= 3 and abs(_phase_shift(gray[0], gray[-1])[0]) >= 6, (clip.video_id, steps)


# ----------------------------------------------------------------------------------- frame sampling


@pytest.mark.parametrize("mode", ["uniform", "random_sorted", "very_random"])
@pytest.mark.parametrize("n", [1, 5, 10, 24, 97])
def test_sample_frame_indices_properties(mode, n):
    for seed in range(20):
        idx = sample_frame_indices(n, 10, mode, np.random.default_rng(seed))
        assert idx.shape == (10,) and idx.dtype.kind == "i"
        assert idx[0] == 0 and (np.diff(idx) >= 0).all() and idx.max() < n
        if mode != "very_random":
            assert idx[-1] == n - 1
            if n >= 10:
                assert (np.diff(idx) > 0).all()
            else:  # short clip: every frame once, then the last one repeated
                np.testing.assert_array_equal(idx, np.minimum(np.arange(10), n - 1))


def test_sample_frame_indices_modes():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(sample_frame_indices(9, 5, "uniform", rng), [0, 2, 4, 6, 8])
    draws = {tuple(sample_frame_indices(40, 5, "random_sorted", np.random.default_rng(s))) for s in range(50)}
    assert len(draws) > 10  # interior indices really move
    lo, hi = np.min(list(draws), 0), np.max(list(draws), 0)
    assert (hi[1:-1] - lo[1:-1] >= 5).all() and hi[1] < lo[2]  # each stays within its own gap
    a, b = (sample_frame_indices(40, 10, "very_random", np.random.default_rng(7)) for _ in range(2))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("n", "k"), [(10, 1), (10, 0), (0, 4)])
def test_sample_frame_indices_rejects_bad_sizes(n, k):
    with pytest.raises(ValueError, match=f"k={k}, num_available={n}"):
        sample_frame_indices(n, k, "uniform", np.random.default_rng(0))


# ------------------------------------------------------------------------------------------- stores


def _frames(t: int, size: int = 8) -> np.ndarray:
    """Frame i: value 16·i + column, so the time and the column order are readable back."""
    col = np.arange(size, dtype=np.uint8)[None, None, :, None]
    return np.broadcast_to(
        16 * np.arange(t, dtype=np.uint8)[:, None, None, None] + col, (t, size, size, 3)
    ).copy()


def test_frame_store_round_trip_and_pickle(tmp_path):
    store = FrameStore(tmp_path / "frames.zarr", "w")
    store.write("b", _frames(6))
    store.write("a", _frames(3))
    copy = pickle.loads(pickle.dumps(store))  # a worker's copy re-opens, without wiping the store
    for s in (store, copy, FrameStore(tmp_path / "frames.zarr")):
        assert s.video_ids == ["a", "b"] and "a" in s and "c" not in s
        np.testing.assert_array_equal(s.read("b"), _frames(6))
        np.testing.assert_array_equal(s.read("b", [4, 0, 4]), _frames(6)[[4, 0, 4]])
    with pytest.raises(KeyError, match="'c' is not in frame store"):
        store.read("c")
    store.write("b", _frames(2))  # rewritten after a read: the open handle must not serve the old array
    np.testing.assert_array_equal(store.read("b"), _frames(2))
    with pytest.raises(ValueError, match="uint8"):
        store.write("x", _frames(2).astype(np.float32))
    with pytest.raises(ValueError, match="'__x'"):
        store.write("__x", _frames(2))
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        FrameStore(tmp_path / "missing.zarr").read("a")


ATTRS = FlowStoreAttrs(
    num_frames=4, latent_size=8, latent_channels=5, lfae_checkpoint="lfae.pt", lfae_sha256="ab12"
)


def _flow(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 4, 8, 8, generator=g) * 2 - 1, torch.randn(5, 8, 8, generator=g) * 3


def test_flow_store_round_trip_and_pickle(tmp_path):
    store = FlowStore(tmp_path / "flows.zarr", "w", ATTRS)
    flow, z0 = _flow(0)
    store.write("v1", flow, z0)
    store.write("v2", *(x.numpy() for x in _flow(1)))
    copy = pickle.loads(pickle.dumps(store))
    for s in (store, copy, FlowStore(tmp_path / "flows.zarr")):
        assert s.attrs == ATTRS and s.video_ids == ["v1", "v2"] and "v1" in s
        got_flow, got_z0 = s.read("v1")
        assert got_flow.dtype == np.float32 and got_flow.shape == (3, 4, 8, 8) and got_z0.shape == (5, 8, 8)
        np.testing.assert_allclose(got_flow, flow.numpy(), atol=1e-3)
        np.testing.assert_allclose(got_z0, z0.numpy(), rtol=1e-3, atol=1e-3)
    with pytest.raises(KeyError, match="'v3' is not in flow store"):
        store.read("v3")
    store.write("v1", *_flow(2))  # rewritten after a read
    np.testing.assert_allclose(store.read("v1")[0], _flow(2)[0].numpy(), atol=1e-3)
    with pytest.raises(ValueError, match=r"flows must have shape \(3, 4, 8, 8\)"):
        store.write("bad", flow[:, :3], z0)
    with pytest.raises(ValueError, match="not finite"):
        store.write("big", flow, z0 * 1e6)
    assert "big" not in store  # nothing written when either array is invalid
    with pytest.raises(ValueError, match="attrs"):
        FlowStore(tmp_path / "other.zarr", "w")


def test_flow_store_redraws(tmp_path):
    """A store of D = 3 draws: training clips keep two more, read by index; others have only draw 0."""
    store = FlowStore(tmp_path / "flows.zarr", "w", replace(ATTRS, draws=3))
    store.write("train", *_flow(0))
    store.write("test", *_flow(1))
    flows, z0 = (torch.stack(x) for x in zip(_flow(2), _flow(3), strict=True))
    store.write_redraws("train", flows, z0)
    reopened = FlowStore(tmp_path / "flows.zarr")
    assert reopened.attrs.draws == 3 and reopened.draws_of("train") == 3 and reopened.draws_of("test") == 1
    assert reopened.video_ids == ["test", "train"]  # redraws are no clips of their own
    for draw, seed in ((0, 0), (1, 2), (2, 3)):
        np.testing.assert_allclose(reopened.read("train", draw=draw)[0], _flow(seed)[0].numpy(), atol=1e-3)
    with pytest.raises(IndexError, match="'test' has 1 draw"):
        reopened.read("test", draw=1)
    with pytest.raises(ValueError, match=r"redrawn_flows must have shape \(2, 3, 4, 8, 8\)"):
        store.write_redraws("train", flows[:1], z0[:1])
    with pytest.raises(ValueError, match="one draw per clip"):
        FlowStore(tmp_path / "one.zarr", "w", ATTRS).write_redraws("train", flows, z0)


def test_flow_store_written_before_draws_reads_as_one_draw(tmp_path):
    store = FlowStore(tmp_path / "flows.zarr", "w", ATTRS)
    store.write("v", *_flow(0))
    del store.group.attrs["draws"]  # a store from before the attribute existed
    assert FlowStore(tmp_path / "flows.zarr").attrs == ATTRS and store.draws_of("v") == 1
    del store.group.attrs["num_frames"]
    with pytest.raises(ValueError, match="not a flow store: attribute 'num_frames' is missing"):
        _ = FlowStore(tmp_path / "flows.zarr").attrs


def test_jitter_colours_changes_a_clip_as_one():
    frames = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # two colour frames
    clip = torch.cat([frames[:1], frames[:1], frames[1:]])
    jittered = [jitter_colours(clip, np.random.default_rng(seed)) for seed in range(6)]
    assert torch.equal(jittered[0], jitter_colours(clip, np.random.default_rng(0)))  # the rng decides
    for out in jittered:
        assert out.shape == clip.shape and 0 <= out.min() <= out.max() <= 1
        assert torch.equal(out[0], out[1])  # equal frames stay equal: one change for the whole clip
    assert min((out - clip).abs().mean() for out in jittered) > 1e-3
    assert len({round(float(out.mean()), 4) for out in jittered}) == 6


# ----------------------------------------------------------------------------------------- manifest


def _rows() -> list[ManifestRow]:
    return [
        ManifestRow(
            f"v{i}", "zoom in", f"s{i % 3}", "test" if i % 3 == 0 else "train", 6, "x", np.array([0, 2, 5])
        )
        for i in range(6)
    ]


def test_manifest_round_trip_and_split_filter(tmp_path):
    path = tmp_path / "m" / "manifest.parquet"
    write_manifest(path, _rows())
    assert [f.name for f in fields(ManifestRow)] == SCHEMA.names
    assert pq.read_schema(path).field("frame_indices").type == SCHEMA.field("frame_indices").type
    assert read_manifest(path) == _rows() and _rows()[0].frame_indices == (0, 2, 5)
    assert read_manifest(path, split="test") == [r for r in _rows() if r.split == "test"]
    assert [r.video_id for r in read_manifest(path, "train")] == ["v1", "v2", "v4", "v5"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda rows: rows + [rows[0]], "column 'video_id': duplicate value 'v0'"),
        (lambda rows: [replace(rows[0], split="val")] + rows[1:], "column 'split': unknown value 'val'"),
        (
            lambda rows: [replace(rows[0], frame_indices=(0, 7))] + rows[1:],
            "video 'v0': column 'frame_indices'",
        ),
    ],
)
def test_manifest_validation_names_the_value(tmp_path, change, message):
    path = tmp_path / "manifest.parquet"
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        write_manifest(path, change(_rows()))
    # the same errors from a file written by someone else
    pq.write_table(pa.Table.from_pylist([asdict(r) for r in change(_rows())], schema=SCHEMA), path)
    with pytest.raises(ValueError, match=message):
        read_manifest(path, split="train")


def test_manifest_missing_column(tmp_path):
    path = tmp_path / "manifest.parquet"
    write_manifest(path, _rows())
    pq.write_table(pq.read_table(path).drop_columns(["label"]), path)
    with pytest.raises(ValueError, match=f"{path}: missing column\\(s\\) 'label'"):
        read_manifest(path)


# ----------------------------------------------------------------------------------------- datasets


def test_frame_pair_dataset(tmp_path, monkeypatch):
    store = FrameStore(tmp_path / "frames.zarr", "w")
    store.write("v", _frames(6))
    rows = [ManifestRow("v", "pan up", "s", "train", 6, "x", (0, 5))]
    ds = FramePairDataset(store, rows, repeats=40, seed=1, flip=True)
    assert len(ds) == 40
    flips = 0
    for item in ds:
        src, drv = item["source"], item["driving"]
        assert (
            src.shape == drv.shape == (3, 8, 8)
            and src.dtype == torch.float32
            and 0 <= src.min() <= src.max() <= 1
        )
        t_src, t_drv = (round(float(x.min()) * 255) // 16 for x in (src, drv))
        assert t_src <= t_drv  # sorted in time, possibly equal
        flipped = [bool(x[0, 0, 0] > x[0, 0, -1]) for x in (src, drv)]
        assert flipped[0] == flipped[1]  # one flip for both frames
        flips += flipped[0]
    assert 5 < flips < 35
    again = FramePairDataset(store, rows, repeats=40, seed=1, flip=True)
    assert all(torch.equal(again[i]["driving"], ds[i]["driving"]) for i in range(40))
    again.set_epoch(1)
    assert not all(torch.equal(again[i]["driving"], ds[i]["driving"]) for i in range(40))
    monkeypatch.setattr(frames_module, "PRELOAD_MAX_BYTES", 0)  # the same pairs read from the store
    streamed = FramePairDataset(store, rows, repeats=40, seed=1, flip=True)
    assert ds.preloaded is not None and streamed.preloaded is None
    assert all(torch.equal(streamed[i][k], ds[i][k]) for i in range(40) for k in ("source", "driving"))


@pytest.mark.parametrize("preload", [True, False])
def test_datasets_in_worker_processes(tmp_path, monkeypatch, preload):
    if not preload:  # a set too large to hold: streamed from the store
        monkeypatch.setattr(flow_store, "PRELOAD_MAX_BYTES", 0)
        monkeypatch.setattr(frames_module, "PRELOAD_MAX_BYTES", 0)
    frames = FrameStore(tmp_path / "frames.zarr", "w")
    flows = FlowStore(tmp_path / "flows.zarr", "w", ATTRS)
    rows = []
    for i in range(4):
        frames.write(f"v{i}", _frames(5))
        flows.write(f"v{i}", *_flow(i))
        rows.append(ManifestRow(f"v{i}", ["zoom in", "pan up"][i % 2], "s", "train", 5, "x", (0, 1, 2, 4)))
    embeddings = {"zoom in": torch.ones(6), "pan up": torch.zeros(6)}
    flow_ds = FlowSequenceDataset(tmp_path / "flows.zarr", rows, embeddings)
    assert (flow_ds.preloaded is not None) == preload
    item = flow_ds[1]
    np.testing.assert_array_equal(item["x0"].numpy(), flows.read("v1")[0])
    assert item["x0"].shape == (3, 4, 8, 8) and item["x0"].dtype == torch.float32
    assert (
        item["z0"].shape == (5, 8, 8)
        and torch.equal(item["text"], torch.zeros(6))
        and item["video_id"] == "v1"
    )

    pair_ds = FramePairDataset(frames, rows, repeats=2)
    assert (pair_ds.preloaded is not None) == preload
    pair_batches = list(DataLoader(pair_ds, batch_size=4, num_workers=2))
    assert [b["source"].shape for b in pair_batches] == [(4, 3, 8, 8)] * 2
    flow_batches = list(DataLoader(flow_ds, batch_size=2, num_workers=2))
    assert [b["x0"].shape for b in flow_batches] == [(2, 3, 4, 8, 8)] * 2
    assert [b["text"].shape for b in flow_batches] == [(2, 6)] * 2
    assert [v for b in flow_batches for v in b["video_id"]] == ["v0", "v1", "v2", "v3"]
    with pytest.raises(ValueError, match="'smile'"):
        FlowSequenceDataset(tmp_path / "flows.zarr", [replace(rows[0], label="smile")], embeddings)


@pytest.mark.parametrize("preload", [True, False])
def test_flow_dataset_samples_every_draw(tmp_path, monkeypatch, preload):
    if not preload:
        monkeypatch.setattr(flow_store, "PRELOAD_MAX_BYTES", 0)
    store = FlowStore(tmp_path / "flows.zarr", "w", replace(ATTRS, draws=3))
    store.write("v", *_flow(0))
    store.write_redraws("v", *(torch.stack(x) for x in zip(_flow(1), _flow(2), strict=True)))
    row = ManifestRow("v", "zoom in", "s", "train", 5, "x", (0, 1, 2, 4))
    dataset = FlowSequenceDataset(tmp_path / "flows.zarr", [row], {"zoom in": torch.ones(6)})
    torch.manual_seed(0)
    seen = {float(dataset[0]["x0"].sum()) for _ in range(60)}
    assert seen == {float(dataset.item(0, draw)["x0"].sum()) for draw in range(3)}
    np.testing.assert_array_equal(dataset.item(0)["x0"].numpy(), store.read("v")[0])


def test_a_flow_dataset_of_one_draw_leaves_the_random_state_alone(tmp_path):
    """One draw per clip (the default) draws nothing: training stays bit for bit what it was."""
    FlowStore(tmp_path / "flows.zarr", "w", ATTRS).write("v", *_flow(0))
    row = ManifestRow("v", "zoom in", "s", "train", 5, "x", (0, 1, 2, 4))
    dataset = FlowSequenceDataset(tmp_path / "flows.zarr", [row], {"zoom in": torch.ones(6)})
    state = torch.get_rng_state()
    dataset[0]
    assert torch.equal(torch.get_rng_state(), state)
