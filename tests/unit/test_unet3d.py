from __future__ import annotations

from pathlib import Path

import pytest
import torch
from einops import rearrange

from lfdm.config import UNetConfig
from lfdm.models import unet3d
from lfdm.models.unet3d import Unet3D, relative_position_bucket

B, K, SIDE, COND, TEXT = 2, 4, 8, 5, 6


def make(**overrides) -> Unet3D:
    cfg = UNetConfig(dim=8, dim_mults=(1, 2), resnet_groups=4, attn_heads=2, attn_dim_head=8, **overrides)
    model = Unet3D(cfg, cond_channels=COND, text_dim=TEXT, latent_size=SIDE)
    model.final_conv.reset_parameters()  # undo the zero init so outputs depend on everything
    return model


def inputs(frames: int = K) -> dict[str, torch.Tensor]:
    return {
        "x": torch.randn(B, 3, frames, SIDE, SIDE),
        "t": torch.randint(0, 1000, (B,)),
        "cond": torch.randn(B, COND, SIDE, SIDE),
        "text_emb": torch.randn(B, TEXT),
    }


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("frames", [1, 3, K])
def test_output_shape_equals_input_shape(frames: int) -> None:
    x = inputs(frames)
    assert make()(**x).shape == x["x"].shape


def test_zero_initialised_output() -> None:
    cfg = UNetConfig(dim=8, dim_mults=(1, 2), resnet_groups=4, attn_heads=2, attn_dim_head=8)
    out = Unet3D(cfg, cond_channels=COND, text_dim=TEXT)(**inputs())
    assert torch.count_nonzero(out) == 0


def test_text_changes_output_unless_dropped() -> None:
    model, x = make(), inputs()
    other = {**x, "text_emb": torch.randn(B, TEXT)}
    assert differs(model(**x), model(**other))
    everything = torch.ones(B, dtype=torch.bool)
    torch.testing.assert_close(model(**x, drop_text=everything), model(**other, drop_text=everything))


def test_time_and_cond_change_output() -> None:
    model, x = make(), inputs()
    out = model(**x)
    assert differs(out, model(**{**x, "t": x["t"] + 1}))
    assert differs(out, model(**{**x, "cond": torch.randn(B, COND, SIDE, SIDE)}))


def test_stem_is_the_init_conv_over_frames_concatenated_with_z0() -> None:
    model, x = make(), inputs()
    frames = rearrange(x["x"], "b c k h w -> (b k) c h w")
    copies = torch.cat((frames, x["cond"].repeat_interleave(K, dim=0)), dim=1)
    torch.testing.assert_close(model.stem(x["x"], x["cond"]), model.init_conv(copies))


def test_scalar_timestep_broadcasts() -> None:
    model, x = make(), inputs()
    torch.testing.assert_close(model(**{**x, "t": torch.tensor(7)}), model(**{**x, "t": torch.full((B,), 7)}))


@pytest.mark.parametrize("null", ["zero", "learned"])
def test_drop_text_rows_use_the_null_embedding(null: str) -> None:
    model, x = make(null_embedding=null), inputs()
    embedding = model.null_text.detach() if null == "learned" else torch.zeros(TEXT)
    explicit = x["text_emb"].clone()
    explicit[0] = embedding
    dropped = model(**x, drop_text=torch.tensor([True, False]))
    torch.testing.assert_close(dropped, model(**{**x, "text_emb": explicit}))


def test_learned_null_gets_gradient_only_from_dropped_rows() -> None:
    model, x = make(null_embedding="learned"), inputs()
    out = model(**x, drop_text=torch.tensor([True, False]))
    (grad_kept,) = torch.autograd.grad(out[1].square().sum(), model.null_text, retain_graph=True)
    (grad_dropped,) = torch.autograd.grad(out[0].square().sum(), model.null_text)
    assert torch.count_nonzero(grad_kept) == 0
    assert torch.count_nonzero(grad_dropped) > 0


@pytest.mark.parametrize("norm", ["frame", "clip"])
def test_rows_of_a_batch_are_independent(norm: str) -> None:
    model, x = make(null_embedding="learned", norm=norm), inputs()
    drop = torch.tensor([False, True])
    batched = model(**x, drop_text=drop)
    for i in range(B):
        alone = model(**{name: value[i : i + 1] for name, value in x.items()}, drop_text=drop[i : i + 1])
        torch.testing.assert_close(alone[0], batched[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["frame", "clip"])
@pytest.mark.parametrize("temporal", [True, False])
def test_only_temporal_attention_and_clip_norms_mix_frames(temporal: bool, norm: str) -> None:
    model, x = make(temporal_attn=temporal, norm=norm), inputs()
    perturbed = x["x"].clone()
    perturbed[:, :, 0] += 1
    out, out_perturbed = model(**x), model(**{**x, "x": perturbed})
    assert differs(out[:, :, 0], out_perturbed[:, :, 0])
    assert differs(out[:, :, -1], out_perturbed[:, :, -1]) == (temporal or norm == "clip")


def test_clip_norm_is_group_norm_over_the_clip_tensor() -> None:
    folded = torch.randn(B * K, 8, SIDE, SIDE) * torch.linspace(0.5, 2, B * K)[:, None, None, None]
    clip_norm, frame_norm = unet3d.GroupNorm(4, 8, clip=True), unet3d.GroupNorm(4, 8, clip=False)
    clips = rearrange(folded, "(b k) c h w -> b c k h w", k=K)
    expected = rearrange(torch.nn.functional.group_norm(clips, 4), "b c k h w -> (b k) c h w")
    torch.testing.assert_close(clip_norm(folded, K), expected)
    torch.testing.assert_close(frame_norm(folded, K), torch.nn.functional.group_norm(folded, 4))
    assert differs(clip_norm(folded, K), frame_norm(folded, K))


@pytest.mark.parametrize("frame_embedding", [True, False])
def test_frame_embedding_tells_identical_frames_apart(frame_embedding: bool) -> None:
    # no temporal attention: without the frame embedding nothing tells one frame from another
    model, x = make(temporal_attn=False, frame_embedding=frame_embedding), inputs()
    x["x"] = x["x"][:, :, :1].expand(-1, -1, K, -1, -1)
    out = model(**x)
    assert differs(out[:, :, 0], out[:, :, -1]) == frame_embedding


def test_relative_position_bias_computed_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = unet3d.relative_position_bucket
    monkeypatch.setattr(
        unet3d, "relative_position_bucket", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    model = make()
    assert sum(isinstance(m, unet3d.TemporalAttention) for m in model.modules()) > 1
    model(**inputs())
    assert len(calls) == 1


def test_relative_position_buckets() -> None:
    rel = torch.arange(-40, 41)
    buckets = relative_position_bucket(rel, num_buckets=32, max_distance=32)
    assert buckets.min() >= 0 and buckets.max() <= 31
    assert buckets[rel.abs() < 8].unique().numel() == 15  # each small offset has its own bucket
    assert set(buckets[rel < 0].tolist()).isdisjoint(buckets[rel > 0].tolist())  # directions never share
    ahead, behind = buckets[rel >= 0], buckets[rel <= 0].flip(0)
    assert torch.all(ahead[1:] >= ahead[:-1]) and torch.all(behind[1:] >= behind[:-1])  # monotone in distance
    assert relative_position_bucket(rel, num_buckets=1, max_distance=4).eq(0).all()


@pytest.mark.parametrize("null", ["zero", "learned"])
def test_every_parameter_gets_a_gradient(null: str) -> None:
    model, x = make(null_embedding=null), inputs()
    model(**x, drop_text=torch.tensor([True, False])).square().mean().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert silent == []

    model.zero_grad(set_to_none=True)
    model(**x).square().mean().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert silent == (["null_text"] if null == "learned" else [])


def test_spatial_attention_only_at_small_levels() -> None:
    model = make(spatial_attn_max_size=SIDE // 2)
    assert model.downs[0].spatial is None and model.ups[-1].spatial is None
    assert model.downs[1].spatial is not None and model.ups[0].spatial is not None


def test_rejects_bad_sizes() -> None:
    x = inputs()
    with pytest.raises(ValueError, match="divisible"):
        make()(**{**x, "x": torch.randn(B, 3, K, 7, 7), "cond": torch.randn(B, COND, 7, 7)})
    with pytest.raises(ValueError, match="resnet_groups"):
        Unet3D(UNetConfig(dim=10, resnet_groups=4), cond_channels=COND, text_dim=TEXT)


def test_no_cuda_calls() -> None:
    assert ".cuda(" not in Path(unet3d.__file__).read_text()


def test_temporal_attention_is_biased_softmax_attention_on_the_fused_kernel() -> None:
    attn = unet3d.TemporalAttention(8, heads=2, dim_head=4)
    bias = torch.randn(2, K, K)
    x = torch.randn(3 * K, 8, 2, 2)  # 3 clips of K frames
    with torch.inference_mode(), torch.profiler.profile() as prof:
        out = attn(x, bias)
    kernels = {e.key for e in prof.key_averages()}
    # a 3-D mask would send SDPA down its unfused math path (3.5× slower at the paper's temporal shape)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels, kernels

    tokens = rearrange(x, "(b k) c h w -> (b h w) k c", k=K)
    q, k, v = rearrange(attn.to_qkv(attn.norm(tokens)), "n k (three h d) -> three n h k d", three=3, h=2)
    weights = (q @ k.transpose(-1, -2) / 2 + bias).softmax(-1)  # 1/√dim_head = 1/2
    expected = tokens + attn.to_out(rearrange(weights @ v, "n h k d -> n k (h d)"))
    assert torch.allclose(out, rearrange(expected, "(b h w) k c -> (b k) c h w", h=2, w=2), atol=1e-5)


def test_attention_in_chunks_is_attention_over_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = make(), inputs()
    whole = model(**x)
    calls = []
    original = unet3d.Attention.attend_chunk
    monkeypatch.setattr(
        unet3d.Attention, "attend_chunk", lambda self, *a: calls.append(1) or original(self, *a)
    )
    model(**x)
    layers = len(calls)
    monkeypatch.setattr(unet3d.Attention, "chunk_values", 1)  # one sequence per chunk
    chunked = model(**x)
    assert len(calls) - layers > 2 * layers  # it did split
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_attention_runs_in_fp32_under_cpu_bf16_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's CPU attention kernels are several times slower in bf16: the layers around it run in bf16
    attn, bias = unet3d.TemporalAttention(8, heads=2, dim_head=4), torch.randn(2, K, K)
    x = torch.randn(3 * K, 8, 2, 2)
    fp32 = attn(x, bias)
    dtypes = {}
    attn.to_qkv.register_forward_hook(lambda module, args, out: dtypes.update(qkv=out.dtype))
    sdpa = unet3d.F.scaled_dot_product_attention
    monkeypatch.setattr(
        unet3d.F,
        "scaled_dot_product_attention",
        lambda q, *a, **kw: dtypes.update(q=q.dtype) or sdpa(q, *a, **kw),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, bias)
    assert dtypes == {"qkv": torch.bfloat16, "q": torch.float32}
    assert torch.allclose(out, fp32, atol=0.1)  # the fp32 result, up to the bf16 projections
