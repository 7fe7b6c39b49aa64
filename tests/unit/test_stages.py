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
    result = subprocess.run([sys.executable, "-c", CONCURRENT_LOADS], cwd=Path(__file__).parents[2],
                            capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-3000:]
