"""Where rank 0's metrics go: the backends `metrics.backends` names, each a `Tracker` (log a step's
values, the id of its run, close). metrics.MetricLogger hands every tracker the same values at the
same steps; docs/tracking.md is the user's view.

- jsonl: `job.output_dir/metrics.jsonl`, always written, named or not: it is the run's own record,
  which metrics_file.py reads back for the study, the benchmark and the tests.
- tensorboard: events under `job.output_dir/tensorboard`.
- wandb, mlflow: optional extras (`pip install 'mpo_dist[wandb]'`, `'[mlflow]'`), checked before
  anything is built (`check_installed`). The run's resolved config is their parameters. Their run
  ids go into every checkpoint's checkpoint.json (`Trainer.save_checkpoint`), so a run resumed from
  any checkpoint goes on in the same tracker runs; a run started fresh has no ids and starts new ones.

A resumed run starts at its checkpoint's step, and the interrupted run may have logged later steps:
metrics.jsonl drops those records and TensorBoard purges those events, so each step holds the resumed
run's values. W&B and MLflow histories are append-only: steps a tracker run already holds are not
sent again (each step appears once; there it keeps the first attempt's values).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mpo_dist.config import Config, config_to_dict
from mpo_dist.config.sections import METRIC_BACKENDS
from mpo_dist.errors import InputError
from mpo_dist.metrics_file import METRICS_FILE, parse_records

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # wandb.init(dir=job.output_dir) puts its files in job.output_dir/wandb (unless WANDB_DIR is set)
OPTIONAL = ("wandb", "mlflow")  # backend = package = pyproject extra

# MLflow retries a failed request 7 times over minutes by default; rank 0 waits in that call while the
# other ranks wait for it in a collective. Bounded here (unless set in the environment): a server that
# is down costs at most about a minute, once, before the tracker is turned off.
MLFLOW_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def active_backends(backends: Sequence[str], tensorboard: bool = True) -> list[str]:
    """The backends a run writes, in METRIC_BACKENDS' order: `metrics.backends` with jsonl always in
    it, and without tensorboard when the deprecated `metrics.tensorboard` is false."""
    wanted = {*backends, "jsonl"} - (set() if tensorboard else {"tensorboard"})
    return [name for name in METRIC_BACKENDS if name in wanted]


def check_installed(backends: Sequence[str]) -> None:
    """An InputError naming the extra to install when a backend's package is missing."""
    for name in OPTIONAL:
        if name in backends and _missing(name):
            raise InputError(f"metrics.backends names {name}, but the {name} package is not installed: "
                             f"pip install 'mpo_dist[{name}]' (or take {name} out of metrics.backends)")


def _missing(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is None
    except (ImportError, ValueError):
        return True


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as {dotted.key: str(value)}: MLflow's parameters (strings, as mlflow.log_params
    makes them). An empty mapping stays one parameter, "{}"."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


@dataclass
class Tracking:
    """What a run asks of its trackers: the backends (`active_backends`), their settings (the config's
    metrics section: wandb_*, mlflow_*, run_name), the run's config as a nested dict (their parameters)
    and the tracker runs to go on in (checkpoint.json's "trackers", empty for a fresh run)."""

    backends: list[str]
    settings: Any = None
    config: dict = field(default_factory=dict)
    resume_ids: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Config, resume_ids: Mapping[str, str] | None = None) -> "Tracking":
        return cls(active_backends(config.metrics.backends, config.metrics.tensorboard), config.metrics,
                   config_to_dict(config), dict(resume_ids or {}))

    def setting(self, name: str) -> str:
        return getattr(self.settings, name, "") if self.settings is not None else ""


class Tracker:
    """One backend. `required`: a failure stops the run (metrics.jsonl); any other tracker that fails
    is turned off by MetricLogger with one warning, and training goes on."""

    name = ""
    required = False

    def log(self, step: int, values: Mapping[str, float]) -> None:
        raise NotImplementedError

    def run_id(self) -> str | None:
        """The id to resume into (kept in checkpoint.json); None for a file."""
        return None

    def where(self) -> str:
        """Where to look, for the run's last line."""
        return ""

    def close(self, completed: bool) -> None:
        """`completed`: the run reached its last step (else it stopped: failed, or preempted and resumable)."""


class JsonlTracker(Tracker):
    """One JSON object per logged step; a resumed run keeps the records up to its step (a line cut
    by a crash is dropped) and rewrites the file from there."""

    name = "jsonl"
    required = True

    def __init__(self, output_dir: Path, start_step: int):
        self.path = Path(output_dir) / METRICS_FILE
        kept = []
        if start_step and self.path.is_file():
            kept = [json.dumps(record) for record in parse_records(self.path.read_text()) if record["step"] <= start_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")
        self.handle.writelines(line + "\n" for line in kept)
        self.handle.flush()

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.handle.write(json.dumps({"step": step, **values}) + "\n")
        self.handle.flush()

    def where(self) -> str:
        return f"metrics in {self.path}"

    def close(self, completed: bool) -> None:
        self.handle.close()


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, output_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(output_dir) / TENSORBOARD_DIR
        # purge_step: events after the resumed step, left by the interrupted run, are dropped.
        self.writer = SummaryWriter(str(self.dir), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def where(self) -> str:
        return f"TensorBoard logs in {self.dir} (tensorboard --logdir {self.dir})"

    def close(self, completed: bool) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run: metrics.wandb_* or the WANDB_* variables; files in job.output_dir/wandb unless
    WANDB_DIR says otherwise. A resumed run passes its id with resume="allow"."""

    name = "wandb"

    def __init__(self, output_dir: Path, tracking: Tracking, run_name: str):
        import wandb

        resume_id = tracking.resume_ids.get(self.name)
        self.run = wandb.init(project=tracking.setting("wandb_project") or None,
                              entity=tracking.setting("wandb_entity") or None,
                              mode=tracking.setting("wandb_mode") or None,
                              dir=None if os.environ.get("WANDB_DIR") else str(output_dir),
                              name=run_name, id=resume_id, resume="allow" if resume_id else None,
                              config=tracking.config, allow_val_change=True)  # a resume may change options
        # Online, a resumed run starts after the server's last step; offline W&B knows none (0).
        self.first_new_step = self.run.starting_step

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if step >= self.first_new_step:
            self.run.log(dict(values), step=step)

    def run_id(self) -> str:
        return self.run.id

    def where(self) -> str:
        # run.dir is the run's files/ folder; `wandb sync` takes the run's folder above it.
        return f"W&B run {self.run.id} ({f'wandb sync {Path(self.run.dir).parent}' if self.run.offline else self.run.url})"

    def close(self, completed: bool) -> None:
        self.run.finish(exit_code=0 if completed else 1)


class MlflowTracker(Tracker):
    """An MLflow run through MlflowClient: metrics.mlflow_* or MLFLOW_TRACKING_URI and
    MLFLOW_EXPERIMENT_NAME. The config goes in as parameters once; MLflow keeps a parameter's first
    value, so a resume that changes options says which in one line (the new values are in the run's
    config.yaml)."""

    name = "mlflow"

    def __init__(self, output_dir: Path, tracking: Tracking, run_name: str, log: Callable[[str], None]):
        for variable, value in MLFLOW_HTTP_BOUNDS.items():
            os.environ.setdefault(variable, value)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking.setting("mlflow_tracking_uri") or None)
        self.uri = self.client.tracking_uri
        params = flat_config(tracking.config)
        resume_id = tracking.resume_ids.get(self.name)
        existing = self._existing_run(resume_id, log) if resume_id else None
        self.first_new_step = 0
        if existing is None:
            experiment = tracking.setting("mlflow_experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
            run = self.client.create_run(self._experiment_id(experiment), run_name=run_name,
                                         tags={"mpo_dist.output_dir": str(output_dir)})
            self.mlflow_run_id = run.info.run_id
            held = {}
        else:
            self.mlflow_run_id = existing.info.run_id
            held = existing.data.params
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
            self.first_new_step = 1 + max((point.step for key in existing.data.metrics
                                           for point in self.client.get_metric_history(self.mlflow_run_id, key)), default=0)
            changed = sorted(key for key in params if key in held and held[key] != params[key])
            if changed:
                log(f"mpo_dist: MLflow run {self.mlflow_run_id} keeps the parameters it started with; this resumed run "
                    f"changed {', '.join(f'{key} ({held[key]} -> {params[key]})' for key in changed[:8])}"
                    f"{' and more' if len(changed) > 8 else ''} (its config.yaml has the new values)")
        new = [(key, value) for key, value in params.items() if key not in held]
        self._log_params(new)

    def _existing_run(self, run_id: str, log: Callable[[str], None]):
        """The run to resume into, or None (with a line saying why) when this tracking store lacks it."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            if getattr(error, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            log(f"mpo_dist: the checkpoint's MLflow run {run_id} is not in {self.uri} (or was deleted); "
                "starting a new MLflow run")
            return None
        return run

    def _experiment_id(self, name: str) -> str:
        if not name:
            return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"  # MLflow's Default experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(name)

    def _log_params(self, params: list[tuple[str, str]]) -> None:
        from mlflow.entities import Param

        for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.mlflow_run_id, params=[Param(key, value) for key, value in params[start:start + 100]])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        if step < self.first_new_step:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.mlflow_run_id, metrics=[Metric(key, float(value), now, step) for key, value in values.items()])

    def run_id(self) -> str:
        return self.mlflow_run_id

    def where(self) -> str:
        return f"MLflow run {self.mlflow_run_id} at {self.uri}"

    def close(self, completed: bool) -> None:
        self.client.set_terminated(self.mlflow_run_id, status="FINISHED" if completed else "KILLED")


def open_trackers(output_dir: Path, tracking: Tracking, start_step: int,
                  log: Callable[[str], None] = print) -> list[Tracker]:
    """The trackers of `tracking.backends`, opened in METRIC_BACKENDS' order. One that cannot start (a
    tracking server that does not answer, W&B without a login) is an InputError naming it; the ones
    already opened are closed first."""
    check_installed(tracking.backends)
    run_name = tracking.setting("run_name") or Path(output_dir).resolve().name
    opened: list[Tracker] = []
    try:
        for name in tracking.backends:
            try:
                if name == "jsonl":
                    opened.append(JsonlTracker(output_dir, start_step))
                elif name == "tensorboard":
                    opened.append(TensorBoardTracker(output_dir, start_step))
                elif name == "wandb":
                    opened.append(WandbTracker(output_dir, tracking, run_name))
                elif name == "mlflow":
                    opened.append(MlflowTracker(output_dir, tracking, run_name, log))
            except Exception as error:
                if name in ("jsonl", "tensorboard"):
                    raise  # a local file: the error says it all
                hint = ("metrics.wandb_project / wandb_entity / wandb_mode or WANDB_*" if name == "wandb"
                        else "metrics.mlflow_tracking_uri or MLFLOW_TRACKING_URI")
                raise InputError(f"metrics.backends: {name} could not start its run ({one_line(error)}); check "
                                 f"{hint}, or take {name} out of metrics.backends") from error
    except BaseException:
        for tracker in opened:
            tracker.close(completed=False)
        raise
    return opened


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."
