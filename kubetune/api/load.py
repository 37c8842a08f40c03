"""Reading FineTuneJobs from YAML or dicts, with one-line errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.api.models import FineTuneJob, FineTuneJobSpec, JobDefaults


class SpecError(ValueError):
    """A spec that cannot be used; the message is one line and names the field."""


class _KubeYamlLoader(yaml.SafeLoader):
    """SafeLoader that reads floats as Kubernetes (go-yaml) does: `1e-5` is a number, not the
    string PyYAML's YAML 1.1 resolver makes of it."""


_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")
_KubeYamlLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_KubeYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
# Integers stay integers: the int resolver is tried first because it was registered first.


def load_yaml_documents(text: str) -> list[Any]:
    return [doc for doc in yaml.load_all(text, Loader=_KubeYamlLoader) if doc is not None]


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """The first problem as `field.path: what is wrong (what is allowed)`, on one line."""
    first = error.errors(include_url=False)[0]
    path = prefix
    for part in first["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"  # list indices as Kubernetes writes them: tolerations[0]
        elif not str(part).startswith("function-after"):
            path = f"{path}.{part}" if path else str(part)
    message = first["msg"]
    ctx = first.get("ctx") or {}
    if first["type"] == "literal_error" and "expected" in ctx:
        message = f"must be one of {ctx['expected']}"
    elif first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "required"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if message.startswith((".", "[")) and first["type"] == "value_error":
        return f"{path}{message}"  # a Kubernetes object's own field path (kubetune.api.podtemplate)
    got = first.get("input")
    if first["type"] not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)):
        message += f" (got {got!r})"
    extra = len(error.errors()) - 1
    if extra:
        message += f"; and {extra} more problem{'s' if extra > 1 else ''}"
    return f"{path}: {message}" if path else message


def drop_nulls(value: Any) -> Any:
    """Remove null map values, as the API server does for non-nullable fields before defaulting
    (`seed: null` in YAML means "not set", exactly as on a cluster)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def parse_finetunejob(obj: Any) -> FineTuneJob:
    """Validate a FineTuneJob object (a dict as read from YAML or the API server)."""
    obj = drop_nulls(obj)
    if not isinstance(obj, dict):
        raise SpecError(f"a FineTuneJob must be a mapping, got {type(obj).__name__}")
    if obj.get("kind", "FineTuneJob") != "FineTuneJob":
        raise SpecError(f"kind: must be FineTuneJob (got {obj.get('kind')!r})")
    try:
        return FineTuneJob.model_validate(obj)
    except ValidationError as error:
        raise SpecError(format_validation_error(error)) from None


def parse_spec(spec: Any) -> FineTuneJobSpec:
    """Validate just a FineTuneJob's spec, reporting paths as `spec.…`."""
    try:
        return FineTuneJobSpec.model_validate(drop_nulls(spec))
    except ValidationError as error:
        raise SpecError(format_validation_error(error, prefix="spec")) from None


def load_job_defaults(path: str | Path) -> JobDefaults:
    """The operator's job defaults from a YAML file: `{collector: <overlay>, trainer: <overlay>}`, or
    a Helm values file holding them under `jobDefaults` (so `kubetune render` takes the chart's)."""
    path = Path(path)
    try:
        documents = load_yaml_documents(path.read_text())
    except OSError as error:
        raise SpecError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: is not valid YAML: {getattr(error, 'problem', error)}") from None
    document = documents[0] if documents else {}
    if isinstance(document, dict) and "jobDefaults" in document:
        document = document["jobDefaults"] or {}
    try:
        return JobDefaults.model_validate(drop_nulls(document))
    except ValidationError as error:
        raise SpecError(f"{path}: {format_validation_error(error, 'jobDefaults')}") from None


def load_finetunejob(path: str | Path) -> FineTuneJob:
    """Read one FineTuneJob from a YAML file (the first FineTuneJob document in it)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read: {error.strerror}") from None
    try:
        documents = load_yaml_documents(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}:{where} is not valid YAML: {getattr(error, 'problem', error)}") from None
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    if not jobs:
        raise SpecError(f"{path}: no FineTuneJob in this file")
    try:
        return parse_finetunejob(jobs[0])
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None


def read_spec_arg(value: str) -> FineTuneJobSpec:
    """The `--spec` flag of `kubetune collect|train|run`: a YAML/JSON file holding a FineTuneJob
    (or just its spec), `-` for standard input, or `env:NAME` for an environment variable, which
    is how the operator hands the spec to its pods."""
    import os
    import sys

    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise SpecError(f"--spec {value}: environment variable {name} is not set")
        text, where = os.environ[name], f"${name}"
    elif value == "-":
        text, where = sys.stdin.read(), "stdin"
    else:
        try:
            text, where = Path(value).read_text(), value
        except OSError as error:
            raise SpecError(f"--spec {value}: cannot read: {error.strerror}") from None
    try:
        documents = load_yaml_documents(text)
    except yaml.YAMLError as error:
        raise SpecError(f"--spec {where}: not valid YAML or JSON: {getattr(error, 'problem', error)}") from None
    for document in documents:
        if isinstance(document, dict) and document.get("kind") == "FineTuneJob":
            return parse_finetunejob(document).spec
    if len(documents) == 1 and isinstance(documents[0], dict):
        return parse_spec(documents[0])
    raise SpecError(f"--spec {where}: no FineTuneJob or spec found")


def dump_spec(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The spec as the API would hold it: camelCase, defaults filled in."""
    return spec.model_dump(by_alias=True, mode="json", exclude_none=True)
