#!/usr/bin/env python3
"""Renders and validates wharf's Kubernetes manifests offline, for tests/it/deploy.rs.

  k8s.py helm CHART --name N --namespace NS [-f VALUES]... [--set K=V]...
      Lints the chart (strict) and renders it with Helm's own engine (helm-python-sdk, which embeds the Helm
      Go SDK: no helm binary, no cluster), values.schema.json included. Prints the manifests as a YAML stream.
  k8s.py validate FILE --kube-version V [--kube-version V]...
      Reads a YAML stream (FILE, or - for stdin), validates every object strictly (unknown fields are errors) against the
      Kubernetes OpenAPI schemas bundled in kubernetes-validate, and prints the objects as a JSON array.
      Custom resources this project renders (ServiceMonitor) are checked against a schema of their own here.

Errors go to stderr with exit status 1. Installed by scripts/test into target/deploy-venv
(tests/deploy/requirements.txt).
"""

import argparse
import json
import sys

import yaml

# prometheus-operator's ServiceMonitor (monitoring.coreos.com/v1), reduced to the fields the chart renders; a
# typo in any of them is an error, as with the built-in kinds.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                        },
                    },
                },
            },
        },
    },
}


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def deep_merge(base, override):
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def cmd_helm(args):
    import helm_python as helm

    values = {}
    for path in args.values:
        with open(path) as f:
            deep_merge(values, yaml.safe_load(f) or {})
    for assignment in args.set:
        deep_merge(values, helm.parse_set_string(assignment))
    report = helm.lint(args.chart, values, strict=True, namespace=args.namespace, kube_version=args.kube_version)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
    if problems:
        fail("helm lint: " + "; ".join(str(p.get("path", "")) + " " + p["error"] for p in problems))
    try:
        with helm.Chart.load(args.chart) as chart:
            rendered = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    except helm.HelmError as e:
        fail(f"helm render: {e}")
    docs = []
    for path in sorted(rendered):
        if path.endswith(".yaml") and rendered[path].strip():
            docs.append(rendered[path].strip("\n"))
    print("\n---\n".join(docs))


def cmd_validate(args):
    import jsonschema
    import kubernetes_validate

    with (sys.stdin if args.file == "-" else open(args.file)) as f:
        objects = [d for d in yaml.safe_load_all(f) if d is not None]
    if not objects:
        fail(f"no objects in {args.file}")
    errors = []
    for obj in objects:
        what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("apiVersion") == "monitoring.coreos.com/v1" and obj.get("kind") == "ServiceMonitor":
            try:
                jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
            except jsonschema.ValidationError as e:
                errors.append(f"{what}: {e.message} at {'/'.join(map(str, e.absolute_path))}")
            continue
        for version in args.kube_version:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{what} (Kubernetes {version}): {e.message} at {'/'.join(map(str, e.path))}")
            except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
                errors.append(f"{what} (Kubernetes {version}): {e}")
    if errors:
        fail("\n".join(errors))
    json.dump(objects, sys.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("helm")
    h.add_argument("chart")
    h.add_argument("--name", required=True)
    h.add_argument("--namespace", required=True)
    h.add_argument("-f", "--values", action="append", default=[])
    h.add_argument("--set", action="append", default=[])
    h.add_argument("--kube-version", default="v1.33.0")
    h.set_defaults(func=cmd_helm)
    v = sub.add_parser("validate")
    v.add_argument("file")
    v.add_argument("--kube-version", action="append", required=True)
    v.set_defaults(func=cmd_validate)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
