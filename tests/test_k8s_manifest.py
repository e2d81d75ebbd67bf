"""launch/k8s-pytorchjob.yaml, checked offline: against the PyTorchJob API and Kubernetes' pod schema (every
field known, of its type, the required ones present), and against the launcher it starts (torchrun's options,
the trainer's config and overrides, node and GPU counts, a grace period that covers a checkpoint save).

The schema is one JSON Schema: the PyTorchJob levels come from the models of the Kubeflow training SDK
(kubeflow-training, kubeflow.org/v1: their attribute names and types, and the attributes their client-side
validation requires), the Kubernetes types inside them (the pod template, the metadata) from Kubernetes' own
OpenAPI definitions in their strict form (kubernetes-validate: unknown fields are errors) for KUBERNETES_VERSION.
No pip package ships the operator's CRD schema; the SDK is generated from the same API types.
Each negative case mutates a copy of the manifest and must be refused, so neither check can pass vacuously.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.resources
import io
import json
import re

import jsonschema
import pytest
import referencing
import yaml
from kubeflow.training import Configuration
from kubeflow.training import models as kubeflow_models
from torch.distributed.run import parse_args as torchrun_parse_args

from mpo_dist import launcher
from mpo_dist.config import ConfigError, load_config
from mpo_dist.train import parse_args as trainer_parse_args
from support import REPO

pytestmark = pytest.mark.unit

MANIFEST = REPO / "launch" / "k8s-pytorchjob.yaml"
IMAGE_HOME = "/opt/mpo_dist"  # the repository's copy in the image (Dockerfile: MPO_DIST_HOME)
# The oldest Kubernetes the manifest is checked against: its fields must all exist there.
KUBERNETES_VERSION = "1.30"
# Seconds between torchrun giving up on the ranks (--shutdown-timeout) and Kubernetes' SIGKILL: torchrun's
# teardown and the processes' exit.
EXIT_MARGIN_S = 60

# The Kubernetes types the training SDK's models refer to, by their names in Kubernetes' OpenAPI definitions.
KUBERNETES_TYPES = {
    "V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "V1PodTemplateSpec": "io.k8s.api.core.v1.PodTemplateSpec",
    "V1LabelSelector": "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector",
    "Quantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "K8sIoApiAutoscalingV2MetricSpec": "io.k8s.api.autoscaling.v2.MetricSpec",
}
PRIMITIVE_TYPES = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
                   "float": {"type": "number"}, "datetime": {"type": "string"}, "object": {}}
# What the training operator refuses beyond the types (its validation of a PyTorchJob: the replica types, a
# single Master, the container named pytorch) and the restart policies the SDK's models document.
REPLICA_RULES = {"properties": {
    "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
    "template": {"properties": {"spec": {"properties": {"containers": {
        "contains": {"properties": {"name": {"const": "pytorch"}}, "required": ["name"]}}}}}},
}}
PYTORCHJOB_RULES = {"properties": {"spec": {"properties": {"pytorchReplicaSpecs": {
    "propertyNames": {"enum": ["Master", "Worker"]},
    "patternProperties": {"": REPLICA_RULES},
    "properties": {"Master": {"properties": {"replicas": {"const": 1}}}},
}}}}}


def load_manifest() -> dict:
    (job,) = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]
    return job


def _required_attributes(model: type) -> list[str]:
    """The attributes that the model's own client-side validation refuses to leave unset."""
    probe = model.__new__(model)
    probe.local_vars_configuration = Configuration()
    assert probe.local_vars_configuration.client_side_validation
    required = []
    for attribute in model.openapi_types:
        try:
            setattr(probe, attribute, None)
        except ValueError:
            required.append(attribute)
    return required


def _schema_of(openapi_type: str, definitions: dict, kubernetes_uri: str) -> dict:
    """The JSON Schema of one of the SDK's attribute types; its models are added to `definitions`."""
    if match := re.fullmatch(r"list\[(.+)\]", openapi_type):
        return {"type": "array", "items": _schema_of(match[1], definitions, kubernetes_uri)}
    if match := re.fullmatch(r"dict\(str, (.+)\)", openapi_type):
        return {"type": "object", "additionalProperties": _schema_of(match[1], definitions, kubernetes_uri)}
    if openapi_type in PRIMITIVE_TYPES:
        return PRIMITIVE_TYPES[openapi_type]
    if openapi_type in KUBERNETES_TYPES:
        return {"$ref": f"{kubernetes_uri}#/$defs/{KUBERNETES_TYPES[openapi_type]}"}
    model = getattr(kubeflow_models, openapi_type, None)
    assert model is not None and openapi_type.startswith("KubeflowOrgV1"), (
        f"the training SDK refers to {openapi_type}, which this test does not map: add it to KUBERNETES_TYPES")
    if openapi_type not in definitions:
        definitions[openapi_type] = {}  # placeholder: a model may refer to itself
        definitions[openapi_type] = {
            "type": "object",
            "properties": {model.attribute_map[attribute]: _schema_of(type_, definitions, kubernetes_uri)
                           for attribute, type_ in model.openapi_types.items()},
            "required": [model.attribute_map[attribute] for attribute in _required_attributes(model)],
            "additionalProperties": False,
        }
    return {"$ref": f"#/$defs/{openapi_type}"}


@functools.cache
def pytorchjob_validator() -> jsonschema.Draft202012Validator:
    strict = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
              / f"v{KUBERNETES_VERSION}.0-local-strict" / "_definitions.json")
    kubernetes = json.loads(strict.read_text())
    definitions: dict = {}
    job = _schema_of("KubeflowOrgV1PyTorchJob", definitions, kubernetes["$id"])
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "allOf": [job, PYTORCHJOB_RULES],
        "properties": {"apiVersion": {"const": "kubeflow.org/v1"}, "kind": {"const": "PyTorchJob"}},
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "$defs": definitions,
    }
    registry = referencing.Registry().with_resource(kubernetes["$id"], referencing.Resource.from_contents(kubernetes))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def schema_errors(job: dict) -> list[str]:
    """Every place where the manifest breaks the PyTorchJob or Kubernetes schema, as `path: message`."""
    errors = sorted(pytorchjob_validator().iter_errors(job), key=lambda error: list(map(str, error.absolute_path)))

    def message(error: jsonschema.ValidationError) -> str:  # a failed `contains` would print the whole list
        return f"no item matches {error.validator_value}" if error.validator == "contains" else error.message

    return [f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {message(error)}" for error in errors]


def slurm_offline_env() -> dict[str, str]:
    """The *_OFFLINE variables that launch/slurm.sbatch exports: the same must reach the pods."""
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    exported = dict(re.findall(r"\b(\w+_OFFLINE)=(\S+)", " ".join(re.findall(r"^export (.*)$", text, re.M))))
    assert {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} <= set(exported), exported
    return exported


def check_matches_launcher(job: dict) -> None:
    """AssertionError unless every replica's container runs the launcher the way the repository can:
    torchrun options it accepts, the trainer with a config of the repository and overrides that config
    knows, as many nodes as pods, a process per GPU, an HSDP replica per node, no downloads, and a
    termination grace period longer than the launcher's wait for the ranks' checkpoint save."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    nodes = sum(spec.get("replicas", 1) for spec in specs.values())  # the SDK's default: 1
    for replica, spec in specs.items():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert "command" not in container, f"{replica}: no command: the image's entrypoint runs the launcher with args"
        args = container["args"]

        # OnFailure: a preempted pod (exit 143) and one whose rendezvous lost a node (exit 1) restart; the
        # operator's ExitCode policy counts 1 as permanent.
        assert spec.get("restartPolicy") == "OnFailure", (
            f"{replica}: restartPolicy {spec.get('restartPolicy')!r}: use OnFailure so that a preempted pod (exit 143) "
            f"and a lost node (exit 1) restart")
        grace = pod.get("terminationGracePeriodSeconds")
        assert grace is not None, f"{replica}: terminationGracePeriodSeconds is missing (Kubernetes' default is 30 s)"
        assert grace >= launcher.DEFAULT_GRACE_S + EXIT_MARGIN_S, (
            f"{replica}: terminationGracePeriodSeconds {grace} < the launcher's DEFAULT_GRACE_S "
            f"{launcher.DEFAULT_GRACE_S} + {EXIT_MARGIN_S} s")

        # What the entrypoint runs: python -m mpo_dist.launcher ARGS, which adds its defaults for torchrun.
        refusal = io.StringIO()
        try:
            with contextlib.redirect_stderr(refusal):
                torchrun = torchrun_parse_args(launcher._with_defaults(list(args)))
        except SystemExit:
            refused = refusal.getvalue().strip().splitlines()[-1]  # argparse's last line says what it refuses
            raise AssertionError(f"{replica}: torchrun refuses the args: {refused}") from None
        assert torchrun.shutdown_timeout + EXIT_MARGIN_S <= grace, (
            f"{replica}: --shutdown-timeout {torchrun.shutdown_timeout} + {EXIT_MARGIN_S} s > "
            f"terminationGracePeriodSeconds {grace}: Kubernetes would kill the ranks during their save")
        assert torchrun.module and torchrun.training_script == "mpo_dist.train", (
            f"{replica}: the args must run -m mpo_dist.train, not {torchrun.training_script!r}")
        assert torchrun.nnodes == str(nodes), (
            f"{replica}: --nnodes {torchrun.nnodes} != {nodes} pods (Master + Worker replicas)")
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert torchrun.nproc_per_node == str(gpus), (
            f"{replica}: --nproc-per-node {torchrun.nproc_per_node} != nvidia.com/gpu limit {gpus}")

        trainer = trainer_parse_args(torchrun.training_script_args)
        # The entrypoint takes a relative configs/X from the image's copy of the repository too.
        in_repository = (trainer.config or "").removeprefix(f"{IMAGE_HOME}/")
        assert in_repository.startswith("configs/"), (
            f"{replica}: --config {trainer.config} is not one of the image's configs ({IMAGE_HOME}/configs/)")
        config_path = REPO / in_repository
        assert config_path.is_file(), f"{replica}: --config {trainer.config}: the repository has no {config_path}"
        try:
            config = load_config(str(config_path), trainer.overrides)
        except ConfigError as error:
            raise AssertionError(f"{replica}: the trainer refuses the overrides: {error}") from None
        assert config.parallel.dp_replicate == nodes, (
            f"{replica}: parallel.dp_replicate {config.parallel.dp_replicate} != {nodes} nodes (HSDP: one per node)")

        env = {variable["name"]: variable.get("value") for variable in container.get("env", [])}
        for name, value in slurm_offline_env().items():
            assert env.get(name) == value, f"{replica}: env {name}={env.get(name)}, launch/slurm.sbatch exports {value}"


def test_manifest_matches_the_schemas():
    assert schema_errors(load_manifest()) == []


def test_manifest_matches_the_launcher():
    check_matches_launcher(load_manifest())


def _specs(job):
    return job["spec"]["pytorchReplicaSpecs"]


def _pod(job):  # the Worker's template is the Master's (a YAML alias), so this edits both
    return _specs(job)["Master"]["template"]["spec"]


def _container(job):
    return _pod(job)["containers"][0]


def _rename(mapping, old, new):
    mapping[new] = mapping.pop(old)


def _replace_arg(job, flag, value):
    args = _container(job)["args"]
    args[args.index(flag) + 1] = value


def _prepend_args(job, *args):
    _container(job)["args"][:0] = args


def _rename_arg(job, old, new):
    args = _container(job)["args"]
    args[args.index(old)] = new


def _replace_override(job, key, value):
    args = _container(job)["args"]
    (index,) = [i for i, arg in enumerate(args) if arg.startswith(f"{key}=")]
    args[index] = f"{key}={value}"


SCHEMA_MUTATIONS = {
    # name: (mutation, the path of the error, part of its message)
    "replica-misspelt": (lambda job: _rename(_specs(job)["Master"], "replicas", "replica"),
                         "spec.pytorchReplicaSpecs.Master", "'replica' was unexpected"),
    "replicas-not-integer": (lambda job: _specs(job)["Worker"].update(replicas="one"),
                             "spec.pytorchReplicaSpecs.Worker.replicas", "'one' is not of type 'integer'"),
    "replica-specs-missing": (lambda job: job["spec"].pop("pytorchReplicaSpecs"),
                              "spec", "'pytorchReplicaSpecs' is a required property"),
    "run-policy-field-misspelt": (lambda job: _rename(job["spec"]["runPolicy"], "backoffLimit", "backofLimit"),
                                  "spec.runPolicy", "'backofLimit' was unexpected"),
    "replica-type-unknown": (lambda job: _rename(_specs(job), "Worker", "Workers"),
                             "spec.pytorchReplicaSpecs", "'Workers' is not one of"),
    "restart-policy-unknown": (lambda job: _specs(job)["Master"].update(restartPolicy="Onfailure"),
                               "spec.pytorchReplicaSpecs.Master.restartPolicy", "'Onfailure' is not one of"),
    "two-masters": (lambda job: _specs(job)["Master"].update(replicas=2),
                    "spec.pytorchReplicaSpecs.Master.replicas", "1 was expected"),
    "container-not-pytorch": (lambda job: _container(job).update(name="trainer"),
                              "spec.pytorchReplicaSpecs.Master.template.spec.containers",
                              "no item matches {'properties': {'name': {'const': 'pytorch'}}"),
    "kind-wrong": (lambda job: job.update(kind="PytorchJob"), "kind", "'PyTorchJob' was expected"),
    "metadata-field-misspelt": (lambda job: _rename(job["metadata"], "name", "nmae"), "metadata",
                                "'nmae' was unexpected"),
    "grace-misspelt": (lambda job: _rename(_pod(job), "terminationGracePeriodSeconds", "terminationGracePeriod"),
                       "spec.pytorchReplicaSpecs.Master.template.spec", "'terminationGracePeriod' was unexpected"),
    "grace-not-integer": (lambda job: _pod(job).update(terminationGracePeriodSeconds="660"),
                          "spec.pytorchReplicaSpecs.Master.template.spec.terminationGracePeriodSeconds",
                          "is not of type 'integer', 'null'"),
    "containers-missing": (lambda job: _pod(job).pop("containers"),
                           "spec.pytorchReplicaSpecs.Master.template.spec", "'containers' is a required property"),
    "container-name-missing": (lambda job: _container(job).pop("name"),
                               "spec.pytorchReplicaSpecs.Master.template.spec.containers.0",
                               "'name' is a required property"),
    "arg-not-string": (lambda job: _prepend_args(job, "--max-restarts", 3),  # YAML's 3, not "3"
                       "spec.pytorchReplicaSpecs.Master.template.spec.containers.0.args.1",
                       "3 is not of type 'string', 'null'"),
    "env-field-misspelt": (lambda job: _rename(_container(job)["env"][0], "value", "valeu"),
                           "spec.pytorchReplicaSpecs.Worker.template.spec.containers.0.env.0",
                           "'valeu' was unexpected"),
    "volume-mount-field-misspelt": (lambda job: _rename(_container(job)["volumeMounts"][0], "mountPath", "mountpath"),
                                    "spec.pytorchReplicaSpecs.Master.template.spec.containers.0.volumeMounts.0",
                                    "'mountpath' was unexpected"),
}


@pytest.mark.parametrize("name", SCHEMA_MUTATIONS)
def test_schema_refuses(name):
    mutate, path, message = SCHEMA_MUTATIONS[name]
    job = copy.deepcopy(load_manifest())
    mutate(job)
    errors = schema_errors(job)
    assert any(error.startswith(f"{path}: ") and message in error for error in errors), errors


LAUNCHER_MUTATIONS = {
    # name: (mutation, part of the AssertionError's message)
    "grace-missing": (lambda job: _pod(job).pop("terminationGracePeriodSeconds"),
                      "terminationGracePeriodSeconds is missing"),
    "restart-exit-code": (lambda job: _specs(job)["Worker"].update(restartPolicy="ExitCode"),
                          "use OnFailure"),
    "grace-without-margin": (lambda job: _pod(job).update(terminationGracePeriodSeconds=launcher.DEFAULT_GRACE_S),
                             "< the launcher's DEFAULT_GRACE_S"),
    "shutdown-timeout-over-grace": (lambda job: _prepend_args(job, "--shutdown-timeout", "900"),
                                    "--shutdown-timeout 900 + 60 s > terminationGracePeriodSeconds 660"),
    "command-set": (lambda job: _container(job).update(command=["torchrun"]), "no command"),
    "torchrun-option-unknown": (lambda job: _rename_arg(job, "--nproc-per-node", "--nproc-per-nodes"),
                                "unrecognized arguments: --nproc-per-nodes"),
    "other-module": (lambda job: _replace_arg(job, "-m", "mpo_dist.evaluate"), "must run -m mpo_dist.train"),
    "nnodes-not-pods": (lambda job: _replace_arg(job, "--nnodes", "3"), "--nnodes 3 != 2 pods"),
    "worker-replicas-not-nnodes": (lambda job: _specs(job)["Worker"].update(replicas=2), "--nnodes 2 != 3 pods"),
    "nproc-not-gpus": (lambda job: _replace_arg(job, "--nproc-per-node", "4"), "--nproc-per-node 4 != nvidia.com/gpu"),
    "config-missing": (lambda job: _replace_arg(job, "--config", f"{IMAGE_HOME}/configs/llama-9b.yaml"),
                       "the repository has no"),
    "config-outside-image": (lambda job: _replace_arg(job, "--config", "/data/llama-8b.yaml"),
                             "is not one of the image's configs"),
    "override-unknown": (lambda job: _container(job)["args"].append("training.stepz=3"),
                         "the trainer refuses the overrides"),
    "dp-replicate-not-nodes": (lambda job: _replace_override(job, "parallel.dp_replicate", 1),
                               "parallel.dp_replicate 1 != 2 nodes"),
    "offline-env-missing": (lambda job: _container(job).update(
        env=[variable for variable in _container(job)["env"] if variable["name"] != "HF_HUB_OFFLINE"]),
        "env HF_HUB_OFFLINE=None"),
}


@pytest.mark.parametrize("name", LAUNCHER_MUTATIONS)
def test_launcher_check_refuses(name):
    mutate, message = LAUNCHER_MUTATIONS[name]
    job = copy.deepcopy(load_manifest())
    mutate(job)
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_matches_launcher(job)
