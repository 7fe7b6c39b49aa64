"""`dvc plots show` writes a page that renders offline: Vega, Vega-Lite and vega-embed inlined, no script
from the network, with the repository's own `plots.html_template` setting."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lfdm import plots_html

ROOT = Path(__file__).resolve().parents[2]


def dvc(cwd: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True, text=True)


def test_dvc_plots_show_inlines_vega(tmp_path: Path) -> None:
    setting = plots_html.template_path(ROOT).relative_to(ROOT / ".dvc")
    dvc(tmp_path, "init", "--no-scm", "-q")
    with (tmp_path / ".dvc/config").open("a") as config:
        config.write(f"[plots]\n    html_template = {setting.as_posix()}\n")
    (tmp_path / "loss.tsv").write_text("step\tloss\n0\t1.0\n1\t0.5\n2\t0.25\n")

    plots_html.main([str(tmp_path)])
    dvc(tmp_path, "plots", "show", "loss.tsv", "-x", "step", "-y", "loss")

    html = (tmp_path / "dvc_plots/index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=", html), "a <script src=…> needs the network"
    template = (tmp_path / ".dvc" / setting).read_text(encoding="utf-8")
    bundle = re.search(r"<script>\n(.*?)\n\s*</script>", template, re.DOTALL)[1]
    assert len(bundle) > 500_000 and bundle in html
    # the inlined bundle defines the global each plot's inline script calls, before the first call
    calls = [m.start() for m in re.finditer(r"vegaEmbed\('#loss_tsv', spec\)", html)]
    assert len(calls) == 1 and html.index("window.vegaEmbed=") < calls[0]


def test_unset_template_is_named(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc/config").write_text("[core]\n    no_scm = true\n")
    with pytest.raises(SystemExit, match=r"\.dvc/config: plots\.html_template is not set"):
        plots_html.main([str(tmp_path)])
