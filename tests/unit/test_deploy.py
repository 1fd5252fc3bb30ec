"""deploy/k8s: every manifest is valid against the Kubernetes schema (offline, kubernetes-validate), and every
`cnnexp` command in them is one the CLI's own parser accepts. No cluster runs them here (docs/scale-out.md)."""
import re

import pytest
import yaml

from cnnexp.config import TuneConfig, WorkerConfig
from helpers import REPO
from pipelines.cli import COMMANDS
from pipelines.flags import config_from_args, make_parser

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed "
                                                                        "(it comes with pip install -e '.[dev]')")

K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
CONFIGS = {"tune": TuneConfig, "worker": WorkerConfig}


def resources() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def cnnexp_commands() -> list[list[str]]:
    """Each container's `cnnexp` command line, its $(VAR)s filled from the ConfigMap and Secret as Kubernetes
    fills them from envFrom."""
    values = {}
    for doc in resources():
        values.update(doc.get("data", {}) if doc["kind"] == "ConfigMap" else doc.get("stringData", {}))
    commands = []
    for doc in resources():
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            argv = container.get("command", []) + container.get("args", [])
            if argv[:1] == ["cnnexp"]:
                commands.append([re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg) for arg in argv])
    return commands


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_is_valid_against_the_kubernetes_schema(path):
    version = kubernetes_validate.utils.latest_version()
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)  # raises, naming the field, if not


def test_the_workers_are_an_indexed_job_of_one_study():
    (job,) = [doc for doc in resources() if doc["metadata"]["name"] == "cnnexp-workers"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"]


def test_every_cnnexp_command_in_the_manifests_is_one_the_cli_accepts():
    commands = cnnexp_commands()
    assert sorted(argv[1] for argv in commands) == ["tune", "worker"]
    for _, command, *args in commands:
        assert command in COMMANDS
        config_class = CONFIGS[command]
        config = config_from_args(config_class, make_parser(f"cnnexp {command}", "", config_class).parse_args(args))
        config.validate()  # raises ConfigError, naming the flag, if the values are refused
        assert config.storage.startswith("postgresql://") and "change-me" not in config.storage
