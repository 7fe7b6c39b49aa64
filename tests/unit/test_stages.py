from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stages import STAGES

# a fresh interpreter, so no stage module is imported yet; every stage loaded at once, as the Prefect flow's
# threads do for independent stages
CONCURRENT_LOADS = f"""
import threading
import stages

errors = []
def load(name):
    try:
        stages.stage_function(name)
    except Exception as err:
        errors.append(f"{{name}}: {{type(err).__name__}}: {{err}}")

threads = [threading.Thread(target=load, args=(name,)) for name in {list(STAGES)!r}]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(errors)
"""


def test_stages_load_from_concurrent_threads() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CONCURRENT_LOADS],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-3000:]


def test_a_stage_missing_its_input_names_it_without_a_traceback(tmp_path) -> None:
    """``python -m stages``: a UserError (here a missing upstream output) is one line and exit 1."""
    params = tmp_path / "params.yaml"
    params.write_text(
        "tracking: {enabled: false}\n"
        f"paths: {{lfae: {tmp_path}/missing/lfae.pt, metrics: {tmp_path}/metrics}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "stages", "extract_flow", "--params", str(params)],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: extract_flow: ")
    assert "missing/lfae.pt" in result.stderr
