"""Writes the flag tables of README.md and docs/<pipeline>.md from the parameter dataclasses:

    python -m pipelines.docs

The dataclasses are the one definition of every flag (`--help` and MLproject come from them too).
Each table sits between `<!-- flags:NAME -->` and `<!-- /flags:NAME -->`; the rest of the page is
prose. A test checks that the committed pages hold what this renders, so they cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from pipelines import NAMES, load
from pipelines.params import CommonParams, defaults

ROOT = Path(__file__).resolve().parent.parent


def _rows(cls, names) -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = defaults(cls)
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for name in names:
        meta = fields[name].metadata
        meaning = meta.get("help", "")
        if meta.get("choices"):
            meaning += f" (one of: {', '.join(f'`{c}`' for c in meta['choices'])})"
        default = f"`{values[name]}`" if values[name] != "" else "(empty)"
        rows.append(f"| `{name}` | {default} | {meaning.replace('|', '/')} |")
    return rows


def table(name: str) -> str:
    """The flags of `name` ("common", or a pipeline: its own flags and the common ones it sets otherwise)."""
    if name == "common":
        return "\n".join(_rows(CommonParams, defaults(CommonParams)))
    cls, common = load(name).Params, defaults(CommonParams)
    own = [k for k, v in defaults(cls).items() if k not in common or v != common[k]]
    return "\n".join(_rows(cls, own))


def page(name: str) -> Path:
    return ROOT / ("README.md" if name == "common" else f"docs/{name}.md")


def render(text: str, name: str) -> str:
    """`text` with its flag table of `name` rewritten (the markers must be there already)."""
    pattern = re.compile(rf"(<!-- flags:{name} -->\n).*?(<!-- /flags:{name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- flags:{name} --> ... <!-- /flags:{name} --> block in {page(name)}")
    return pattern.sub(lambda m: m.group(1) + table(name) + "\n" + m.group(2), text)


def main() -> int:
    for name in ("common", *NAMES):
        path = page(name)
        path.write_text(render(path.read_text(), name))
        print(f"wrote the flag table of {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
