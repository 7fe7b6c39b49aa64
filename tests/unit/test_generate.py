import numpy as np
import pytest
import torch
from _tiny_bert import write_tiny_bert
from PIL import Image
from test_overfit import TINY_LFAE

from lfdm.config import DiffusionConfig, SamplerConfig, TextConfig, UNetConfig
from lfdm.diffusion import FlowDiffusion
from lfdm.generate import LFDMPipeline, load_image
from lfdm.models.lfae import LatentFlowAutoEncoder
from lfdm.models.unet3d import Unet3D


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    bert = write_tiny_bert(tmp_path_factory.mktemp("bert"))
    unet = UNetConfig(dim=8, dim_mults=(1, 2), resnet_groups=4, attn_heads=2, attn_dim_head=8)
    denoiser = Unet3D(unet, cond_channels=TINY_LFAE.latent_channels, text_dim=32, latent_size=8)
    torch.nn.init.normal_(denoiser.final_conv.weight, std=0.1)  # untrained but not all-zero ε
    return LFDMPipeline(
        LatentFlowAutoEncoder(TINY_LFAE), FlowDiffusion(denoiser, DiffusionConfig(timesteps=50)),
        num_frames=3, image_size=32, embeddings={"zoom in": torch.randn(32)}, text=TextConfig(checkpoint=str(bert)),
    )


def test_generates_one_video_per_image_and_label(pipe):
    images = torch.rand(2, 3, 32, 32)
    gen = pipe(images, ["zoom in", "a free-text prompt never seen"], SamplerConfig(steps=2))
    assert gen.videos.shape == (2, 3, 3, 32, 32) and 0 <= gen.videos.min() and gen.videos.max() <= 1
    assert gen.flow.shape == (2, 3, 8, 8, 2) and gen.occlusion.shape == (2, 3, 1, 8, 8)
    assert gen.z0.shape == (2, TINY_LFAE.latent_channels, 8, 8)
    assert "a free-text prompt never seen" in pipe.embeddings  # embedded on the fly with the same BERT


def test_same_seed_same_video(pipe):
    images = torch.rand(1, 3, 32, 32)
    run = lambda seed: pipe(images, ["zoom in"], SamplerConfig(sampler="ddpm"),
                            generator=torch.Generator().manual_seed(seed)).videos
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_every_frame_decodes_from_x0(pipe):
    # a video's frames are the LFAE decoding of x0 with each sampled flow (never the previous frame)
    images = torch.rand(1, 3, 32, 32)
    gen = pipe(images, ["zoom in"], SamplerConfig(steps=2))
    with torch.no_grad():
        again = pipe.lfae.decode(pipe.lfae.encode(images), images, gen.flow[0], gen.occlusion[0])
    torch.testing.assert_close(gen.videos[0], again)


def test_mismatched_labels_are_an_error(pipe):
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        pipe(torch.rand(2, 3, 32, 32), ["zoom in"], SamplerConfig(steps=1))


def test_load_image_crops_resizes_and_converts(tmp_path):
    Image.fromarray(np.zeros((40, 60), np.uint8), mode="L").save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png", 32).shape == (3, 32, 32)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png: not a readable image"):
        load_image(tmp_path / "text.png", 32)
