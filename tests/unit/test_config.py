from pathlib import Path

import pytest
import torch
import yaml

from lfdm.config import Params, ParamsError, apply_dotted, apply_overlay, load_params, parse_params
from lfdm.device import resolve_device
from stages import STAGES

ROOT = Path(__file__).resolve().parents[2]


def test_params_yaml_is_complete_and_matches_the_defaults():
    # params.yaml spells out every key (it is the user's documentation); the code defaults must agree
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert load_params(ROOT / "params.yaml") == Params()
    assert raw == Params().model_dump(mode="json")


# id → (params, what the error must say); the ids are what docs/reliability.md cites
BAD_PARAMS = {
    "wrong-type": ({"dm": {"unet": {"dim": "wide"}}}, "dm.unet.dim"),
    "unknown-key": ({"train_lfae": {"stepz": 3}}, "train_lfae.stepz"),
    "image-size-not-4n": ({"data": {"image_size": 30}}, "data.image_size: must be divisible by 4"),
    "k-below-2": ({"data": {"num_frames": 1}}, "data.num_frames"),
    "unknown-dataset": ({"data": {"dataset": "ucf101"}}, "data.dataset"),
    "guidance-negative": ({"sample": {"guidance": -1}}, "sample.guidance"),
    "flow-hourglass-too-deep": (
        {"data": {"image_size": 16}, "lfae": {"region_num_blocks": 2}},
        "lfae.flow_num_blocks halves the 4px",
    ),
    "bg-scale-not-1-over-n": ({"lfae": {"bg_scale": 0.3}}, "lfae.bg_scale: .*must be 1/n"),
    "bg-hourglass-too-deep": ({"lfae": {"bg_num_blocks": 6}}, "lfae.bg_num_blocks halves the 32px frames"),
    "latent-not-divisible": (
        {"data": {"image_size": 48}},
        "lfae.region_num_blocks halves the 12px latent .* divisible by 8",
    ),
    "unet-too-deep": (
        {
            "data": {"image_size": 16},
            "lfae": {"region_num_blocks": 2, "flow_num_blocks": 2},
            "dm": {"unet": {"dim_mults": [1, 2, 4, 8]}},
        },
        "dm.unet.dim_mults halves",
    ),
    "lr-inf": ({"train_dm": {"lr": float("inf")}}, "train_dm.lr"),
    "displacement-range-inf": (
        {"dm": {"diffusion": {"displacement_range": float("inf")}}},
        "dm.diffusion.displacement_range",
    ),
    "guidance-nan": ({"sample": {"guidance": float("nan")}}, "sample.guidance"),
    "seed-negative": ({"seed": -1}, "seed"),
    "seed-above-32-bits": ({"seed": 2**32}, "seed: Input should be less than 4294967296"),
    "sample-seed-negative": ({"sample": {"seed": -1}}, "sample.seed"),
    "beta2-one": ({"train_dm": {"betas": [0.9, 1.0]}}, "train_dm.betas.1: Input should be less than 1"),
    "beta1-above-one": (
        {"train_lfae": {"betas": [1.5, 0.999]}},
        "train_lfae.betas.0: Input should be less than 1",
    ),
    "beta-negative": (
        {"pretrain_flow": {"betas": [-0.1, 0.999]}},
        "pretrain_flow.betas.0: .*greater than or equal to 0",
    ),
    "finetune-beta2-one": ({"finetune_decoder": {"betas": [0.5, 1]}}, "finetune_decoder.betas.1"),
    "one-beta": ({"train_dm": {"betas": [0.9]}}, "train_dm.betas.1: Field required"),
    "device-unknown": (
        {"device": "banana"},
        "device: unknown device 'banana'; expected auto, cpu, cuda or cuda:N",
    ),
    "device-bad-index": ({"device": "cuda:x"}, "device: unknown device 'cuda:x'"),
    "milestone-above-one": (
        {"train_lfae": {"milestones": [0.6, 1.5]}},
        "train_lfae.milestones.1: .*less than or equal to 1",
    ),
    "milestone-zero": (
        {"train_dm": {"milestones": [0]}},
        "train_dm.milestones.0: Input should be greater than 0",
    ),
    "scale-not-1-over-n": (
        {"train_lfae": {"perceptual": {"scales": [1.0, 0.3]}}},
        "train_lfae.perceptual.scales: must be 1/n",
    ),
    "scale-above-one": (
        {"train_lfae": {"perceptual": {"scales": [2.0]}}},
        "train_lfae.perceptual.scales.0: .*less than or equal",
    ),
    "no-scales": (
        {"train_lfae": {"perceptual": {"scales": []}}},
        "train_lfae.perceptual.scales: must list at least one",
    ),
    "groups-not-dividing-dim": (
        {"dm": {"unet": {"dim": 36}}},
        "dm.unet: resnet_groups: 8 groups do not divide dim=36",
    ),
    "steps-above-timesteps": (
        {"sample": {"steps": 1001}},
        "sample.steps: 1001 sampling steps, .* dm.diffusion.timesteps=1000",
    ),
    "embedded-frames-below-k": (
        {"data": {"embedded": {"source_frames": 8}}},
        "data: embedded.source_frames: 8 rendered frames .* num_frames=10",
    ),
    "finetune-without-root": (
        {"finetune_decoder": {"enabled": True}},
        "finetune_decoder.root: the new domain's directory",
    ),
    "finetune-on-embedded": (
        {"finetune_decoder": {"enabled": True, "root": "faces", "dataset": "embedded"}},
        "finetune_decoder.dataset",
    ),
    "finetuned-decoder-disabled": (
        {"sample": {"decoder": "finetuned"}},
        "sample.decoder: 'finetuned' needs finetune_decoder.enabled",
    ),
    "frozen-motion-without-init": (
        {"train_lfae": {"init": None}},
        "train_lfae.*freeze_motion: true keeps the warm start's flow fixed",
    ),
    "thresholding-beyond-the-range": (
        {"dm": {"diffusion": {"threshold_percentile": 0.9}}},
        f"dm.diffusion.*displacement_range: {Params().dm.diffusion.displacement_range} puts motion",
    ),
}


@pytest.mark.parametrize(("raw", "message"), BAD_PARAMS.values(), ids=BAD_PARAMS.keys())
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(ParamsError, match=message.replace("[", r"\[")):
        parse_params(raw, "params.yaml")


@pytest.mark.parametrize(
    ("name", "cuda", "count", "message"),
    [
        ("banana", False, 0, "device: unknown device 'banana'"),
        (
            "cuda",
            False,
            0,
            "device: 'cuda' asks for CUDA, but torch .* sees no CUDA .*; set device to auto or cpu",
        ),
        ("cuda:0", False, 0, "device: 'cuda:0' asks for CUDA"),
        ("cuda:1", True, 1, r"device: 'cuda:1', but torch sees 1 CUDA device\(s\) \(cuda:0 … cuda:0\)"),
    ],
    ids=["unknown", "cuda-without-cuda", "cuda0-without-cuda", "cuda-index-beyond-count"],
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


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        out |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def test_paper_config_holds_only_what_differs_from_the_defaults():
    defaults = _leaves(Params().model_dump(mode="json"))
    overlay = _leaves(yaml.safe_load((ROOT / "configs/paper.yaml").read_text()))
    assert overlay and all(key in defaults and value != defaults[key] for key, value in overlay.items())


def test_an_overlay_is_written_into_params_yaml_keeping_its_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    changed = apply_overlay(ROOT / "configs/paper.yaml", params)
    assert load_params(params) == load_params(ROOT / "configs/paper.yaml")
    assert set(changed) == set(_leaves(yaml.safe_load((ROOT / "configs/paper.yaml").read_text())))
    before, after = (ROOT / "params.yaml").read_text().splitlines(), params.read_text().splitlines()
    assert len(after) == len(before)  # line for line: every comment is still there
    assert "  image_size: 128     # paper 128" in after
    untouched = [a for a, b in zip(before, after, strict=True) if a == b]
    assert len(untouched) == len(before) - len(changed)


def test_a_bad_overlay_names_the_key_and_writes_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "typo.yaml").write_text("lfae:\n  base_chanels: 64\n")
    with pytest.raises(ParamsError, match=r"typo.yaml: lfae.base_chanels is not a key of .*params.yaml"):
        apply_overlay(tmp_path / "typo.yaml", params)
    (tmp_path / "bad.yaml").write_text("train_dm:\n  lr: -1\n")
    with pytest.raises(ParamsError, match=r"params.yaml with .*bad.yaml: train_dm.lr"):
        apply_overlay(tmp_path / "bad.yaml", params)
    assert params.read_text() == (ROOT / "params.yaml").read_text()


def test_dotted_values_are_written_with_comments_kept_and_a_typo_named(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    changed = apply_dotted({"train_dm.lr": 2.5e-4, "sample.steps": 7, "seed": 0}, params)
    assert changed == ["train_dm.lr", "sample.steps"]  # seed was 0 already
    p = load_params(params)
    assert (p.train_dm.lr, p.sample.steps) == (2.5e-4, 7)
    assert params.read_text().count("#") == (ROOT / "params.yaml").read_text().count("#")
    before = params.read_text()
    with pytest.raises(ParamsError, match=r"the given values: train_dm.lrr is not a key"):
        apply_dotted({"train_dm.lrr": 1e-3}, params)
    with pytest.raises(ParamsError, match=r"train_dm.lr"):
        apply_dotted({"train_dm.lr": -1}, params)
    assert params.read_text() == before


def test_lfdm_params_writes_an_overlay_and_names_a_typo(tmp_path, capsys):
    from lfdm.cli import main

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    assert main(["params", str(ROOT / "configs/paper.yaml"), "--params", str(params)]) == 0
    assert load_params(params).data.image_size == 128
    assert "value(s) from" in capsys.readouterr().out
    (tmp_path / "typo.yaml").write_text("sample: {stpes: 3}\n")
    assert main(["params", str(tmp_path / "typo.yaml"), "--params", str(params)]) == 2
    assert "sample.stpes is not a key" in capsys.readouterr().err
