"""metrics.backends (trackers.py) for real: a 2-process run logs to TensorBoard, W&B (offline: its
.wandb files read back with wandb's own reader) and MLflow (a real `mlflow server` with a SQLite
store, read back with MlflowClient) exactly what metrics.jsonl holds, eval included; a resume goes on
in the same tracker runs without logging a step twice; a tracking server that goes down mid-run
costs one warning, not the run; unknown backends and missing packages are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from support import QUIET, SUBPROCESS_ENV, TRAIN_CONFIG, free_port, toy_overrides, train

from mpo_dist.config import MetricsConfig, load_config
from mpo_dist.errors import InputError
from mpo_dist.metrics import MetricLogger
from mpo_dist.metrics_file import read_metrics
from mpo_dist.trackers import MLFLOW_HTTP_BOUNDS, Tracking, active_backends


class MlflowServer:
    """`mlflow server` on a free local port with a SQLite store, in its own process group."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        with open(self.log_path, "w") as log:  # the child keeps its own descriptor
            # No job runner (a second process the tests do not need), one worker: it starts in half the time.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                env={**SUBPROCESS_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited ({self.process.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"mlflow server did not answer within {timeout:.0f} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture()
def mlflow_fails_fast(monkeypatch):
    """MLflow's client in this process tries a request once (trackers.py bounds its retries only where
    unset; set here, they are restored after the test)."""
    for name, value in {**MLFLOW_HTTP_BOUNDS, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Started at once and awaited where needed (it takes tens of seconds on a busy machine), stopped
    at the end whatever happens."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()


class Relay:
    """A TCP relay to the tracking server that a test can cut: to its client the server goes down,
    while the real one stays up for other tests."""

    def __init__(self, port: int):
        self.target, self.sockets = port, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # cut
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        for sock in [self.listener, *self.sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    """The config as MLflow parameters: dotted keys, values as str() (an empty mapping stays "{}")."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _wandb_records(files: list[Path]) -> list[list[dict]]:
    """Each .wandb file's records, as wandb's own reader (`wandb leet inspect --json`) prints them."""
    readers = [subprocess.Popen([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                                env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for path in files]
    out = []
    for reader in readers:
        stdout, stderr = reader.communicate(timeout=120)
        assert reader.returncode == 0, stderr
        out.append([json.loads(line) for line in stdout.splitlines()])
    return out


@pytest.mark.e2e
def test_every_backend_logs_what_metrics_jsonl_holds_and_a_resume_goes_on_in_the_same_runs(
        mlflow_server, toy_inputs, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The standard variables: W&B offline (no network, its state in tmp_path), MLflow's server; the
    # W&B project and MLflow experiment come from the config.
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delitem(SUBPROCESS_ENV, name, raising=False)
    monkeypatch.setitem(SUBPROCESS_ENV, "WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setitem(SUBPROCESS_ENV, name, str(tmp_path / name.lower()))
    monkeypatch.setitem(SUBPROCESS_ENV, "MLFLOW_TRACKING_URI", mlflow_server.uri)
    run = tmp_path / "run"
    overrides = toy_overrides(toy_inputs, run, **{
        "metrics.backends": "[tensorboard,jsonl,wandb,mlflow]", "metrics.wandb_project": "mpo-trackers",
        "metrics.mlflow_experiment": "trackers", "checkpoint.interval": 3, "eval.pairs": toy_inputs["pairs"],
        "eval.reference": toy_inputs["reference"], "eval.require_held_out": "false", "eval.interval": 3,
        "eval.max_batches": 1})
    mlflow_server.wait_ready()

    # Interrupted after the step-3 checkpoint, then resumed to step 6 in the same folder.
    first = train(*overrides, "training.steps=3")
    first_config = yaml.safe_load((run / "config.yaml").read_text())
    resumed = train(*overrides, "training.steps=6")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert "resumed from" in resumed.stdout
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all("eval/loss/total" in records[index] for index in (2, 5))  # eval.interval=3 and the last step
    names = sorted({name for record in records for name in record} - {"step"})
    ids = [json.loads((run / "checkpoints" / f"step-0000000{step}" / "checkpoint.json").read_text())["trackers"]
           for step in (3, 6)]
    assert ids[0] == ids[1] and set(ids[0]) == {"wandb", "mlflow"}
    for out in (first.stdout, resumed.stdout):
        assert f"W&B run {ids[0]['wandb']}" in out and f"MLflow run {ids[0]['mlflow']} at {mlflow_server.uri}" in out

    # W&B: two offline runs (one per process) of the same run id, together each step once, equal to metrics.jsonl.
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    history: dict[int, dict] = {}
    for records_of_file, expected_config in zip(_wandb_records(files), (first_config, config)):
        (header,) = [r["run"] for r in records_of_file if r["type"] == "run"]
        assert header["run_id"] == ids[0]["wandb"] and header["project"] == "mpo-trackers"
        assert {k: v for k, v in header["config"]["update"].items() if k != "_wandb"} == expected_config
        for record in (r["history"] for r in records_of_file if r["type"] == "history"):
            step = int(record["step"]["num"])
            assert step not in history, f"W&B step {step} logged twice"
            history[step] = {k: v for k, v in record["item"].items() if not k.startswith("_")}
    assert history == {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in records}

    # MLflow: one run in the experiment, resumed into, its history equal to metrics.jsonl for every name.
    client = MlflowClient(mlflow_server.uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("trackers").experiment_id])
    assert mlflow_run.info.run_id == ids[0]["mlflow"] and mlflow_run.info.status == "FINISHED"
    assert sorted(mlflow_run.data.metrics) == names
    for name in names:
        logged = sorted((point.step, point.value) for point in client.get_metric_history(ids[0]["mlflow"], name))
        assert logged == [(r["step"], float(r[name])) for r in records if name in r], name
    # MLflow keeps a parameter's first value: the first run's config; the resume says what it changed.
    assert mlflow_run.data.params == _flat(first_config)
    assert f"MLflow run {ids[0]['mlflow']} keeps the parameters it started with; this resumed run changed " \
           "training.steps (3 -> 6)" in resumed.stdout

    # TensorBoard: the same names and steps; values as float32.
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == names
    for name in names:
        points = [(e.step, e.value) for e in events.Scalars(name)]
        assert [step for step, _ in points] == [r["step"] for r in records if name in r], name
        assert all(value == pytest.approx(r[name], rel=1e-6, abs=1e-30)
                   for (_, value), r in zip(points, [r for r in records if name in r])), name


@pytest.mark.e2e
def test_a_tracking_server_that_goes_down_mid_run_costs_one_warning_and_metrics_jsonl_keeps_every_step(
        mlflow_server, tmp_path, mlflow_fails_fast):
    from mlflow.tracking import MlflowClient

    mlflow_server.wait_ready()
    relay = Relay(mlflow_server.port)
    lines = []
    settings = MetricsConfig(mlflow_tracking_uri=relay.uri, mlflow_experiment="down")
    tracking = Tracking(["jsonl", "mlflow"], settings, {"optim": {"lr": 1e-6}})  # no ids: a fresh run, a new MLflow run
    logger = MetricLogger(tmp_path, True, total_steps=3, log=lines.append, tracking=tracking)
    logger.write(1, {"loss/total": 0.5})
    run_id = logger.run_ids()["mlflow"]
    relay.cut()
    logger.write(2, {"loss/total": 0.25})
    logger.write(3, {"loss/total": 0.125})
    logger.close(completed=True)
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].startswith("mpo_dist: WARNING: the mlflow tracker failed at step 2 ("), lines
    assert [(r["step"], r["loss/total"]) for r in read_metrics(tmp_path)] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    client = MlflowClient(mlflow_server.uri)
    assert [(p.step, p.value) for p in client.get_metric_history(run_id, "loss/total")] == [(1, 0.5)]
    assert client.get_run(run_id).data.params == {"optim.lr": "1e-06"}


@pytest.mark.e2e
def test_a_resumed_mlflow_run_keeps_the_steps_it_holds_and_a_fresh_run_starts_a_new_one(
        mlflow_server, tmp_path, mlflow_fails_fast):
    """The interrupted run logged steps 1-3 but its checkpoint is of step 1: the resumed run logs 2-4
    again. metrics.jsonl takes the resumed run's values; MLflow's history is append-only, so it keeps
    each step it holds once (the first values) and takes step 4."""
    from mlflow.tracking import MlflowClient

    mlflow_server.wait_ready()
    client = MlflowClient(mlflow_server.uri)
    settings = MetricsConfig(mlflow_tracking_uri=mlflow_server.uri, mlflow_experiment="resumed")

    def logger(start_step: int, resume_ids: dict) -> MetricLogger:
        tracking = Tracking(["jsonl", "mlflow"], settings, {"training": {"steps": 4}}, resume_ids)
        return MetricLogger(tmp_path, True, total_steps=4, start_step=start_step, log=QUIET, tracking=tracking)

    interrupted = logger(0, {})
    for step in (1, 2, 3):
        interrupted.write(step, {"loss/total": float(step)})
    run_id = interrupted.run_ids()["mlflow"]
    interrupted.close(completed=False)
    assert client.get_run(run_id).info.status == "KILLED"
    resumed = logger(1, {"mlflow": run_id})
    for step in (2, 3, 4):
        resumed.write(step, {"loss/total": 10.0 * step})
    resumed.close(completed=True)
    assert resumed.run_ids() == {"mlflow": run_id} and client.get_run(run_id).info.status == "FINISHED"
    assert [(p.step, p.value) for p in client.get_metric_history(run_id, "loss/total")] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    assert [(r["step"], r["loss/total"]) for r in read_metrics(tmp_path)] == [(1, 1), (2, 20), (3, 30), (4, 40)]
    fresh = logger(0, {})  # no checkpoint, no ids: a new MLflow run
    assert fresh.run_ids()["mlflow"] != run_id
    fresh.close(completed=True)


@pytest.mark.unit
def test_unknown_and_repeated_backends_are_one_line_config_errors():
    with pytest.raises(InputError) as error:
        load_config(str(TRAIN_CONFIG), ["metrics.backends=[tensorboard,wandbb]"])
    assert str(error.value) == ("metrics.backends: unknown backend 'wandbb' (did you mean 'wandb'?); the backends are "
                                "tensorboard, jsonl, wandb, mlflow (command line)")
    with pytest.raises(InputError, match=r"^metrics.backends names mlflow twice, got \['mlflow', 'mlflow'\] \(command line\)$"):
        load_config(str(TRAIN_CONFIG), ["metrics.backends=[mlflow,mlflow]"])


@pytest.mark.unit
def test_metrics_tensorboard_false_takes_tensorboard_out_and_jsonl_is_always_written():
    def backends(*overrides):
        metrics = load_config(str(TRAIN_CONFIG), list(overrides)).metrics
        return active_backends(metrics.backends, metrics.tensorboard)

    assert backends() == ["tensorboard", "jsonl"]  # the default, as before metrics.backends
    assert backends("metrics.tensorboard=false") == ["jsonl"]  # an old config's switch
    assert backends("metrics.backends=[mlflow,tensorboard]", "metrics.tensorboard=false") == ["jsonl", "mlflow"]
    assert backends("metrics.backends=[wandb]") == ["jsonl", "wandb"]
    assert backends("metrics.backends=[]") == ["jsonl"]


@pytest.mark.unit
@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_a_backend_whose_package_is_missing_stops_the_run_before_anything_is_written(
        backend, tmp_path, monkeypatch, one_process_group):
    from mpo_dist.trainer import Trainer

    monkeypatch.setitem(sys.modules, backend, None)  # as if not installed: find_spec finds nothing, import fails
    config = load_config(str(TRAIN_CONFIG), [f"job.output_dir={tmp_path / 'run'}", f"metrics.backends=[jsonl,{backend}]"])
    with pytest.raises(InputError) as error:
        Trainer(config)
    assert str(error.value) == (f"metrics.backends names {backend}, but the {backend} package is not installed: "
                                f"pip install 'mpo_dist[{backend}]' (or take {backend} out of metrics.backends)")
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_a_tracking_server_that_does_not_answer_at_the_start_is_a_one_line_error(tmp_path, mlflow_fails_fast):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracking = Tracking(["jsonl", "mlflow"], MetricsConfig(mlflow_tracking_uri=uri))
    with pytest.raises(InputError) as error:
        MetricLogger(tmp_path, True, total_steps=3, log=lambda line: None, tracking=tracking)
    message = str(error.value)
    assert message.startswith("metrics.backends: mlflow could not start its run (") and "\n" not in message
    assert message.endswith("check metrics.mlflow_tracking_uri or MLFLOW_TRACKING_URI, or take mlflow out of "
                            "metrics.backends")
