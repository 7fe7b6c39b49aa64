"""tools/uv_env.py: make install hands pip's configured package sources to uv."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def uv_variables(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools/uv_env.py")], env=env, capture_output=True, text=True, check=True
    ).stdout
    exports = [shlex.split(line) for line in out.splitlines()]
    assert all(words[0] == "export" for words in exports)
    return dict(words[1].split("=", 1) for words in exports)


def test_pip_sources_become_uv_variables(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = https://example.invalid/simple\nfind-links =\n    /wheels/a\n    /wheels/b\n"
        "extra-index-url = file:///x/simple file:///y/simple\ntimeout = 60\n"
        "[install]\nindex-url = https://install.invalid/simple\n[download]\nfind-links = /elsewhere\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": str(conf), "PIP_CONSTRAINT": "/c.txt"}
    variables = uv_variables(env)
    assert variables["UV_INDEX_URL"] == "https://install.invalid/simple"  # [install] over [global], as in pip
    assert variables["UV_FIND_LINKS"] == "/wheels/a,/wheels/b"  # uv separates folders with commas
    assert variables["UV_EXTRA_INDEX_URL"] == "file:///x/simple file:///y/simple"
    assert variables["UV_CONSTRAINT"] == "/c.txt"  # the environment counts, as for pip
    assert variables["UV_INDEX_STRATEGY"] == "unsafe-best-match"  # pip's choice across indexes
    assert not any("timeout" in name.lower() for name in variables)
