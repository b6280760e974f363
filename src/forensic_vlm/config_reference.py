"""``docs/configuration.md``, written from the workflow's JSON schema so the two never disagree.

The schema (``workflow/schemas/config.schema.yaml``) is what Snakemake validates the configuration
against and where each key's default and description live; this module turns it into one table
per section. ``tests/test_config.py`` fails when the page is out of date. Regenerate it with::

    python -m forensic_vlm.config_reference workflow/schemas/config.schema.yaml docs/configuration.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HEADER = """# Configuration reference

Every key of `config.yaml`, with its default. Generated from `workflow/schemas/config.schema.yaml`
(the schema Snakemake validates the configuration against) by
`python -m forensic_vlm.config_reference workflow/schemas/config.schema.yaml docs/configuration.md`;
do not edit it by hand. Set a key in `config.yaml`, in a profile's config file, or on the command
line, e.g. `snakemake --cores 8 --resources gpu=1 --config train='{epochs: 3}'`.
"""


def configuration_reference(schema: dict) -> str:
    """The Markdown page: top-level keys first, then one section per mapping of the schema."""
    properties = schema["properties"]
    sections = {name: spec for name, spec in properties.items() if spec.get("type") == "object"}
    top = {name: spec for name, spec in properties.items() if name not in sections}
    parts = [HEADER, "## Top level\n", _table(top, prefix="")]
    for name, spec in sections.items():
        parts += [
            f"## `{name}`\n",
            _text(spec.get("description", "")) + "\n",
            _table(spec["properties"], prefix=f"{name}."),
        ]
    return "\n".join(parts)


def _table(properties: dict, prefix: str) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, spec in properties.items():
        rows.append(f"| `{prefix}{key}` | {_type(spec)} | {_default(spec)} | {_text(spec.get('description', ''))} |")
        items = spec.get("items")
        if isinstance(items, dict) and "properties" in items:  # a list of entries (compare): each key of one
            rows += _table(items["properties"], prefix=f"{prefix}{key}[].").splitlines()[2:]
    return "\n".join(rows) + "\n"


def _type(spec: dict) -> str:
    if "enum" in spec:
        return "one of " + ", ".join(
            f"`{json.dumps(value) if isinstance(value, bool) else value}`" for value in spec["enum"]
        )
    kind = spec.get("type", "any")
    kinds = kind if isinstance(kind, list) else [kind]
    if "array" in kinds and isinstance(spec.get("items"), dict) and "type" in spec["items"]:
        kinds = [f"array of {spec['items']['type']}" if k == "array" else k for k in kinds]
    return " or ".join(kinds)


def _default(spec: dict) -> str:
    if "default" not in spec:
        return "(required)"
    value = spec["default"]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "see `config.yaml`"  # the class list: a table of its own would not fit in a cell
    return f"`{json.dumps(value, ensure_ascii=False)}`".replace("|", "\\|")


def _text(description: str) -> str:
    text = " ".join(description.split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def main(argv: list[str] | None = None) -> int:
    schema_path, out = (argv if argv is not None else sys.argv[1:]) or (None, None)
    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    Path(out).write_text(configuration_reference(schema), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
