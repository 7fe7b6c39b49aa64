"""Latency of one video: the pipeline called in-process against the same pipeline behind ``lfdm serve``'s
REST endpoint (MLflow's scoring server; the request and answer are JSON, the video comes back as an array,
an MP4 and a flow PNG). Networks of the default params' shapes, untrained (latency does not depend on the
weights); the default sampler; the same seed for every call.

    python benchmarks/serving.py                      # 5 calls each after one warm-up
    python benchmarks/serving.py --calls 10 --steps 50

Prints a markdown table: median and min seconds per video, and what the REST round trip adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from lfdm.config import load_params
from lfdm.pipeline import LFDMPipeline, PipelineConfig
from lfdm.serving import encode_image

ROOT = Path(__file__).resolve().parents[1]
BERT_DIM = 384  # the packaged BERT's


def timed(call, count: int) -> list[float]:
    call()  # warm-up: first-call allocations, thread pools
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def post(url: str, body: bytes) -> dict:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.loads(answer.read())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--steps", type=int, help="default: the params' sampler's")
    parser.add_argument("--port", type=int, default=5099)
    args = parser.parse_args()

    p = load_params(ROOT / "params.yaml")
    config = PipelineConfig.from_params(p, BERT_DIM)
    torch.manual_seed(0)
    pipe = LFDMPipeline.from_config(config, {"zoom in": torch.randn(BERT_DIM)})
    steps = args.steps or pipe.inference_steps(pipe.config.sampler)
    image = np.random.default_rng(0).integers(0, 256, (p.data.image_size,) * 2 + (3,), dtype=np.uint8)

    def in_process() -> None:
        pipe(image, "zoom in", num_inference_steps=steps, generator=torch.Generator().manual_seed(0))

    body = json.dumps(
        {
            "dataframe_records": [{"image": encode_image(image), "label": "zoom in"}],
            "params": {"steps": steps},
        }
    ).encode()
    with tempfile.TemporaryDirectory() as tmp:
        saved = pipe.save_pretrained(Path(tmp) / "pipeline")
        start = time.perf_counter()
        pipe = LFDMPipeline.from_pretrained(saved)
        load_local = time.perf_counter() - start
        local = timed(in_process, args.calls)

        cmd = [sys.executable, "-m", "lfdm.cli", "serve", str(saved), "--port", str(args.port)]
        start = time.perf_counter()
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{args.port}"
            while server.poll() is None:
                try:
                    urllib.request.urlopen(f"{url}/ping", timeout=5).close()
                    break
                except OSError:
                    time.sleep(0.1)
            load_rest = time.perf_counter() - start
            answer_bytes = len(json.dumps(post(f"{url}/invocations", body)))
            rest = timed(lambda: post(f"{url}/invocations", body), args.calls)
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(
        f"{config.sampler.sampler}-{steps}, {p.data.image_size}² × {p.data.num_frames} frames, "
        f"{torch.get_num_threads()} threads; request {len(body) / 1e3:.0f} kB, answer {answer_bytes / 1e3:.0f} kB"
    )
    print("| call | cold load s | median s / video | min s / video |\n|---|---|---|---|")
    rows = (
        ("in-process: `LFDMPipeline.from_pretrained`, `pipe(...)`", load_local, local),
        ("REST: `lfdm serve` started, `POST /invocations`", load_rest, rest),
    )
    for name, load, seconds in rows:
        print(f"| {name} | {load:.2f} | {statistics.median(seconds):.3f} | {min(seconds):.3f} |")
    print(f"REST adds {statistics.median(rest) - statistics.median(local):+.3f} s per video (median)")


if __name__ == "__main__":
    main()
