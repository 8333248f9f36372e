"""Trims OpenAI's OpenAPI specification to the operations echo-finetune calls.

    python tests/openai/trim_spec.py path/to/openai-openapi/openapi.yaml tests/openai/openapi.yaml

Keeps the operations in KEEP, every component they reference (the transitive closure of their
`$ref`s and discriminator mappings), the security schemes, the top-level `security`, `info`,
`servers` and the tags the kept operations use. Drops the rest (other paths, webhooks,
x-oaiMeta). Key order is the source's; the same input always gives the same bytes.
Needs PyYAML.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import yaml

KEEP = {  # path: methods, as the tool (finetune.py, example_usage.py) and its tests call them
    "/files": ["post"],
    "/fine_tuning/jobs": ["post", "get"],
    "/fine_tuning/jobs/{fine_tuning_job_id}": ["get"],
    "/fine_tuning/jobs/{fine_tuning_job_id}/cancel": ["post"],
    "/fine_tuning/jobs/{fine_tuning_job_id}/events": ["get"],
    "/chat/completions": ["post"],
    "/models": ["get"],  # the tests' readiness probe
}
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def refs(node):
    """Every local reference under node: `$ref` values and discriminator mapping targets."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            elif key == "discriminator" and isinstance(value, dict):
                yield from (v for v in (value.get("mapping") or {}).values() if isinstance(v, str))
                yield from refs({k: v for k, v in value.items() if k != "mapping"})
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def component_of(ref: str) -> tuple[str, str]:
    """('schemas', 'FineTuningJob') for '#/components/schemas/FineTuningJob'."""
    parts = ref.split("/")
    if len(parts) != 4 or parts[:2] != ["#", "components"]:
        raise SystemExit(f"unsupported reference {ref!r}: only #/components/<section>/<name> is handled")
    return parts[2], parts[3].replace("~1", "/").replace("~0", "~")


def trim(spec: dict) -> dict:
    paths = {}
    for path, item in spec["paths"].items():  # the source's order
        if path not in KEEP:
            continue
        missing = [m for m in KEEP[path] if m not in item]
        if missing:
            raise SystemExit(f"{path} has no {', '.join(missing)} operation in this specification")
        paths[path] = {key: value for key, value in item.items() if key not in METHODS or key in KEEP[path]}
    absent = sorted(set(KEEP) - set(paths))
    if absent:
        raise SystemExit(f"not in this specification: {', '.join(absent)}")

    components = spec.get("components", {})
    wanted: set[tuple[str, str]] = set()
    todo = list(refs(paths))
    while todo:
        key = component_of(todo.pop())
        if key in wanted:
            continue
        section, name = key
        if name not in components.get(section, {}):
            raise SystemExit(f"dangling reference #/components/{section}/{name}")
        wanted.add(key)
        todo.extend(refs(components[section][name]))

    kept_components = {}
    for section, entries in components.items():
        if section == "securitySchemes":
            kept_components[section] = entries
            continue
        kept = {name: value for name, value in entries.items() if (section, name) in wanted}
        if kept:
            kept_components[section] = kept

    used_tags = {tag for item in paths.values() for key, op in item.items() if key in METHODS for tag in op.get("tags", [])}
    out = {}
    for key, value in spec.items():
        if key == "paths":
            out[key] = paths
        elif key == "components":
            out[key] = kept_components
        elif key == "tags":
            out[key] = [tag for tag in value if tag.get("name") in used_tags]
        elif key in ("openapi", "info", "servers", "security", "jsonSchemaDialect"):
            out[key] = value
    return out


class Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # write shared nodes out in full: no anchors, no aliases
        return True


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    source, target = Path(argv[0]), Path(argv[1])
    data = source.read_bytes()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    trimmed = trim(yaml.load(data, Loader=loader))
    header = (f"# Trimmed by tests/openai/trim_spec.py from {source.name} (sha256 {hashlib.sha256(data).hexdigest()}).\n"
              f"# Do not edit: regenerate it (see tests/openai/README.md).\n")
    body = yaml.dump(trimmed, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100, default_flow_style=False)
    target.write_text(header + body, encoding="utf-8")
    n_components = sum(len(v) for v in trimmed["components"].values())
    print(f"{target}: {len(trimmed['paths'])} paths, {n_components} components, "
          f"{len(data):,} -> {target.stat().st_size:,} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
