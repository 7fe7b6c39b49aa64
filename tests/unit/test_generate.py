"""LFDMPipeline (inputs, outputs, save/load) and ``lfdm generate`` (every flag checked before sampling)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _tiny_bert import write_tiny_bert
from PIL import Image
from test_overfit import TINY_LFAE

from lfdm.cli import main
from lfdm.config import DiffusionConfig, DMConfig, SamplerConfig, TextConfig, UNetConfig
from lfdm.device import cpu_has_native_bf16
from lfdm.diffusion import save_dm
from lfdm.models.lfae_checkpoints import save_lfae
from lfdm.pipeline import CONFIG_NAME, LFDMPipeline, PipelineConfig, SamplerOptionError, load_image
from lfdm.video import count_frames


def tiny_pipeline(bert: Path) -> LFDMPipeline:
    """32² frames, 3 of them, a 50-step DM, one embedded label; untrained weights."""
    config = PipelineConfig(
        image_size=32,
        num_frames=3,
        text_dim=32,
        lfae=TINY_LFAE,
        dm=DMConfig(
            unet=UNetConfig(dim=8, dim_mults=(1, 2), resnet_groups=4, attn_heads=2, attn_dim_head=8),
            diffusion=DiffusionConfig(timesteps=50),
        ),
        text=TextConfig(checkpoint=str(bert)),
        sampler=SamplerConfig(steps=2),
    )
    pipe = LFDMPipeline.from_config(config, {"zoom in": torch.randn(32)})
    torch.nn.init.normal_(pipe.diffusion.denoiser.final_conv.weight, std=0.1)  # untrained but not all-zero ε
    return pipe


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(write_tiny_bert(tmp_path_factory.mktemp("bert")))


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_generates_one_video_per_image_and_label(pipe):
    images = torch.rand(2, 3, 32, 32)
    gen = pipe(images, ["zoom in", "a free-text prompt never seen"])
    assert gen.videos.shape == (2, 3, 3, 32, 32) and gen.videos.min() >= 0 and gen.videos.max() <= 1
    assert gen.flow.shape == (2, 3, 8, 8, 2) and gen.occlusion.shape == (2, 3, 1, 8, 8)
    assert gen.z0.shape == (2, TINY_LFAE.latent_channels, 8, 8)
    assert "a free-text prompt never seen" in pipe.embeddings  # embedded on the fly with the same BERT


def test_same_seed_same_video(pipe):
    images = torch.rand(1, 3, 32, 32)

    def run(seed: int) -> torch.Tensor:
        return pipe(images, "zoom in", eta=1.0, generator=seeded(seed)).videos  # fresh noise every step

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_every_frame_decodes_from_x0(pipe):
    # a video's frames are the LFAE decoding of x0 with each sampled flow (never the previous frame)
    images = torch.rand(1, 3, 32, 32)
    gen = pipe(images, ["zoom in"])
    with torch.no_grad():
        again = pipe.lfae.decode(pipe.lfae.encode(images), images, gen.flow[0], gen.occlusion[0])
    torch.testing.assert_close(gen.videos[0], again)


def test_one_image_goes_with_every_prompt_and_one_prompt_with_every_image(pipe):
    image = torch.rand(3, 32, 32)
    assert pipe(image, ["zoom in", "pan left"]).videos.shape[0] == 2
    assert pipe([image, image, image], "zoom in").videos.shape[0] == 3
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        pipe(torch.rand(2, 3, 32, 32), ["zoom in"])
    with pytest.raises(ValueError, match="prompt: ' ' is no text"):
        pipe(image, " ")


def test_sampler_options_name_the_keyword(pipe):
    assert pipe.sampler_config() == SamplerConfig(steps=2)  # the saved default
    assert (
        pipe.sampler_config("dpmsolver++", num_inference_steps=7).model_dump()
        == SamplerConfig(sampler="dpmsolver++", steps=7).model_dump()
    )
    cases = [
        ({"num_inference_steps": 0}, "steps", "num_inference_steps: .*greater than or equal to 1"),
        ({"num_inference_steps": 51}, "steps", "num_inference_steps: 51 is more than the model's 50"),
        ({"sampler": "ddpm", "num_inference_steps": 20}, "steps", "ddpm samples all 50 training timesteps"),
        ({"guidance_scale": float("inf")}, "guidance", "guidance_scale: .*finite"),
        ({"eta": 1.5}, "eta", "eta: .*less than or equal to 1"),
        ({"sampler": "euler"}, "sampler", "sampler: .*'ddpm', 'ddim'"),
    ]
    for options, field, message in cases:
        with pytest.raises(SamplerOptionError, match=message) as err:
            pipe(torch.rand(3, 32, 32), "zoom in", **options)
        assert err.value.field == field
    assert pipe.sampler_config("ddpm", num_inference_steps=50).sampler == "ddpm"  # exactly what runs


def test_a_non_finite_sample_is_an_error(pipe):
    with pytest.raises(FloatingPointError, match="not finite"):
        pipe(torch.rand(3, 32, 32), "zoom in", guidance_scale=1e38)


def test_save_and_load_round_trip_is_bit_identical(pipe, tmp_path):
    pipe.embed(["a prompt embedded on the fly"])
    pipe.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / CONFIG_NAME).read_text())
    assert (
        config["text"]["checkpoint"] == "text_encoder"
        and (tmp_path / "saved/text_encoder/config.json").is_file()
    )
    assert config["labels"] == list(pipe.embeddings) and config["sampler"]["steps"] == 2
    loaded = LFDMPipeline.from_pretrained(tmp_path / "saved")
    for a, b in ((pipe.lfae, loaded.lfae), (pipe.diffusion, loaded.diffusion)):
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    images, prompts = torch.rand(2, 3, 32, 32), ["zoom in", "never seen before"]
    for sampler in ("ddim", "sde-dpmsolver++"):
        ours = pipe(images, prompts, sampler=sampler, generator=seeded())
        theirs = loaded(images, prompts, sampler=sampler, generator=seeded())
        assert torch.equal(ours.videos, theirs.videos) and torch.equal(ours.flow, theirs.flow)


def test_from_pretrained_names_what_is_wrong(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG_NAME}"):
        LFDMPipeline.from_pretrained(tmp_path)
    saved = pipe.save_pretrained(tmp_path / "saved")
    (saved / "dm.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="unreadable saved pipeline"):
        LFDMPipeline.from_pretrained(saved)
    (saved / CONFIG_NAME).write_text(json.dumps({"format_version": 9}))
    with pytest.raises(ValueError, match="format_version 9; lfdm reads 1"):
        LFDMPipeline.from_pretrained(saved)


def test_images_of_any_depth_and_mode(tmp_path):
    grey16 = np.linspace(0, 65535, 40 * 60).reshape(40, 60).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    from16 = load_image(tmp_path / "grey16.png", 32)
    assert from16.shape == (3, 32, 32) and 0.3 < from16.mean() < 0.7  # rescaled, not clipped to white
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((40, 60), 7, np.uint8)])).save(tmp_path / "rgba.png")
    reference = load_image(rgb, 32)
    for same in (
        tmp_path / "rgba.png",
        Image.open(tmp_path / "rgba.png"),
        rgb.astype(np.float32) / 255,
        rgb.astype(np.uint16) * 257,
        torch.from_numpy(rgb).permute(2, 0, 1),
    ):
        assert torch.equal(load_image(same, 32), reference)
    grey = rgb[..., 0]
    assert torch.equal(load_image(grey, 32), load_image(grey[..., None], 32))
    assert torch.equal(load_image(grey, 32)[0], load_image(grey, 32)[2])
    tensor = torch.rand(3, 32, 32)
    assert load_image(tensor, 32) is tensor  # the model's own size and range: taken as it is


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((8, 8), np.int64), "expected uint8, uint16 or float pixels, got int64"),
        (np.full((8, 8, 3), 2.0), r"float images lie in \[0, 1\]"),
        (np.zeros((3, 8, 8)), r"expected an image \(H, W\) or \(H, W, 1\|3\|4\)"),
        (torch.full((3, 32, 32), 255.0), r"float image tensors lie in \[0, 1\]"),
    ],
    ids=["int64", "float-range", "channels-first-array", "tensor-range"],
)
def test_unusable_images_are_named(image, message):
    with pytest.raises(ValueError, match=message):
        load_image(image, 32)


def test_unreadable_image_file_is_named(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png: not a readable image"):
        load_image(tmp_path / "text.png", 32)


# ----------------------------------------------------------------------------------- lfdm generate


@pytest.fixture(scope="module")
def project(pipe, tmp_path_factory):
    """A params.yaml whose relative paths name the tiny pipeline's checkpoints, and an image."""
    root = tmp_path_factory.mktemp("project")
    save_lfae(root / "models/lfae.pt", pipe.lfae, TINY_LFAE, image_size=32, step=1)
    save_dm(
        root / "models/dm.pt",
        pipe.diffusion,
        pipe.config.dm,
        cond_channels=TINY_LFAE.latent_channels,
        text_dim=32,
        num_frames=3,
        latent_size=8,
        step=1,
    )
    params = {
        "paths": {"lfae": "models/lfae.pt", "dm": "models/dm.pt", "embeddings": "models/none.pt"},
        "text": {"checkpoint": pipe.config.text.checkpoint},
        "sample": {"steps": 2},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "elsewhere").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
        root / "face.png"
    )
    return root


def generate(project: Path, *flags: str, out: str = "clip.gif") -> list[str]:
    return [
        "--params",
        str(project / "params.yaml"),
        "generate",
        "--image",
        str(project / "face.png"),
        "--label",
        "zoom in",
        "--out",
        str(project / "elsewhere" / out),
        *flags,
    ]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--steps", "0"], "--steps: Input should be greater than or equal to 1"),
        (["--steps", "many"], "argument --steps: invalid int value"),
        (["--guidance", "inf"], "--guidance: Input should be a finite number"),
        (["--guidance", "-1"], "--guidance: Input should be greater than or equal to 0"),
        (["--eta", "2"], "--eta: Input should be less than or equal to 1"),
        (["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
        (["--fps", "0"], "argument --fps: 0 is outside [1, 100]"),
        (["--seed", "-1"], "argument --seed: -1 is outside"),
        (["--label", " "], "--label is empty"),
        (["--device", "banana"], "--device: unknown device 'banana'"),
        (["--dm", "missing.pt"], "--dm missing.pt: no such file"),
        (["--flow-out", "flow.txt"], "--flow-out flow.txt: the file must end in"),
        (["--image", "missing.png"], "--image missing.png: not a readable image"),
        (["--unknown"], "unrecognized arguments: --unknown"),
    ],
)
def test_generate_names_the_bad_flag_before_loading_anything(project, capsys, flags, named):
    assert main(generate(project, *flags)) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("flags", "out", "named"),
    [
        ([], "clip.avi", "--out {out}: the file must end in .gif or .mp4"),
        ([], "face.png/clip.gif", "is not a directory"),  # never found after sampling
        (
            ["--sampler", "ddpm", "--steps", "20"],
            "clip.gif",
            "--steps: ddpm samples all 50 training timesteps",
        ),
        (["--steps", "51"], "clip.gif", "--steps: 51 is more than the model's 50 training timesteps"),
    ],
)
def test_generate_checks_the_output_and_the_model_before_sampling(project, capsys, flags, out, named):
    if out.startswith("face.png/"):
        out = str(project / out)
    assert main(generate(project, *flags, out=out)) == 2
    err = capsys.readouterr().err
    assert named.format(out=project / "elsewhere" / out) in err and "sampling" not in err


def test_generate_works_from_any_directory(project, capsys, monkeypatch):
    monkeypatch.chdir(project / "elsewhere")  # params.yaml is found above, its paths read from its folder
    assert (
        main(
            [
                "generate",
                "--image",
                "../face.png",
                "--label",
                "zoom in",
                "--out",
                "clip.mp4",
                "--flow-out",
                "flow.png",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "wrote clip.mp4 (3 frames, ddim-2, g=1.0)" in out and "sampling: 100%" in err
    assert count_frames(project / "elsewhere/clip.mp4") == 3
    assert Image.open(project / "elsewhere/flow.png").size == (3 * 8 * 4, 8 * 4)


def test_generate_names_a_missing_trained_model_with_exit_1(project, tmp_path, capsys):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["paths"] |= {"lfae": str(project / "models/lfae.pt"), "dm": "untrained/dm.pt"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = generate(project)
    argv[1] = str(tmp_path / "params.yaml")
    assert main(argv) == 1
    assert (
        f"{tmp_path}/untrained/dm.pt does not exist: train it (`dvc repro` in {tmp_path})"
        in capsys.readouterr().err
    )


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("lfdm 0.")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8)" in text and "(default: sample.steps)" in text and "takes no --steps" in text


@pytest.mark.skipif(
    not cpu_has_native_bf16(), reason="this CPU has no AMX or AVX512-BF16: bf16 is refused here"
)
def test_bf16_generation_runs_on_a_cpu_that_has_it_and_returns_fp32_frames(pipe):
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    fp32 = pipe(image, "zoom in", num_inference_steps=2, generator=seeded())
    bf16 = pipe(image, "zoom in", num_inference_steps=2, generator=seeded(), precision="bf16")
    dtypes = {bf16.videos.dtype, bf16.flow.dtype, bf16.occlusion.dtype, bf16.z0.dtype}
    assert (
        dtypes == {torch.float32} and bf16.videos.shape == fp32.videos.shape
    )  # `sample` stores them as numpy
    assert torch.isfinite(bf16.videos).all()
    assert not torch.equal(bf16.flow, fp32.flow)  # the networks did run in bf16
    assert (bf16.videos - fp32.videos).abs().mean() < 0.05  # … to about the same video
