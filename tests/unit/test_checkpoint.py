import pytest
import torch
from test_overfit import TINY_LFAE

from lfdm.checkpoint import load_checkpoint, save_checkpoint
from lfdm.config import DataConfig, DMConfig, UNetConfig
from lfdm.data import ManifestRow
from lfdm.diffusion import FlowDiffusion, load_dm, save_dm
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.models.lfae_checkpoints import (
    WarmStartWarning,
    init_lfae,
    load_lfae,
    save_flow_predictor,
    save_lfae,
    trained_on,
)
from lfdm.models.unet3d import Unet3D


def test_lfae_round_trip_rebuilds_the_model_from_its_config(tmp_path):
    model = LatentFlowAutoEncoder(TINY_LFAE).eval()
    save_lfae(tmp_path / "lfae.pt", model, TINY_LFAE, image_size=32, step=7)
    loaded, meta = load_lfae(tmp_path / "lfae.pt", torch.device("cpu"))
    assert (meta["step"], meta["image_size"], meta["config"]) == (7, 32, TINY_LFAE.model_dump(mode="json"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, x.flip(0))["prediction"], loaded(x, x.flip(0))["prediction"])


DATA = DataConfig(dataset="folder", root="clips")
TRAIN = [ManifestRow(f"train-{i}", "wave", "anna", "train", 8, "folder", (0, 7)) for i in range(3)]


def test_lfae_warm_start_loads_matching_weights_and_names_what_differs(tmp_path):
    trained = LatentFlowAutoEncoder(TINY_LFAE)
    save_lfae(
        tmp_path / "lfae.pt", trained, TINY_LFAE, image_size=32, step=2000, data=trained_on(DATA, 0, TRAIN)
    )
    fresh = LatentFlowAutoEncoder(TINY_LFAE)
    assert init_lfae(fresh, tmp_path / "lfae.pt", 32, DATA, ["test-0"]) == 2000
    for a, b in zip(trained.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    wider = LatentFlowAutoEncoder(TINY_LFAE.model_copy(update={"base_channels": 16}))
    with pytest.raises(
        ValueError, match=r"lfae.pt was built with other settings: base_channels \(checkpoint 8"
    ):
        init_lfae(wider, tmp_path / "lfae.pt", 32, DATA, [])
    with pytest.raises(ValueError, match=r"data.image_size \(checkpoint 32, params 64\)"):
        init_lfae(fresh, tmp_path / "lfae.pt", 64, DATA, [])


def test_a_flow_predictor_checkpoint_warm_starts_f_alone(tmp_path):
    trained = LatentFlowAutoEncoder(TINY_LFAE)
    save_flow_predictor(tmp_path / "f.pt", trained, image_size=32, step=50, data=trained_on(DATA, 0, TRAIN))
    fresh = LatentFlowAutoEncoder(TINY_LFAE)
    encoder = {k: v.clone() for k, v in fresh.encoder.state_dict().items()}
    assert init_lfae(fresh, tmp_path / "f.pt", 32, DATA, []) == 50
    for a, b in zip(
        trained.flow_predictor.state_dict().values(), fresh.flow_predictor.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert all(torch.equal(v, fresh.encoder.state_dict()[k]) for k, v in encoder.items())  # Φ untouched


def test_a_warm_start_that_saw_a_test_clip_is_refused_and_other_footage_is_named(tmp_path):
    save_flow_predictor(
        tmp_path / "f.pt",
        LatentFlowAutoEncoder(TINY_LFAE),
        image_size=32,
        step=1,
        data=trained_on(DATA, 0, TRAIN),
    )
    model = LatentFlowAutoEncoder(TINY_LFAE)
    with pytest.raises(
        ValueError, match=r"f.pt was trained on 1 of this dataset's test clips \(train-2\).*seed 0"
    ):
        init_lfae(model, tmp_path / "f.pt", 32, DATA, ["train-2", "test-0"])
    with pytest.warns(
        WarmStartWarning,
        match=r"trained on data.dataset 'folder' \(root 'clips'\), the params name 'embedded'",
    ):
        init_lfae(model, tmp_path / "f.pt", 32, DataConfig(), [])
    save_lfae(tmp_path / "old.pt", model, TINY_LFAE, image_size=32, step=1)
    with pytest.warns(WarmStartWarning, match="does not record what it was trained on"):
        init_lfae(model, tmp_path / "old.pt", 32, DATA, [])


def test_dm_round_trip(tmp_path):
    cfg = DMConfig(
        unet=UNetConfig(
            dim=8, dim_mults=(1, 2), resnet_groups=4, attn_heads=2, attn_dim_head=8, null_embedding="learned"
        )
    )
    diffusion = FlowDiffusion(Unet3D(cfg.unet, cond_channels=4, text_dim=6, latent_size=8), cfg.diffusion)
    save_dm(
        tmp_path / "dm.pt", diffusion, cfg, cond_channels=4, text_dim=6, num_frames=3, latent_size=8, step=2
    )
    loaded, meta = load_dm(tmp_path / "dm.pt", torch.device("cpu"))
    assert meta["num_frames"] == 3 and DMConfig.model_validate(meta["config"]) == cfg
    for a, b in zip(diffusion.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_dm_saved_before_displacement_range_loads_with_the_unit_range(tmp_path):
    cfg = DMConfig(unet=UNetConfig(dim=8, dim_mults=(1, 2), resnet_groups=4, attn_heads=2, attn_dim_head=8))
    diffusion = FlowDiffusion(Unet3D(cfg.unet, cond_channels=4, text_dim=6, latent_size=8), cfg.diffusion)
    save_dm(
        tmp_path / "dm.pt", diffusion, cfg, cond_channels=4, text_dim=6, num_frames=3, latent_size=8, step=2
    )
    old = load_checkpoint(tmp_path / "dm.pt")
    del old["config"]["diffusion"]["displacement_range"]
    old["config"]["diffusion"]["threshold_percentile"] = 0.9  # valid only on the unit range
    save_checkpoint(tmp_path / "old.pt", **old)
    loaded, _ = load_dm(tmp_path / "old.pt", torch.device("cpu"))
    assert loaded.cfg.displacement_range == 1 and loaded.cfg.threshold_percentile == 0.9


def test_checkpoints_load_with_weights_only(tmp_path):
    save_checkpoint(tmp_path / "c.pt", model={"w": torch.ones(2)}, config={"a": [1, 2]}, step=3)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # no pickled classes inside
    assert raw["step"] == 3 and raw["config"] == {"a": [1, 2]}


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, step=1)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, step=2, junk=Unpicklable())
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt could not be read"):
        load_checkpoint(tmp_path / "junk.pt")


def test_training_state_resumes_the_ema_of_the_weights(tmp_path):
    from diffusers.training_utils import EMAModel

    from lfdm.training import TrainingState

    def fresh() -> tuple[TrainingState, torch.nn.Module, EMAModel]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, 10)
        ema = EMAModel(model.parameters(), decay=0.99, use_ema_warmup=True)
        return TrainingState(tmp_path / "state.pt", model, optimizer, schedule, {"a": 1}, ema), model, ema

    state, model, ema = fresh()
    for _ in range(3):
        model(torch.randn(8, 4)).square().mean().backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        ema.step(model.parameters())
        state.step += 1
    state.save()
    shadow = [p.clone() for p in ema.shadow_params]
    assert any(
        not torch.equal(s, p) for s, p in zip(shadow, model.parameters(), strict=True)
    )  # the EMA lags the weights

    resumed, _, resumed_ema = fresh()
    assert resumed.resume() and resumed.step == 3
    assert resumed_ema.optimization_step == 3  # the warm-up continues where it stopped
    for saved, loaded in zip(shadow, resumed_ema.shadow_params, strict=True):
        torch.testing.assert_close(loaded, saved)
