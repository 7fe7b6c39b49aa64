from pathlib import Path

import pytest
import torch
import yaml

from lfdm.config import Params, ParamsError, load_params, parse_params
from lfdm.device import resolve_device
from stages import STAGES

ROOT = Path(__file__).resolve().parents[2]


def test_params_yaml_is_complete_and_matches_the_defaults():
    # params.yaml spells out every key (it is the user's documentation); the code defaults must agree
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert load_params(ROOT / "params.yaml") == Params()
    assert raw == Params().model_dump(mode="json")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"dm": {"unet": {"dim": "wide"}}}, "dm.unet.dim"),
        ({"train_lfae": {"stepz": 3}}, "train_lfae.stepz"),
        ({"data": {"image_size": 30}}, "data.image_size: must be divisible by 4"),
        ({"data": {"num_frames": 1}}, "data.num_frames"),
        ({"data": {"dataset": "ucf101"}}, "data.dataset"),
        ({"sample": {"guidance": -1}}, "sample.guidance"),
        ({"data": {"image_size": 16}, "lfae": {"region_num_blocks": 2}}, "lfae.flow_num_blocks halves the 4px"),
        ({"lfae": {"bg_scale": 0.3}}, "lfae.bg_scale: .*must be 1/n"),
        ({"lfae": {"bg_num_blocks": 6}}, "lfae.bg_num_blocks halves the 32px frames"),
        ({"data": {"image_size": 48}}, "lfae.region_num_blocks halves the 12px latent .* divisible by 8"),
        (
            {"data": {"image_size": 16}, "lfae": {"region_num_blocks": 2, "flow_num_blocks": 2},
             "dm": {"unet": {"dim_mults": [1, 2, 4, 8]}}},
            "dm.unet.dim_mults halves",
        ),
        ({"train_dm": {"lr": float("inf")}}, "train_dm.lr"),
        ({"dm": {"diffusion": {"displacement_range": float("inf")}}}, "dm.diffusion.displacement_range"),
        ({"sample": {"guidance": float("nan")}}, "sample.guidance"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed: Input should be less than 4294967296"),
        ({"sample": {"seed": -1}}, "sample.seed"),
        ({"train_dm": {"betas": [0.9, 1.0]}}, "train_dm.betas.1: Input should be less than 1"),
        ({"train_lfae": {"betas": [1.5, 0.999]}}, "train_lfae.betas.0: Input should be less than 1"),
        ({"pretrain_flow": {"betas": [-0.1, 0.999]}}, "pretrain_flow.betas.0: .*greater than or equal to 0"),
        ({"finetune_decoder": {"betas": [0.5, 1]}}, "finetune_decoder.betas.1"),
        ({"train_dm": {"betas": [0.9]}}, "train_dm.betas.1: Field required"),
        ({"device": "banana"}, "device: unknown device 'banana'; expected auto, cpu, cuda or cuda:N"),
        ({"device": "cuda:x"}, "device: unknown device 'cuda:x'"),
        ({"train_lfae": {"milestones": [0.6, 1.5]}}, "train_lfae.milestones.1: .*less than or equal to 1"),
        ({"train_dm": {"milestones": [0]}}, "train_dm.milestones.0: Input should be greater than 0"),
        ({"train_lfae": {"perceptual": {"scales": [1.0, 0.3]}}}, "train_lfae.perceptual.scales: must be 1/n"),
        ({"train_lfae": {"perceptual": {"scales": [2.0]}}}, "train_lfae.perceptual.scales.0: .*less than or equal"),
        ({"train_lfae": {"perceptual": {"scales": []}}}, "train_lfae.perceptual.scales: must list at least one"),
        ({"dm": {"unet": {"dim": 36}}}, "dm.unet: resnet_groups: 8 groups do not divide dim=36"),
        ({"sample": {"steps": 1001}}, "sample.steps: 1001 sampling steps, .* dm.diffusion.timesteps=1000"),
        ({"data": {"embedded": {"source_frames": 8}}}, "data: embedded.source_frames: 8 rendered frames .* num_frames=10"),
        ({"finetune_decoder": {"enabled": True}}, "finetune_decoder.root: the new domain's directory"),
        ({"finetune_decoder": {"enabled": True, "root": "faces", "dataset": "embedded"}}, "finetune_decoder.dataset"),
        ({"sample": {"decoder": "finetuned"}}, "sample.decoder: 'finetuned' needs finetune_decoder.enabled"),
        ({"train_lfae": {"init": None}}, "train_lfae.*freeze_motion: true keeps the warm start's flow fixed"),
        ({"dm": {"diffusion": {"threshold_percentile": 0.9}}}, f"dm.diffusion.*displacement_range: {Params().dm.diffusion.displacement_range} puts motion"),
    ],
)
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(ParamsError, match=message.replace("[", r"\[")):
        parse_params(raw, "params.yaml")


@pytest.mark.parametrize(
    ("name", "cuda", "count", "message"),
    [
        ("banana", False, 0, "device: unknown device 'banana'"),
        ("cuda", False, 0, "device: 'cuda' asks for CUDA, but torch .* sees no CUDA .*; set device to auto or cpu"),
        ("cuda:0", False, 0, "device: 'cuda:0' asks for CUDA"),
        ("cuda:1", True, 1, r"device: 'cuda:1', but torch sees 1 CUDA device\(s\) \(cuda:0 … cuda:0\)"),
    ],
)
def test_a_device_torch_cannot_use_names_the_key(monkeypatch, name, cuda, count, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(ParamsError, match=message):
        resolve_device(name)
    with pytest.raises(ParamsError, match="^--device: "):  # a command-line flag names itself
        resolve_device(name, key="--device")


def test_auto_device_falls_back_to_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")


def test_load_params_errors_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ParamsError, match=f"{bad}: not valid YAML"):
        load_params(bad)
    bad.write_text("- a list")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(bad)


def test_params_are_frozen():
    with pytest.raises(Exception, match="frozen"):
        Params().data.image_size = 128  # type: ignore[misc]


def test_dvc_stages_match_the_stage_registry():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(STAGES)
    for name, stage in dvc.items():
        assert tuple(stage["params"]) == STAGES[name], name
        assert stage["cmd"] == f"python -m stages {name}"
        assert f"stages/{name}.py" in stage["deps"]


def test_paper_config_is_valid_and_paper_sized():
    p = load_params(ROOT / "configs/paper.yaml")
    assert (p.data.image_size, p.data.num_frames, p.lfae.latent_channels) == (128, 40, 256)
    assert (p.dm.unet.dim, p.dm.unet.dim_mults, p.sample.sampler) == (64, (1, 2, 4, 8), "ddpm")
