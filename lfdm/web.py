"""``lfdm serve``: the MLflow scoring server of a pipeline with a small web page on the same port.

``POST /invocations`` (and ``/ping``, ``/health``, ``/version``) are MLflow's own scoring server
(:func:`mlflow.pyfunc.scoring_server.init`), so the page's requests and a ``curl`` call get what
``mlflow models serve`` answers (:mod:`lfdm.serving`). ``GET /`` is the page: upload or pick an image, type a
label, choose steps / guidance / seed, and the video plays beside its latent flows. It loads nothing from
another host, so it works offline. ``GET /examples/<name>.png`` are photos shipped with scikit-image.
"""

from __future__ import annotations

import io
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

import mlflow
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, Response
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.pyfunc.scoring_server import init as scoring_app
from PIL import Image

from lfdm.errors import UserError
from lfdm.pipeline import CONFIG_NAME, MODEL_URI, LFDMPipeline
from lfdm.serving import EXAMPLE_PHOTOS, example_photo, save_pipeline_model

EXAMPLE_SIZE = 256


@cache
def example_png(name: str) -> bytes:
    """A photo of :data:`~lfdm.serving.EXAMPLE_PHOTOS`, :data:`EXAMPLE_SIZE` wide, as PNG bytes."""
    photo = Image.fromarray(example_photo(name)).resize(
        (EXAMPLE_SIZE, EXAMPLE_SIZE), Image.Resampling.LANCZOS
    )
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    return buffer.getvalue()


def load_model(source: str | Path) -> PyFuncModel:
    """An MLflow model URI (``models:/lfdm@champion``, ``runs:/…``, a logged model's folder) or a folder
    :meth:`~lfdm.pipeline.LFDMPipeline.save_pretrained` wrote, as a pyfunc model on the CPU or the GPU."""
    folder = Path(source)
    try:
        if (folder / "MLmodel").is_file() or (not folder.exists() and MODEL_URI.match(str(source))):
            return mlflow.pyfunc.load_model(str(source))
        if (folder / CONFIG_NAME).is_file():
            with tempfile.TemporaryDirectory(prefix="lfdm-serve-") as tmp:  # loaded into memory, then dropped
                save_pipeline_model(LFDMPipeline.from_pretrained(folder), Path(tmp) / "model")
                return mlflow.pyfunc.load_model(str(Path(tmp) / "model"))
    except MlflowException as err:
        raise UserError(f"{source}: {err.message}") from None
    raise UserError(
        f"{source}: neither an MLflow model URI (models:/name@alias, runs:/id/model) nor a folder with an "
        f"MLmodel or a saved pipeline's {CONFIG_NAME}"
    )


def create_app(model: PyFuncModel) -> FastAPI:
    """MLflow's scoring app for ``model`` plus the page and its example photos."""
    app = scoring_app(model)
    page = resources.files("lfdm").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/examples")
    async def examples() -> list[str]:
        return list(EXAMPLE_PHOTOS)

    @app.get("/examples/{name}.png")
    async def example(name: str) -> Response:
        if name not in EXAMPLE_PHOTOS:
            raise HTTPException(404, f"no example {name!r}; there are {', '.join(EXAMPLE_PHOTOS)}")
        return Response(example_png(name), media_type="image/png")

    return app


def serve(source: str | Path, host: str, port: int) -> None:
    """Load ``source`` (:func:`load_model`) and answer on ``http://host:port`` until interrupted."""
    import uvicorn

    app = create_app(load_model(source))
    print(f"lfdm: serving {source} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
