"""The reward/KL frontier study in one command: data, training runs on several seeds, on-policy evaluation along them, tables, plots.

    python tools/study_frontier.py --out OUTPUT_DIR [--size default|tiny] [--seeds N] [--methods dpo,ipo,...]
        [--jobs 1] [--nproc 1] [--background] [--model DIR (default: the stories260K model beside this checkout)]

(launch/study_frontier.sh OUTPUT_DIR ... runs it.) Every step is one of the project's tools, printed
before it runs, with its output in OUTPUT_DIR/logs/:

1. data (OUTPUT_DIR/data): story-opening prompts (tools/make_story_prompts.py) and their pairs
   shards; then per seed k, 2P reference samples per prompt (tools/sample_reference.py), and per seed
   and data variant (hard labels, soft labels, varied lengths: the variants the chosen methods use,
   and hard always) P pairs per prompt labelled by Bradley-Terry on the true reward
   mpo_dist.study.story_reward (tools/label_story_pairs.py) -> pairs shards split by prompt into
   train and held-out (prepare_pairs --eval-fraction) -> reference log-probs of both
   (tools/score_reference.py) -> D_ref: one reference sample per training pair where a run has MPO's
   tau term, and two per held-out pair (the trainer's KL monitor eval/kl_ref_policy, which no loss
   sees). Every random stream differs between seeds (`seed_streams`);
2. the reference model evaluated on-policy on each seed's held-out prompts (the baseline, KL 0);
3. for each method, beta (and tau) and seed (mpo_dist/study/frontier.py: METHODS): training under
   torchrun (`python -m mpo_dist.launcher --standalone --nproc-per-node N -m mpo_dist.train --config
   configs/study_frontier.yaml ...`) into OUTPUT_DIR/runs/RUN, with a checkpoint every
   `checkpoint_interval` steps; then one tools/evaluate.py process over the checkpoints it is evaluated
   at (every `eval_steps` for a trajectory run, the last for the others): K samples per held-out pair
   record, `on_policy/reward` (--reward mpo_dist.study.story_reward:reward) and
   `on_policy/kl_policy_ref` with standard errors clustered by prompt, into OUTPUT_DIR/evals/RUN/;
4. OUTPUT_DIR/runs.csv (every evaluation), results.csv (per configuration and step: mean over seeds,
   95% interval, spread), results.json (both, the changes along the trajectories, the settings, seeds
   and data reports), tables.md, frontier.png and trajectories.png; timings.json holds every step's
   wall-clock and CPU seconds.

--jobs N runs up to N steps at once where none needs another's output: the seeds' samples, the
seeds' data variants, then the evaluations and the runs (each its training, then its evaluation).
Each run on one process (--nproc 1, the default) and --jobs 2 keeps two cores busy: the model is
so small that a second process per run adds little speed.

Resumable: a step whose output is complete is skipped (data sets with their manifest, a run with
its final checkpoint, an evaluation with its report); an unfinished run resumes from its newest
checkpoint (the trainer's checkpoint.resume=auto), and a run whose settings changed is trained again.
Another size or model in the same OUTPUT_DIR is refused, and so is a second study process on the
same folder (OUTPUT_DIR/study.lock). --background runs the same command detached, its output in
OUTPUT_DIR/study.log. Every process uses one CPU thread: on a busy 2-core machine, sampling with two
threads in one process was 30x slower than with one (OpenMP threads spinning against other work).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the checkout's mpo_dist
    sys.path.insert(0, str(REPO))

from mpo_dist.cli import tool_parser  # noqa: E402
from mpo_dist.data.shards import atomic_write_bytes  # noqa: E402
from mpo_dist.errors import INPUT_ERROR_EXIT_CODE  # noqa: E402
from mpo_dist.launcher import train_command  # noqa: E402
from mpo_dist.metrics_file import read_metrics  # noqa: E402
from mpo_dist.study.frontier import (  # noqa: E402
    DEFAULT, METHODS, TINY, TINY_METHODS, Run, StudySize, aggregate, plan_runs, plot_frontier, plot_trajectories,
    reference_step_row, run_step_row, seed_streams, tables_markdown, write_study_results,
)

DEFAULT_MODEL = REPO.parent / "shared" / "data" / "stories260K"
CONFIG = REPO / "configs" / "study_frontier.yaml"
REWARD = "mpo_dist.study.story_reward:reward"
MAX_PROMPT_TOKENS = 32
SAMPLES_PER_SHARD = 200


def write_json(path: Path, value) -> None:
    """Atomically: a kill never leaves a file a restart cannot read."""
    atomic_write_bytes(path, (json.dumps(value, indent=1) + "\n").encode())


@contextlib.contextmanager
def study_lock(out: Path):
    """One study process per folder: a second one (a restart while the first still runs) is refused."""
    handle = open(out / "study.lock", "w")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"{out} is being run by another study process (study.lock is held); wait for it, "
                             "or stop it first", INPUT_ERROR_EXIT_CODE) from None
        yield
    finally:
        handle.close()


class StudyError(Exception):
    """A step failed (the message ends with its log's last lines), or the output folder holds another
    study; `code` is the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Study:
    def __init__(self, out: Path, size: StudySize, runs: list[Run], model: Path, nproc: int, jobs: int = 1):
        self.out, self.size, self.runs, self.model, self.nproc, self.jobs = out, size, runs, model, nproc, jobs
        self.data, self.logs = out / "data", out / "logs"
        self.start = time.monotonic()
        self.running: set[subprocess.Popen] = set()  # the steps' processes now running (stop() signals them)
        self.stopping = threading.Event()
        self.seeds = range(size.seeds)
        self.variants = sorted({"hard"} | {run.method.data for run in runs})  # hard: every seed's on-policy prompts
        self.lock = threading.RLock()  # steps run in threads with --jobs: their lines, the running set, timings.json
        self.env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(name, None)  # never join an enclosing launch's process group

    # ------------------------------------------------------------------------------ helpers

    def say(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.start)
        with self.lock:
            print(f"[study {elapsed // 60:3d}m{elapsed % 60:02d}s] {message}", flush=True)

    def tool(self, name: str, *args) -> list[str]:
        return [sys.executable, str(REPO / "tools" / name), *map(str, args)]

    def step(self, key: str, command: list[str], done: list[Path]) -> float:
        """Run `command` unless every path in `done` exists; its output goes to logs/KEY.log.
        Returns the seconds it took (0 when skipped); its CPU seconds (its processes' and their
        children's, user + system) go to timings.json beside them."""
        if all(path.exists() for path in done):
            self.say(f"{key}: done before, skipped")
            return 0.0
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{key}.log"
        shown = " ".join(os.path.relpath(part, REPO) if part.startswith("/") and part.startswith(str(REPO)) else part
                         for part in command[1:])
        self.say(f"{key}: {shown}")
        if self.stopping.is_set():
            raise StudyError(f"{key}: not started, the study is stopping", 1)
        start, usage, returncode = time.monotonic(), None, None
        try:
            with open(log, "w") as handle:
                process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
                with self.lock:
                    self.running.add(process)
                try:
                    # wait4, not wait: the rusage of the process and of the children it waited for (torchrun's workers)
                    _, status, usage = os.wait4(process.pid, 0)
                finally:
                    with self.lock:
                        self.running.discard(process)
                returncode = process.returncode = os.waitstatus_to_exitcode(status)
        finally:  # a failed or stopped attempt's time counts too: it was spent
            seconds = time.monotonic() - start
            self.add_timing(key, seconds, usage.ru_utime + usage.ru_stime if usage else 0.0)
        if returncode != 0 or not all(path.exists() for path in done):
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise StudyError(f"{key} failed (exit code {returncode}) after {seconds:.0f}s; last lines of {log}:\n{tail}",
                             returncode or 1)
        self.say(f"{key}: done in {seconds:.0f}s")
        return seconds

    def add_timing(self, key: str, wall: float, cpu: float) -> None:
        """Add a step's wall-clock and CPU seconds to timings.json ({"wall": {step: s}, "cpu": {step: s}}),
        where earlier attempts (a run stopped and resumed) are already counted."""
        with self.lock:
            timings = self.recorded_timings()
            for clock, value in (("wall", wall), ("cpu", cpu)):
                timings[clock][key] = timings[clock].get(key, 0.0) + value
            write_json(self.out / "timings.json", timings)

    def stop(self, signum: int, frame) -> None:
        """SIGTERM, SIGINT, SIGHUP: start nothing more, and pass the signal to the running steps (a
        training run saves its step in progress); the study exits once they have ended, so a rerun
        never meets a step still writing."""
        self.say(f"signal {signal.Signals(signum).name}: stopping the running steps (they save what they can); "
                 "the same command resumes")
        self.stopping.set()
        with self.lock:
            running = list(self.running)
        for process in running:
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def at_once(self, tasks: list[Callable[[], object]]) -> None:
        """Run `tasks`, up to `jobs` at a time (one job: one after the other, in order). After a failure
        no further task starts; the first failure is raised once the running ones have ended."""
        failed = threading.Event()

        def guarded(task: Callable[[], object]) -> None:
            if failed.is_set():
                return
            try:
                task()
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(guarded, task) for task in tasks]
        for future in futures:
            if future.exception() is not None:
                raise future.exception()

    # ------------------------------------------------------------------------------ stages

    def check_folder(self) -> None:
        """Refuse to mix two studies of another size or model in one folder; record this one."""
        record = self.out / "study.json"
        mine = json.loads(json.dumps({"size": asdict(self.size), "model": str(self.model.resolve())}))
        if record.is_file():
            theirs = json.loads(record.read_text())
            if theirs != mine:
                different = sorted(k for k in set(theirs["size"]) | set(mine["size"])
                                   if theirs["size"].get(k) != mine["size"].get(k))
                what = ", ".join(different) or "model"
                raise StudyError(f"{self.out} holds a study with other settings ({what}); give another output folder "
                                 "or remove it", INPUT_ERROR_EXIT_CODE)
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(record, mine)

    def variant_dir(self, seed: int, variant: str) -> Path:
        return self.data / f"s{seed}" / variant

    def prepare_args(self) -> list:
        max_length = MAX_PROMPT_TOKENS + 2 * self.size.max_new_tokens  # room for re-tokenized responses
        return ["--tokenizer", self.model, "--no-eos", "--max-length", max_length, "--max-prompt-length",
                MAX_PROMPT_TOKENS, "--samples-per-shard", SAMPLES_PER_SHARD, "--threads", 1]

    def make_prompts(self) -> None:
        """The story openings and their prompt shards, shared by every seed."""
        d = self.data
        self.step("prompts", self.tool("make_story_prompts.py", "--out", d / "prompts.jsonl",
                                       "--num-prompts", self.size.num_prompts), [d / "prompts.jsonl"])
        self.step("prepare_prompts", self.tool("prepare_pairs.py", "--input", d / "prompts.jsonl", "--out",
                                               d / "prompts", *self.prepare_args()), [d / "prompts" / "manifest.json"])

    def sample_pairs(self, seed: int) -> float:
        """Seed `seed`'s reference samples of every prompt: the pairs of all its data variants are made of them."""
        out = self.data / f"s{seed}" / "samples"
        return self.step(f"sample_pairs_s{seed}", self.tool(
            "sample_reference.py", "--pairs", self.data / "prompts", "--out", out, "--num-samples",
            2 * self.size.pairs_per_prompt, "--seed", seed_streams(seed)["samples"], *self.sampling()),
            [out / "manifest.json"])

    def make_variant(self, seed: int, variant: str) -> None:
        """One seed's pairs of one variant, labelled, split into train and held-out, with the reference's
        log-probs and D_ref samples of both splits."""
        d, m, seeds, key = self.variant_dir(seed, variant), self.model, seed_streams(seed), f"s{seed}_{variant}"
        labels = ["--labels", "soft"] if variant == "soft" else ["--labels", "sampled"]
        lengths = ["--lengths", "varied"] if variant == "varied" else []
        self.step(f"label_{key}", self.tool("label_story_pairs.py", "--pairs", self.data / "prompts", "--samples",
                                            self.data / f"s{seed}" / "samples", "--tokenizer", m, *labels, *lengths,
                                            "--seed", seeds["labels"], "--report", d / "pairs_report.json",
                                            "--out", d / "pairs.jsonl"), [d / "pairs.jsonl", d / "pairs_report.json"])
        self.step(f"prepare_{key}", self.tool("prepare_pairs.py", "--input", d / "pairs.jsonl", "--out", d / "pairs",
                                              "--eval-fraction", self.size.eval_fraction, *self.prepare_args()),
                  [d / "pairs" / side / "manifest.json" for side in ("train", "eval")])
        for split in ("train", "eval"):
            self.step(f"score_{key}_{split}", self.tool(
                "score_reference.py", "--model", m, "--pairs", d / "pairs" / split, "--out", d / "reference" / split,
                "--dtype", "float32", "--batch-size", 64, "--threads", 1), [d / "reference" / split / "manifest.json"])
        # D_ref: one reference sample per training pair (MPO's tau term; only where a run has one), two per
        # held-out pair (the KL monitor)
        tau_term = any(run.uses_dref and run.method.data == variant for run in self.runs)
        for split, count, stream in (("train", 1, "dref"), ("eval", 2, "dref_eval"))[0 if tau_term else 1:]:
            self.step(f"dref_{key}_{split}", self.tool(
                "sample_reference.py", "--pairs", d / "pairs" / split, "--out", d / "dref" / split, "--num-samples",
                count, "--seed", seeds[stream], *self.sampling()), [d / "dref" / split / "manifest.json"])

    def sampling(self) -> list:
        # float32 throughout, as configs/study_frontier.yaml trains: the figures do not depend on the CPU.
        return ["--model", self.model, "--max-new-tokens", self.size.max_new_tokens, "--batch-size", 64,
                "--dtype", "float32", "--threads", 1]

    def eval_report(self, name: str, step: int) -> Path:
        return self.out / "evals" / name / f"step-{step:08d}.json"

    def evaluate(self, key: str, seed: int, models: list[Path], reports: list[Path]) -> float:
        """tools/evaluate.py on-policy on seed `seed`'s held-out prompts, every model of `models` whose
        report is missing, in one process."""
        todo = [(model, report) for model, report in zip(models, reports) if not report.exists()]
        pairs = self.variant_dir(seed, "hard") / "pairs" / "eval"
        command = self.tool("evaluate.py", *[arg for model, report in todo for arg in ("--model", model, "--out", report)],
                            "--pairs", pairs, "--on-policy-samples", self.size.on_policy_samples, "--max-new-tokens",
                            self.size.max_new_tokens, "--seed", seed_streams(seed)["on_policy"], "--reference-model",
                            self.model, "--reward", REWARD, "--batch-size", 64, "--dtype", "float32", "--threads", 1,
                            "--no-progress")
        return self.step(key, command, reports)

    def checkpoint(self, run: Run, step: int) -> Path:
        return self.out / "runs" / run.name / "checkpoints" / f"step-{step:08d}"

    def train(self, run: Run, index: int) -> float:
        folder = self.out / "runs" / run.name
        final = self.checkpoint(run, self.size.run_steps(run.method))
        settings = folder / "study_run.json"
        mine = self.run_settings(run)
        if folder.exists() and not (settings.is_file() and json.loads(settings.read_text()) == mine):
            self.say(f"{run.name}: made with other settings: trained again")
            shutil.rmtree(folder)
        if not (final / "checkpoint.json").is_file():  # it trains now: evaluations of an earlier policy are stale
            shutil.rmtree(self.out / "evals" / run.name, ignore_errors=True)
        # an unfinished run with these settings resumes from its newest checkpoint (checkpoint.resume=auto)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(settings, mine)
        self.say(f"run {index}/{len(self.runs)}: {run.name}")
        return self.step(f"train_{run.name}", train_command(CONFIG, mine["overrides"], self.nproc),
                         [final / "checkpoint.json"])

    def train_and_evaluate(self, run: Run, index: int) -> None:
        self.train(run, index)
        steps = self.size.evaluated_steps(run.method)
        self.evaluate(f"eval_{run.name}", run.seed, [self.checkpoint(run, step) for step in steps],
                      [self.eval_report(run.name, step) for step in steps])

    def run_settings(self, run: Run) -> dict:
        size, d = self.size, self.variant_dir(run.seed, run.method.data)
        steps, interval = size.run_steps(run.method), size.checkpoint_interval()
        per_rank = size.batch_size // self.nproc
        overrides = [
            f"job.output_dir={self.out / 'runs' / run.name}", f"job.seed={run.seed}", f"model.path={self.model}",
            f"data.pairs={d / 'pairs' / 'train'}", f"data.reference={d / 'reference' / 'train'}",
            f"data.dref={d / 'dref' / 'train' if run.uses_dref else ''}",
            f"data.batch_size={per_rank}", f"data.dref_batch_size={per_rank}",
            f"eval.pairs={d / 'pairs' / 'eval'}", f"eval.reference={d / 'reference' / 'eval'}",
            f"eval.dref={d / 'dref' / 'eval'}", f"eval.interval={size.monitor_interval}",
            f"training.steps={steps}", f"training.global_batch_size={size.batch_size}", f"optim.lr={size.lr:g}",
            f"optim.warmup_steps={min(10, max(size.short_steps // 10, 1))}",
            f"checkpoint.interval={interval}", f"checkpoint.keep={steps // interval + 1}",
            *run.overrides(),
        ]
        return {"overrides": overrides}

    def collect(self) -> list[dict]:
        """Every evaluation as a row, the seeds of each configuration aggregated, the tables and the plots."""
        timings = self.recorded_timings()
        rows = [reference_step_row(json.loads(self.eval_report(f"reference-s{seed}", 0).read_text()), seed)
                for seed in self.seeds]
        for run in self.runs:
            records = read_metrics(self.out / "runs" / run.name)
            for step in self.size.evaluated_steps(run.method):
                report = json.loads(self.eval_report(run.name, step).read_text())
                rows.append(run_step_row(run, step, report, records))
        summary = aggregate(rows)
        data_reports = {f"s{seed}/{variant}": json.loads((self.variant_dir(seed, variant) / "pairs_report.json").read_text())
                        for seed in self.seeds for variant in self.variants}
        extra = {
            "size": asdict(self.size),
            "plan": {run.name: run.overrides() for run in self.runs},
            "model": str(self.model.resolve()),
            "reward": REWARD,
            "seed_streams": {seed: seed_streams(seed) for seed in self.seeds},
            "data": data_reports,
            "timings": timings,
        }
        paths = write_study_results(self.out, rows, summary, extra)
        plot_frontier(summary, self.out / "frontier.png", self.size)
        plot_trajectories(summary, self.out / "trajectories.png", self.size)
        atomic_write_bytes(self.out / "tables.md", tables_markdown(rows, summary, self.size, timings).encode())
        self.say(f"results: {', '.join(str(p) for p in paths)}, frontier.png, trajectories.png, tables.md")
        return summary

    def recorded_timings(self) -> dict[str, dict[str, float]]:
        """Wall-clock and CPU seconds of every step run so far, by this invocation and earlier ones:
        {"wall": {step: s}, "cpu": {step: s}}."""
        path = self.out / "timings.json"
        return json.loads(path.read_text()) if path.is_file() else {"wall": {}, "cpu": {}}

    def run(self) -> list[dict]:
        self.check_folder()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.stop)
        with study_lock(self.out):
            self.say(f"study in {self.out}: {len(self.runs)} runs ({len(self.runs) // max(self.size.seeds, 1)} "
                     f"configurations x {self.size.seeds} seeds), {self.nproc} processes per run, {self.jobs} at a time")
            self.make_prompts()
            self.at_once([lambda seed=seed: self.sample_pairs(seed) for seed in self.seeds])
            self.at_once([lambda seed=seed, variant=variant: self.make_variant(seed, variant)
                          for seed in self.seeds for variant in self.variants])
            references = [lambda seed=seed: self.evaluate(f"eval_reference_s{seed}", seed, [self.model],
                                                          [self.eval_report(f"reference-s{seed}", 0)])
                          for seed in self.seeds]
            self.at_once([*references, *(lambda run=run, index=index: self.train_and_evaluate(run, index)
                                         for index, run in enumerate(self.runs, 1))])
            rows = self.collect()
        print((self.out / "tables.md").read_text())
        self.say("done")
        return rows


SIZES = {"tiny": TINY, "default": DEFAULT}


def selected_methods(methods: str, size_name: str) -> list[str]:
    """The names given to --methods, else the size's own: TINY_METHODS for tiny (whatever --seeds says), all else."""
    return [name for name in methods.split(",") if name] or (
        list(TINY_METHODS) if size_name == "tiny" else [m.name for m in METHODS])


def in_background(argv: list[str], out: Path, model: Path) -> int:
    """This command again without --background, detached (its own session: it outlives the terminal), its
    output in OUT/study.log. A rerun of the same command resumes it."""
    out.mkdir(parents=True, exist_ok=True)
    with study_lock(out):  # refused here, not only in the log, while another study runs on the folder
        pass
    log = out / "study.log"
    # the folders resolved here: the study runs from the repository, not from the caller's folder
    argv = [arg for arg in argv if arg != "--background"] + ["--out", str(out), "--model", str(model)]
    with open(log, "a") as handle:
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdin=subprocess.DEVNULL,
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    print(f"study_frontier: running in the background (process {process.pid}); follow it with: tail -f {log}\n"
          f"  stop it with: kill {process.pid}   (its runs save their step; the same command again resumes it)")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = tool_parser(__doc__)
    parser.allow_abbrev = False  # --background is taken out of the detached command by its exact name
    parser.add_argument("--out", required=True, help="output folder (created; a rerun resumes it)")
    parser.add_argument("--size", default="default", choices=sorted(SIZES),
                        help="default: the documented study; tiny: the CI size, the pipeline end to end in minutes")
    parser.add_argument("--tiny", action="store_true", help="the same as --size tiny")
    parser.add_argument("--seeds", type=int, default=0, help="seeds per configuration (default: the size's, 3 at default)")
    parser.add_argument("--methods", default="",
                        help="comma-separated subset of the methods (default: all; with --size tiny, "
                             f"{','.join(TINY_METHODS)})")
    parser.add_argument("--nproc", type=int, default=1, help="training processes per run (torchrun)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="steps run at once where none needs another's output: data of the seeds and "
                             "variants, then the evaluations and the runs")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the reference model (a Hugging Face folder)")
    parser.add_argument("--background", action="store_true",
                        help="run detached, output in OUT/study.log (the command prints how to follow and stop it)")
    args = parser.parse_args(argv)
    size_name = "tiny" if args.tiny else args.size
    size = SIZES[size_name]
    if args.seeds < 0:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.seeds:
        size = replace(size, seeds=args.seeds)
    known = {m.name: m for m in METHODS}
    wanted = selected_methods(args.methods, size_name)
    unknown = [name for name in wanted if name not in known]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.nproc < 1 or size.batch_size % args.nproc:
        parser.error(f"--nproc must divide the {size.batch_size} pairs of a step, got {args.nproc}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    model = Path(args.model)
    if not (model / "config.json").is_file():
        parser.error(f"--model {model}: not a Hugging Face model folder (no config.json)")
    if importlib.util.find_spec("matplotlib") is None:  # the plots come last: fail before the sweep, not after it
        print("study_frontier: error: the plots need matplotlib: pip install -e '.[study]'", file=sys.stderr)
        return INPUT_ERROR_EXIT_CODE
    out = Path(args.out).resolve()
    runs = plan_runs(size, tuple(known[name] for name in wanted))
    study = Study(out, size, runs, model.resolve(), args.nproc, args.jobs)
    try:
        if args.background:
            return in_background(argv, out, model.resolve())
        study.run()
    except StudyError as error:
        if study.stopping.is_set():
            print("study_frontier: stopped; the same command resumes it", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"study_frontier: error: {error}", file=sys.stderr)
        return error.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
