"""Write docs/config.md from `seqtrain config-help` (the config dataclasses' docstrings).

.venv/bin/python docs/gen_config.py          # rewrite docs/config.md
.venv/bin/python docs/gen_config.py --check  # exit 1 if docs/config.md is out of date
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from seqtrain.config import help_text

OUT = Path(__file__).resolve().parent / "config.md"
INTRO = Path(__file__).resolve().parent / "config-intro.md"
LINE = re.compile(r"^  (?P<key>\S+) \((?P<kind>.*?), default (?P<default>.*?)\): (?P<text>.*)$")


def render() -> str:
    out = [INTRO.read_text(encoding="utf-8").rstrip("\n"), ""]
    out += [
        "## Every key",
        "",
        "Generated from `seqtrain config-help` by `python docs/gen_config.py`; do not edit below.",
        "",
    ]
    for line in help_text().splitlines():
        if not line.strip():
            continue
        if not line.startswith("  "):
            out += ["", f"### {line.rstrip(':')}", ""]
            continue
        m = LINE.match(line)
        if m is None:  # a continuation or an unexpected shape: keep it as it is
            out.append(f"  {line.strip()}")
            continue
        out.append(f"- `{m['key']}` ({m['kind']}; default `{m['default']}`): {m['text']}")
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text(encoding="utf-8") == text else 1)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
