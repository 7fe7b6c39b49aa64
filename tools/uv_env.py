"""pip's configured package sources as uv's environment variables, for ``make install``.

uv installs the stack in well under half of pip's time (docs/benchmarks.md) but reads no pip.conf and no
``PIP_*`` variables. This prints, as shell ``export`` lines, the index, extra indexes, wheel folders,
constraints and CA bundle that ``pip config list`` shows (files and environment), so uv installs from the
same places as pip would:

    eval "$(python tools/uv_env.py)" && uv pip install ...

Like pip, uv then takes the best version found on any index (``UV_INDEX_STRATEGY=unsafe-best-match``;
uv's own default stops at the first index that has the package).
"""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys

# pip config list's sections, lowest precedence first: files' [global], files' [install], PIP_* variables
SECTIONS = ("global", "install", ":env:")
# pip setting → (uv variable, separator between values)
UV_VARIABLES = {
    "index-url": ("UV_INDEX_URL", " "),
    "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
    "find-links": ("UV_FIND_LINKS", ","),
    "constraint": ("UV_CONSTRAINT", " "),
    "cert": ("SSL_CERT_FILE", " "),
}


def pip_settings() -> dict[str, str]:
    """``pip config list``'s values for ``pip install`` by setting name, the environment over [install] over
    [global] as in pip (pip merges the files of each section itself; older pips list them sorted by name)."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    entries = []
    for line in listing.splitlines():  # e.g. global.find-links='/opt/wheels', :env:.find-links='/opt/wheels'
        name, _, value = line.partition("=")
        section, _, setting = name.rpartition(".")
        if section in SECTIONS:
            entries.append((SECTIONS.index(section), setting, ast.literal_eval(value)))
    return {setting: value for _, setting, value in sorted(entries, key=lambda entry: entry[0])}


def main() -> None:
    print("export UV_INDEX_STRATEGY=unsafe-best-match")
    for setting, value in pip_settings().items():
        if setting in UV_VARIABLES:
            variable, separator = UV_VARIABLES[setting]
            print(f"export {variable}={shlex.quote(separator.join(value.split()))}")


if __name__ == "__main__":
    main()
