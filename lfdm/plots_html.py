"""The page `dvc plots show` fills, with Vega, Vega-Lite and vega-embed inlined so that it renders offline.

DVC's own page loads the three from a CDN and is blank without internet. ``plots.html_template`` in
.dvc/config points DVC at this page instead, and ``make install`` writes it (``python -m lfdm.plots_html``).
The libraries come as one bundle from vl-convert-python, so pyproject.toml pins their versions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import vl_convert

VEGA_LITE = "5.21"  # DVC's plot templates are Vega-Lite v5 specs
# What DVC substitutes in a template (dvc_render.html.HTML.embed); the bundle must contain none of them.
PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")

# No {scripts}: DVC puts its CDN <script> tags there. The bundle sets window.vegaEmbed, which each plot's
# inline script calls as the page is parsed, so it comes before {plot_divs}. The bundle holds non-ASCII
# text, hence the charset (file:// pages have no Content-Type to say it).
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <script>
VEGA_BUNDLE
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page() -> str:
    """The HTML template, with vega-embed, Vega-Lite ``VEGA_LITE`` and Vega inlined."""
    # the stub makes snippet required; it defaults to None (the bundle's own snippet) at run time
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)  # pyright: ignore[reportCallIssue]
    clashes = [p for p in (*PLACEHOLDERS, "</script") if p in bundle]
    if clashes:
        raise RuntimeError(f"vl-convert's JavaScript bundle contains {clashes}: it cannot be inlined")
    return PAGE.replace("VEGA_BUNDLE", bundle)


def template_path(root: Path) -> Path:
    """Where `dvc plots show` in ``root`` reads its page: ``plots.html_template``, relative to .dvc/."""
    from dvc.config import Config

    dvc_dir = root / ".dvc"
    value = Config(dvc_dir=str(dvc_dir))["plots"].get("html_template")
    if not value:
        raise SystemExit(f"{dvc_dir / 'config'}: plots.html_template is not set")
    return dvc_dir / value


def main(argv: list[str] | None = None) -> None:
    about = __doc__.splitlines()[0] if __doc__ else None  # None under python -OO
    parser = argparse.ArgumentParser(prog="python -m lfdm.plots_html", description=about)
    parser.add_argument("root", nargs="?", default=".", type=Path, help="the DVC repository (default: .)")
    path = template_path(parser.parse_args(argv).root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(), encoding="utf-8")
    print(path)


if __name__ == "__main__":
    main()
