"""params.yaml → validated, typed, frozen config objects.

Every section of params.yaml maps to one pydantic model below. Unknown keys and wrong types are
errors that name the key (``ParamsError: params.yaml: dm.unet.dim: ...``). Model classes take their
section object; checkpoints store ``section.model_dump(mode="json")`` and rebuild it on load.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lfdm.errors import UserError


class Section(BaseModel):
    # no value may be .inf or .nan: one trains to NaN weights or samples black videos, and exits 0
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ParamsError(UserError, ValueError):
    """A params file that cannot be used; the message names the file and the key."""


# Adam's β1, β2: β = 1 never forgets, and the bias correction divides by 1 − βᵗ = 0
Betas = tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]]
Milestones = tuple[Annotated[float, Field(gt=0, le=1)], ...]  # fractions of a run's steps
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # numpy takes no negative seed, np.random.seed only 32 bits
DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?")  # what lfdm.device.resolve_device accepts


def _one_over_n(scale: float) -> float:
    if abs(round(1 / scale) * scale - 1) > 1e-6:
        raise ValueError(f"must be 1/n for a whole n (1, 0.5, 0.25, …), got {scale}")
    return scale


# --------------------------------------------------------------------------------------------- data


class EmbeddedDataConfig(Section):
    """The built-in dataset: real photos animated by labelled camera motions (see lfdm.data.embedded)."""

    clips_per_image: int = Field(default=8, ge=1)
    test_images: int = Field(default=8, ge=1)
    max_train_images: int | None = Field(default=None, ge=1)
    source_frames: int = Field(default=16, ge=2)  # frames rendered per clip before K are sampled


class DataConfig(Section):
    """Which clips ``preprocess`` reads and how it crops them (docs/datasets.md)."""

    dataset: Literal["embedded", "mug", "mhad", "natops", "faceforensics", "folder"] = "embedded"
    root: str | None = None
    image_size: int = Field(default=64, ge=16)
    num_frames: int = Field(default=10, ge=2)  # K, including the first frame x0
    frame_sampling: Literal["uniform", "random_sorted", "very_random"] = "random_sorted"
    # real datasets only: frames stored per clip, evenly spaced over it (paper: all, 32–96 per clip)
    max_frames: int = Field(default=64, ge=2)
    # auto: the dataset's own (mhad/natops body, faceforensics face, others none); none: whole frame
    crop: Literal["auto", "none", "center", "face", "body"] = "auto"
    face_scale: float = Field(default=1.8, ge=1.0)  # crop side / detected face side
    test_fraction: float = Field(default=0.2, gt=0, lt=1)  # folder without a split column: subjects held out
    embedded: EmbeddedDataConfig = EmbeddedDataConfig()

    @field_validator("image_size")
    @classmethod
    def _divisible_by_4(cls, v: int) -> int:
        if v % 4:
            raise ValueError(f"must be divisible by 4 (the encoder downsamples twice), got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.dataset != "embedded" and not self.root:
            raise ValueError(f"root: data.dataset={self.dataset} needs data.root, the dataset's directory")
        if self.dataset == "embedded" and self.crop not in ("auto", "none"):
            raise ValueError(f"crop: {self.crop!r} needs a real dataset; embedded clips are never cropped")
        if self.max_frames < self.num_frames:
            raise ValueError(
                f"max_frames: {self.max_frames} stored frames per clip cannot give "
                f"num_frames={self.num_frames} distinct frames; raise data.max_frames"
            )
        if self.dataset == "embedded" and self.embedded.source_frames < self.num_frames:
            raise ValueError(
                f"embedded.source_frames: {self.embedded.source_frames} rendered frames per clip cannot give "
                f"num_frames={self.num_frames} distinct frames; raise data.embedded.source_frames"
            )
        return self


# --------------------------------------------------------------------------------- stage one: LFAE


class LFAEConfig(Section):
    """Latent flow auto-encoder: encoder Φ, flow predictor F (MRAA), decoder Ω. Paper values in comments."""

    base_channels: int = Field(default=32, ge=4)  # paper 64; latent has 4× this (paper 256)
    decoder_res_blocks: int = Field(default=2, ge=0)  # paper 6
    # "skips": the official code's decoder (warps every encoder scale, blends the warped source image);
    # "latent": the paper's text, Ω(m ⊙ W(z0, f)) only. See docs/model.md.
    decoder: Literal["skips", "latent"] = "skips"
    # what Ω's warps read where the flow points outside the source: zeros (official code) or the nearest
    # edge, which leaves far less for Ω to paint in when the camera moves (docs/model.md)
    padding: Literal["zeros", "border"] = "border"
    num_regions: int = Field(default=10, ge=1)
    region_temperature: float = Field(default=0.1, gt=0)
    region_pad: int = Field(default=3, ge=0)  # padding of the 7×7 heatmap conv: 3 keeps size, 0 shrinks by 6
    pca_based: bool = True  # affine from the heatmap covariance (MRAA); False → shift only
    region_block_expansion: int = Field(default=16, ge=1)  # paper 32
    region_num_blocks: int = Field(default=3, ge=1)  # paper 5
    region_max_features: int = Field(default=256, ge=1)  # paper 1024
    flow_block_expansion: int = Field(default=16, ge=1)  # paper 64
    flow_num_blocks: int = Field(default=3, ge=1)  # paper 5
    flow_max_features: int = Field(default=256, ge=1)  # paper 1024
    bg_block_expansion: int = Field(default=16, ge=1)  # paper 32
    bg_num_blocks: int = Field(default=4, ge=1)  # paper 5
    bg_max_features: int = Field(default=256, ge=1)  # paper 1024
    # the background predictor's input: frame scale (MRAA 1; 1/n) and pixel coordinates as two extra
    # channels (not in MRAA): docs/model.md, departures
    bg_scale: float = Field(default=0.5, gt=0, le=1)
    bg_coords: bool = True
    use_background: bool = True  # background affine motion predictor
    # where F's motions come from: "mraa" (the paper: regions' positions and shapes in both frames, a background
    # regressor), or "correlation" (affine fits of the local motion a cost volume finds: docs/model.md)
    motion_estimator: Literal["mraa", "correlation"] = "correlation"
    corr_channels: int = Field(default=32, ge=2)  # correlation: feature channels compared
    # correlation: the largest displacement compared, in latent pixels
    corr_radius: int = Field(default=4, ge=1)

    @field_validator("bg_scale")
    @classmethod
    def _bg_scale(cls, scale: float) -> float:
        return _one_over_n(scale)

    @property
    def latent_channels(self) -> int:
        return self.base_channels * 4

    @property
    def flow_predictor_keys(self) -> set[str]:
        """The keys that build F (all but Φ's and Ω's)."""
        return set(type(self).model_fields) - {"base_channels", "decoder_res_blocks", "decoder", "padding"}


LRScheduleName = Literal["linear", "cosine", "multistep"]
# bf16: autocast on CUDA, or a CPU with AMX or AVX512-BF16; auto: bf16 there, else fp32
Precision = Literal["auto", "fp32", "bf16"]


class EquivarianceConfig(Section):
    weight: float = Field(default=10.0, ge=0)
    sigma_affine: float = Field(default=0.05, ge=0)
    sigma_tps: float = Field(default=0.005, ge=0)
    points_tps: int = Field(default=5, ge=2)


class PerceptualConfig(Section):
    backbone: Literal["mobilenet_v2", "vgg19"] = "mobilenet_v2"
    weights: str | None = (
        None  # a local .pth; None → the offline package's (mobilenet_v2) or torch hub cache (vgg19)
    )
    scales: tuple[Annotated[float, Field(gt=0, le=1)], ...] = (1.0, 0.5, 0.25, 0.125)  # each 1/n
    weight: float = Field(default=10.0, ge=0)

    @field_validator("scales")
    @classmethod
    def _pyramid(cls, scales: tuple[float, ...]) -> tuple[float, ...]:
        if not scales:
            raise ValueError("must list at least one scale (1.0: the frames as they are)")
        return tuple(_one_over_n(s) for s in scales)


TeacherName = Literal[
    "dis_ultrafast", "dis_fast", "dis_medium", "farneback"
]  # OpenCV's methods, lfdm.teacher


class PretrainFlowConfig(Section):
    """``pretrain_flow``: a classical optical-flow teacher's flows on the training clips distilled into F
    (docs/model.md, "How F learns motion: a teacher, distilled")."""

    teacher: TeacherName = "dis_medium"
    teacher_scale: int = Field(default=4, ge=1)  # the teacher sees the frames this many times larger
    # frame pairs per training clip (each also reversed in time)
    pairs_per_clip: int = Field(default=24, ge=1)
    augment: bool = True  # pairs reversed in time and under the eight symmetries of the square, at random
    steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    betas: Betas = (0.9, 0.999)  # the lr decays linearly to 0
    # loss weights beside the final flow's (1): the source warped by the final flow against the driving frame
    # (L1), the correlation estimator's local motion, the background affine's and each region's own motion
    # against the teacher, the occlusion head against the teacher's visibility, FOMM's equivariance
    photometric_weight: float = Field(default=1.0, ge=0)
    local_weight: float = Field(default=1.0, ge=0)
    background_weight: float = Field(default=0.1, ge=0)
    region_weight: float = Field(default=0.1, ge=0)
    occlusion_weight: float = Field(default=0.1, ge=0)
    equivariance: EquivarianceConfig = EquivarianceConfig(weight=0.0)
    checkpoint_every: int = Field(default=500, ge=1)
    log_every: int = Field(default=50, ge=1)
    num_workers: int = Field(default=0, ge=0)


class TrainLFAEConfig(Section):
    # where F starts: "pretrain_flow" (the distilled F of that stage, paths.flow_predictor), an LFAE or
    # flow-predictor checkpoint (its lfae section must equal ours), or null (from scratch, the paper)
    init: str | None = "pretrain_flow"
    # keep the warm start's flow fixed (Φ, Ω and the occlusion head train); the paper trains F jointly
    freeze_motion: bool = True
    steps: int = Field(default=300, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    betas: Betas = (0.5, 0.999)
    milestones: Milestones = (0.6, 0.9)  # fractions of `steps` (paper: epochs 60, 90 of 100)
    gamma: float = Field(default=0.1, gt=0)
    perceptual: PerceptualConfig = PerceptualConfig()
    equivariance: EquivarianceConfig = EquivarianceConfig()
    checkpoint_every: int = Field(default=100, ge=1)
    log_every: int = Field(default=10, ge=1)
    num_workers: int = Field(default=0, ge=0)
    nproc: int = Field(default=1, ge=1)  # torchrun processes

    @model_validator(mode="after")
    def _frozen_motion_needs_a_warm_start(self) -> TrainLFAEConfig:
        if self.freeze_motion and not self.init:
            raise ValueError(
                "freeze_motion: true keeps the warm start's flow fixed, so it needs train_lfae.init "
                "(set freeze_motion: false to train from scratch)"
            )
        return self


# ----------------------------------------------------------------------------------- stage two: DM


class UNetConfig(Section):
    """Conditional 3D U-Net ε_θ (Ho et al. VDM / lucidrains). Paper values in comments."""

    dim: int = Field(default=32, ge=8)  # paper 64
    dim_mults: tuple[int, ...] = (1, 2, 4)  # paper (1, 2, 4, 8)
    resnet_groups: int = Field(default=8, ge=1)
    attn_heads: int = Field(default=2, ge=1)  # paper 8
    attn_dim_head: int = Field(default=32, ge=1)
    # spatial self-attention at levels whose side is ≤ this (paper: every level, linear attention)
    spatial_attn_max_size: int = Field(default=8, ge=0)
    temporal_attn: bool = True
    rel_pos_buckets: int = Field(default=32, ge=1)
    rel_pos_max_distance: int = Field(default=32, ge=1)
    null_embedding: Literal["zero", "learned"] = "zero"  # official: zero (MUG/MHAD), learned (NATOPS)
    # add each frame's index to its FiLM conditioning (not in the paper: there only the relative temporal
    # attention bias tells frames apart, and frame 0, whose flow is the identity, is hard to find)
    frame_embedding: bool = True
    # GroupNorm statistics: per frame (frames meet only in temporal attention) or over the whole clip, as the
    # official 3D U-Net's GroupNorm on the 5-D tensor (docs/model.md, departures)
    norm: Literal["frame", "clip"] = "frame"

    @field_validator("dim_mults")
    @classmethod
    def _non_empty(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(m < 1 for m in v):
            raise ValueError(f"must be a non-empty list of positive ints, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _groups_divide_the_channels(self) -> UNetConfig:
        if self.dim % self.resnet_groups:  # GroupNorm splits every level's dim × mult channels into groups
            raise ValueError(f"resnet_groups: {self.resnet_groups} groups do not divide dim={self.dim}")
        return self


class DiffusionConfig(Section):
    timesteps: int = Field(default=1000, ge=2)
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"  # cosine
    # what the U-Net predicts: ε (paper, Eq. 7) or v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho), diffusers' names
    prediction: Literal["epsilon", "v_prediction"] = "v_prediction"
    # null-condition dropout (classifier-free guidance training)
    null_prob: float = Field(default=0.1, ge=0, le=1)
    # dynamic thresholding (Imagen; paper 0.9); 1.0 = off
    threshold_percentile: float = Field(default=1.0, gt=0, le=1)
    # what is diffused: "grid" = the absolute sampling grid (paper, official code); "displacement" = grid −
    # identity over a scale train_dm measures on the training flows (lfdm.diffusion.FlowDiffusion)
    target: Literal["grid", "displacement"] = "displacement"
    # target "displacement": the 0.995-quantile of |displacement| over the training flows maps to this value.
    # Above 1 each noise level leaves the motion more signal (sampled flows keep less spatial noise;
    # docs/results.md), but then it outgrows the [-1, 1] that dynamic thresholding assumes
    displacement_range: float = Field(default=4.0, gt=0)
    # Min-SNR-γ loss weighting (Hang et al. 2023): each sample's MSE × min(SNR_t, γ) / SNR_t (ε) or
    # / (SNR_t + 1) (v), so the easy low-noise steps stop dominating the gradient; null = plain MSE (paper)
    min_snr_gamma: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _thresholding_needs_the_unit_range(self) -> DiffusionConfig:
        if self.target == "displacement" and self.displacement_range > 1 and self.threshold_percentile < 1:
            raise ValueError(
                f"displacement_range: {self.displacement_range} puts motion beyond [-1, 1], which dynamic "
                f"thresholding (threshold_percentile: {self.threshold_percentile}) would clip and shrink; "
                "set threshold_percentile: 1.0 (off) or displacement_range: 1"
            )
        return self


SamplerName = Literal["ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]  # diffusers' names for DDIM's grid


class SamplerConfig(Section):
    sampler: SamplerName = "ddim"
    steps: int = Field(default=20, ge=1)
    guidance: float = Field(default=1.0, ge=0)  # g in Eq. 4: 1 = conditional only, 0 = null only (stochastic)
    # DDIM stochasticity: 1 = fresh noise each step (as DDPM), 0 = deterministic
    eta: float = Field(default=1.0, ge=0, le=1)
    # DDIM's timestep grid (diffusers' names): leading T−T/n … 0, trailing T−1 … T/n−1 (the official grid),
    # linspace T−1 … 0
    timestep_spacing: TimestepSpacing = "leading"


class SampleConfig(SamplerConfig):
    """The ``sample`` stage: every test clip's first frame × its label, plus free-text prompts."""

    extra_labels: tuple[str, ...] = ("pan to the left", "zoom out slowly")  # prompts beyond the labels
    decoder: Literal["trained", "finetuned"] = "trained"  # finetuned: finetune_decoder's Ω (needs it enabled)
    extra_label_videos: int = Field(default=2, ge=0)  # test images that also get each extra label
    seen_videos: int = Field(default=32, ge=0)  # training clips also generated: FVD on seen vs unseen images
    batch_size: int = Field(default=8, ge=1)
    seed: Seed = 1234
    fps: int = Field(default=8, ge=1)


class TextConfig(Section):
    checkpoint: str | None = None  # a local BERT directory; None → the offline all-MiniLM-L6-v2 package
    max_length: int = Field(default=32, ge=2)
    exclude_cls: bool = False  # official LFDM drops [CLS] from the mean; sentence-transformers keeps it


class DMConfig(Section):
    unet: UNetConfig = UNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()


class TrainDMConfig(Section):
    steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    betas: Betas = (0.9, 0.99)
    # linear / cosine: from lr to 0 over the run (diffusers' schedules); multistep: × gamma at milestones (paper)
    lr_schedule: LRScheduleName = "linear"
    milestones: Milestones = (0.67, 0.83)  # multistep: fractions of `steps` (paper: epochs 800, 1000)
    gamma: float = Field(default=0.1, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    # EMA of the weights, saved as the model: decay 1 − (1 + step)^(−2/3) (diffusers' warm-up, so it suits
    # hundreds of CPU steps and 100k GPU steps alike) capped at this value; 0 = off (official code: no EMA)
    ema_max_decay: float = Field(default=0.9999, ge=0, lt=1)
    checkpoint_every: int = Field(default=100, ge=1)
    log_every: int = Field(default=10, ge=1)
    num_workers: int = Field(default=0, ge=0)
    nproc: int = Field(default=1, ge=1)


class ExtractFlowConfig(Section):
    batch_size: int = Field(default=16, ge=1)
    # flow sequences per training clip for train_dm: the manifest's frames, then draws − 1 more, each with
    # its frames drawn again (data.frame_sampling) and a clip-wide colour jitter (the official loaders redraw
    # and jitter at every load); train_dm picks one at random per sample. 1 = the manifest's frames only
    draws: int = Field(default=1, ge=1)


class FinetuneDecoderConfig(Section):
    """New-domain decoder fine-tuning (paper Sec. 4.3, Table 5): Φ and F frozen, only Ω trained with the
    perceptual loss on the new domain's videos (their labels are not used). Off by default."""

    enabled: bool = False
    # the new domain's videos, read like data.dataset/data.root/data.crop (sizes and sampling from `data`)
    dataset: Literal["mug", "mhad", "natops", "faceforensics", "folder"] = "folder"
    root: str | None = None
    crop: Literal["auto", "none", "center", "face", "body"] = "auto"
    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    betas: Betas = (0.5, 0.999)
    checkpoint_every: int = Field(default=100, ge=1)
    log_every: int = Field(default=10, ge=1)
    num_workers: int = Field(default=0, ge=0)


class EvaluateConfig(Section):
    max_grid_videos: int = Field(default=8, ge=1)  # videos in the real-vs-generated grid artifact
    batch_size: int = Field(default=8, ge=1)  # videos per I3D forward pass
    classifier_steps: int = Field(default=1000, ge=1)  # condition-accuracy classifier training steps
    classifier_size: int = Field(default=32, ge=8, multiple_of=8)  # frame side the classifier sees


# -------------------------------------------------------------------------------------- top level


class PathsConfig(Section):
    """Where each stage writes; dvc.yaml reads the same keys (``${paths.frames}``), so they live once."""

    frames: str = "data/frames.zarr"
    manifest: str = "data/manifest.parquet"
    flow_predictor: str = "data/models/flow_predictor.pt"  # pretrain_flow's F (tracked by git: shipped)
    teacher_flows: str = "data/teacher_flows.zarr"  # pretrain_flow's cache of the teacher's flows
    lfae: str = "data/models/lfae.pt"
    flows: str = "data/flows.zarr"
    embeddings: str = "data/embeddings.pt"
    dm: str = "data/models/dm.pt"
    samples: str = "data/samples"
    metrics: str = "metrics"
    plots: str = "plots"
    references: str = (
        "data/references.pt"  # evaluate_references: real-clip features, classifier, static/oracle rows
    )
    finetune: str = "data/finetune"  # finetune_decoder: new-domain frames, manifest, LFAE with the tuned Ω
    checkpoints: str = "data/checkpoints"  # in-progress training state (resume); not a DVC out


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = None  # MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db at the repo root
    experiment: str = "lfdm"
    model_name: str = Field(default="lfdm", pattern=r"^[^/:]+$")  # evaluate registers each pipeline under it
    required: bool = (
        False  # true: a stage fails, naming the URI, when tracking does (else it goes on untracked)
    )


class ParallelConfig(Section):
    """How the Prefect flow spreads the clip-by-clip stages (extract_flow, sample, evaluate_references,
    evaluate) over Dask (docs/scaling.md). Their outputs do not depend on it, so it is no DVC param of theirs."""

    dask: bool = False  # true: each of those stages runs its shards as Prefect tasks on a Dask task runner
    shards: int = Field(default=4, ge=1)  # pieces per stage, each of whole batches
    address: str | None = None  # scheduler of an existing Dask cluster (tcp://host:8786); None: a local one
    workers: int = Field(default=2, ge=1)  # local cluster: worker processes
    threads_per_worker: int = Field(default=1, ge=1)  # local cluster: threads (and torch threads) per worker


class Params(Section):
    seed: Seed = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = "auto"
    paths: PathsConfig = PathsConfig()
    tracking: TrackingConfig = TrackingConfig()
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig = DataConfig()
    lfae: LFAEConfig = LFAEConfig()
    pretrain_flow: PretrainFlowConfig = PretrainFlowConfig()
    train_lfae: TrainLFAEConfig = TrainLFAEConfig()
    text: TextConfig = TextConfig()
    dm: DMConfig = DMConfig()
    extract_flow: ExtractFlowConfig = ExtractFlowConfig()
    train_dm: TrainDMConfig = TrainDMConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    finetune_decoder: FinetuneDecoderConfig = FinetuneDecoderConfig()

    @property
    def finetune_data(self) -> DataConfig:
        """``data`` with the new domain's dataset, root and crop (validated when fine-tuning is enabled)."""
        ft = self.finetune_decoder
        return DataConfig.model_validate(
            self.data.model_dump() | {"dataset": ft.dataset, "root": ft.root, "crop": ft.crop}
        )

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not DEVICES.fullmatch(device):
            raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")
        return device

    @model_validator(mode="after")
    def _steps_fit_the_diffusion(self) -> Params:
        if self.sample.steps > self.dm.diffusion.timesteps:
            raise ValueError(
                f"sample.steps: {self.sample.steps} sampling steps, but the model is trained on "
                f"dm.diffusion.timesteps={self.dm.diffusion.timesteps} noise levels; lower sample.steps"
            )
        return self

    @model_validator(mode="after")
    def _finetune_is_usable(self) -> Params:
        if self.sample.decoder == "finetuned" and not self.finetune_decoder.enabled:
            raise ValueError(
                "sample.decoder: 'finetuned' needs finetune_decoder.enabled: true (no fine-tuned decoder exists)"
            )
        if self.finetune_decoder.enabled:
            if not self.finetune_decoder.root:
                raise ValueError(
                    "finetune_decoder.root: the new domain's directory is needed when fine-tuning is enabled"
                )
            try:
                _ = self.finetune_data  # validates the new domain's data section
            except ValidationError as err:
                raise ValueError(
                    "finetune_decoder: "
                    + "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
                ) from None
        return self

    @model_validator(mode="after")
    def _networks_fit_the_latent(self) -> Params:
        # the hourglasses and the U-Net halve the latent per level and concatenate skips back, so the
        # latent side must divide evenly all the way down
        latent = self.data.image_size // 4
        checks = {
            "lfae.region_num_blocks": self.lfae.region_num_blocks,
            "lfae.flow_num_blocks": self.lfae.flow_num_blocks,
            "dm.unet.dim_mults": len(self.dm.unet.dim_mults) - 1,
        }
        for key, halvings in checks.items():
            if latent % (1 << halvings):
                raise ValueError(
                    f"{key} halves the {latent}px latent (data.image_size / 4) {halvings} times: "
                    f"it must be divisible by {1 << halvings}"
                )
        bg_side, halvings = self.data.image_size * self.lfae.bg_scale, self.lfae.bg_num_blocks
        if self.lfae.use_background and bg_side < 1 << halvings:
            raise ValueError(
                f"lfae.bg_num_blocks halves the {bg_side:g}px frames of the background predictor "
                f"(data.image_size × lfae.bg_scale) {halvings} times: nothing would be left"
            )
        return self


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        got = f" (got {e['input']!r})" if e["type"] not in ("missing", "value_error") and "input" in e else ""
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {key + ': ' if key else ''}{msg}{got}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(source, err)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """The one reader of params.yaml."""
    path = Path(path)
    return parse_params(_read_mapping(path), str(path))


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_overlay(overlay: str | Path, params: str | Path = "params.yaml") -> list[str]:
    """Write ``overlay``'s values (a YAML of the keys that differ, e.g. configs/paper.yaml) into the params
    file ``params`` in place, its comments and key order kept; the result is validated before anything is
    written. Returns the dotted keys whose value changed."""
    return apply_values(_read_mapping(Path(overlay)), params, str(overlay))


def apply_dotted(values: Mapping[str, Any], params: str | Path = "params.yaml") -> list[str]:
    """:func:`apply_overlay` for dotted keys, ``{"train_dm.lr": 1e-4}`` (as ``dvc exp run -S`` takes them)."""
    nested: dict[str, Any] = {}
    for dotted, value in values.items():
        *parents, last = dotted.split(".")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ParamsError(f"{dotted}: {key} is given a value and keys at once")
        node[last] = value
    return apply_values(nested, params, "the given values")


def apply_values(changes: dict[str, Any], params: str | Path, source: str) -> list[str]:
    """Write the nested ``changes`` (from ``source``, named in errors) into ``params``; see :func:`apply_overlay`."""
    from ruamel.yaml import YAML  # round-trip YAML (DVC's own): comments survive

    params = Path(params)
    round_trip = YAML()
    round_trip.width, round_trip.default_flow_style = 4096, None  # no re-wrapping; new lists inline like ours
    round_trip.preserve_quotes = True
    round_trip.representer.add_representer(
        type(None), lambda dumper, _: dumper.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    try:
        tree = round_trip.load(params.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{params}: no such params file") from None
    changed: list[str] = []

    def merge(node: Any, values: dict, prefix: str) -> None:
        for key, value in values.items():
            dotted = f"{prefix}{key}"
            if not isinstance(node, dict) or key not in node:
                raise ParamsError(f"{source}: {dotted} is not a key of {params}")
            if isinstance(value, dict):
                merge(node[key], value, f"{dotted}.")
            elif node[key] != value:
                node[key] = value
                changed.append(dotted)

    merge(tree, changes, "")
    text = io.StringIO()
    round_trip.dump(tree, text)
    parse_params(yaml.safe_load(text.getvalue()), f"{params} with {source}")
    params.write_text(text.getvalue())
    return changed
