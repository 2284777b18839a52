"""cluster/*.yaml parse, carry the keys their tools require, and name real saealign commands."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from workflows._config import parse_config
from workflows.cli import JOBS

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}


def _load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_version() -> str:
    """The Ray lower bound in pyproject.toml (the version the suite ran with)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split(">=")[1].split(",")[0] for d in deps if d.startswith("ray["))


def _config_class(job: str) -> type:
    """The frozen config dataclass a job's ``main`` parses (the module's only ``*Config``)."""
    module = importlib.import_module(f"workflows.{JOBS[job][0]}")
    found = [
        obj
        for name, obj in vars(module).items()
        if name.endswith("Config") and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
    ]
    assert len(found) == 1, f"workflows.{JOBS[job][0]}: expected one *Config dataclass, found {found}"
    return found[0]  # type: ignore[return-value]


def _commands(entrypoint: str) -> list[list[str]]:
    """``a && b`` -> [[a...], [b...]]; any other shell operator is refused."""
    words = shlex.split(entrypoint)
    assert not set(words) & {";", "||", "|", "&"}, entrypoint
    commands: list[list[str]] = [[]]
    for w in words:
        if w == "&&":
            commands.append([])
        else:
            commands[-1].append(w)
    return commands


def _check_group(spec: dict[str, Any], where: str) -> None:
    template = spec["template"]["spec"]
    assert template["containers"] and all(c["image"] for c in template["containers"]), where
    params = spec["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"


def _check_cluster_spec(spec: dict[str, Any], where: str) -> None:
    assert str(spec["rayVersion"]).startswith(_ray_version()), f"{where}: rayVersion vs pyproject's ray"
    _check_group(spec["headGroupSpec"], f"{where}.headGroupSpec")
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    for g in groups:
        _check_group(g, f"{where}.{g['groupName']}")
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in groups for c in g["template"]["spec"]["containers"]]
    assert any(gpus), f"{where}: no GPU worker group"
    assert spec["enableInTreeAutoscaling"] is True and any(g["maxReplicas"] > g["minReplicas"] for g in groups)
    assert spec["authOptions"]["mode"] == "token"


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_manifests_have_the_required_keys(name: str) -> None:
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == KUBERAY[name]
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}
    _check_cluster_spec(cluster[doc["kind"]], name)


def test_the_three_kuberay_cluster_specs_agree() -> None:
    base = _load("raycluster.yaml")["spec"]
    assert _load("rayjob.yaml")["spec"]["rayClusterSpec"] == base
    assert _load("rayservice.yaml")["spec"]["rayClusterConfig"] == base


def test_rayjob_entrypoint_is_real_saealign_commands() -> None:
    spec = _load("rayjob.yaml")["spec"]
    commands = _commands(spec["entrypoint"])
    assert [c[:2] for c in commands] == [["saealign", "build-lake"], ["saealign", "score"]]
    lakes = set()
    for command in commands:
        job, argv = command[1], command[2:]
        assert job in JOBS
        cfg: Any = parse_config(_config_class(job), argv, f"saealign {job}")  # argparse exits on a bad option
        lakes.add(cfg.lake)
    assert len(lakes) == 1, "score reads the lake build-lake wrote"
    assert lakes.pop().startswith(("s3://", "gs://")), "a cluster job needs a lake every node can reach"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1


def _serve_config_fields() -> set[str]:
    """ServeConfig's fields, read from workflows/serve_engine.py's source (no torch import)."""
    tree = ast.parse((ROOT / "workflows" / "serve_engine.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ServeConfig")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def test_rayservice_serves_the_app_with_known_args() -> None:
    serve_config = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "workflows.serve:app"
    module, attr = app["import_path"].split(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert f"def {attr}(" in (ROOT / "workflows" / "serve.py").read_text()
    assert set(app["args"]) <= _serve_config_fields(), set(app["args"]) - _serve_config_fields()
    assert app["args"]["lake"].startswith(("s3://", "gs://"))
    assert serve_config["http_options"]["port"] == 8000


def test_cluster_launcher_config_matches_rays_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")  # locates the package without importing (starting) Ray
    assert spec is not None and spec.submodule_search_locations
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    config = _load("aws-launcher.yaml")
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    assert config["provider"]["type"] == "aws"
    head, types = config["head_node_type"], config["available_node_types"]
    assert head in types
    workers = [t for name, t in types.items() if name != head]
    assert any(t["max_workers"] > t.get("min_workers", 0) for t in workers), "no autoscaling worker group"
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers), "no GPU instance type"
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in starts and "~/.ray/auth_token" in config["file_mounts"]


def test_runtime_env_is_loadable_and_lists_the_dependencies() -> None:
    from workflows.submit import load_runtime_env

    env = load_runtime_env(str(CLUSTER / "runtime_env.yaml"))
    assert Path(env["working_dir"]) == ROOT  # `..` is resolved from the file's directory
    assert ".venv" in env["excludes"] and ".git" in env["excludes"]
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1" and env["env_vars"]["SAEALIGN_CACHE"]

    def name(req: str) -> str:
        return req.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower()

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {name(d) for d in deps} - {"ray"}  # Ray comes from the cluster's image
    listed = {name(p) for p in env["pip"]["packages"]}
    assert wanted <= listed, f"missing from cluster/runtime_env.yaml pip: {sorted(wanted - listed)}"
