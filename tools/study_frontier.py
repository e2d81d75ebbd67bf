"""The reward/KL frontier study in one command: data, a sweep of training runs, on-policy evaluation, table, plots.

    python tools/study_frontier.py --out OUTPUT_DIR [--tiny] [--methods dpo,ipo,...] [--nproc 2] [--jobs 1]
        [--model DIR (default: the stories260K model beside this checkout)]

(launch/study_frontier.sh OUTPUT_DIR [--tiny] runs it.) Every step is one of the project's tools,
printed before it runs, with its output in OUTPUT_DIR/logs/:

1. data (OUTPUT_DIR/data): story-opening prompts (tools/make_story_prompts.py) -> their pairs
   shards (tools/prepare_pairs.py) -> 2P reference samples per prompt (tools/sample_reference.py)
   -> P pairs per prompt labelled by Bradley-Terry on the true reward mpo_dist.study.story_reward
   (tools/label_story_pairs.py) -> pairs shards split by prompt into train and held-out
   (prepare_pairs --eval-fraction) -> reference log-probs of both (tools/score_reference.py) ->
   D_ref: one reference sample per training pair (MPO's tau term) and two per held-out pair (the
   trainer's KL monitor eval/kl_ref_policy, which no loss sees);
2. the reference model evaluated on-policy on the held-out prompts (the baseline, KL 0);
3. for each method and beta (mpo_dist/study/frontier.py: METHODS): training under torchrun
   (`python -m mpo_dist.launcher --standalone --nproc-per-node N -m mpo_dist.train --config
   configs/study_frontier.yaml ...`) into OUTPUT_DIR/runs/RUN, then tools/evaluate.py on its final
   checkpoint: K samples per held-out pair record, `on_policy/reward` (--reward
   mpo_dist.study.story_reward:reward) and `on_policy/kl_policy_ref`, with standard errors, into
   OUTPUT_DIR/evals/RUN.json;
4. OUTPUT_DIR/results.csv and results.json (a row per run and the reference), frontier.png (reward
   against KL, one curve per method) and kl_steps.png (the held-out KL monitor against the step).

--jobs N runs up to N steps at once where none needs another's output: the reference's log-probs
and D_ref samples of both splits, then the reference's evaluation and the runs (each its training,
then its evaluation). The tiny study's steps are mostly process start-up, which keeps one core busy
while the other waits, so CI runs it with --jobs 2 --nproc 1 (two runs at once, each on one core);
the table's seconds then include the CPU that the steps beside them took.

Restartable: a step whose output is complete is skipped (data sets with their manifest, a run with
its final checkpoint, an evaluation with its report), so a crash costs at most the step it hit; a
run whose settings changed is trained again. Another size or model in the same OUTPUT_DIR is
refused. Every process uses one CPU thread: on a busy 2-core machine, sampling with two threads in
one process was 30x slower than with one (7,379 against 229 tokens/s: OpenMP threads spinning
against other work).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the checkout's mpo_dist
    sys.path.insert(0, str(REPO))

from mpo_dist.cli import tool_parser  # noqa: E402
from mpo_dist.errors import INPUT_ERROR_EXIT_CODE  # noqa: E402
from mpo_dist.launcher import train_command  # noqa: E402
from mpo_dist.metrics_file import read_metrics  # noqa: E402
from mpo_dist.study.frontier import (  # noqa: E402
    DEFAULT, METHODS, TINY, Run, StudySize, describe_plan, kl_curve, plan_runs, plot_frontier, plot_kl_steps,
    reference_row, run_row, write_results,
)

DEFAULT_MODEL = REPO.parent / "shared" / "data" / "stories260K"
CONFIG = REPO / "configs" / "study_frontier.yaml"
REWARD = "mpo_dist.study.story_reward:reward"
# Seeds of the independent random streams: labels, the pairs' samples, D_ref, held-out D_ref, on-policy
# evaluation (the same for every model evaluated: their samples share random numbers).
SEEDS = {"labels": 0, "pairs": 1, "dref": 2, "dref_eval": 3, "on_policy": 4}
MAX_PROMPT_TOKENS = 32
SAMPLES_PER_SHARD = 200


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
        self.seconds: dict[str, float] = {}  # the steps this invocation ran
        self.lock = threading.Lock()  # steps run in threads with --jobs: their lines, self.seconds, timings.json
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
        Returns the seconds it took (0 when skipped)."""
        if all(path.exists() for path in done):
            self.say(f"{key}: done before, skipped")
            return 0.0
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{key}.log"
        shown = " ".join(os.path.relpath(part, REPO) if part.startswith("/") and part.startswith(str(REPO)) else part
                         for part in command[1:])
        self.say(f"{key}: {shown}")
        start = time.monotonic()
        with open(log, "w") as handle:
            result = subprocess.run(command, cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - start
        if result.returncode != 0 or not all(path.exists() for path in done):
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise StudyError(f"{key} failed (exit code {result.returncode}) after {seconds:.0f}s; last lines of {log}:\n{tail}",
                             result.returncode or 1)
        with self.lock:
            self.seconds[key] = seconds
        self.say(f"{key}: done in {seconds:.0f}s")
        return seconds

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
        mine = {"size": asdict(self.size), "model": str(self.model.resolve())}
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
            record.write_text(json.dumps(mine, indent=1) + "\n")

    def make_pairs(self) -> None:
        """The prompts, their samples, labels and the pairs shards split into train and eval, in turn."""
        d, m, size = self.data, self.model, self.size
        max_length = MAX_PROMPT_TOKENS + 2 * size.max_new_tokens  # room for re-tokenized responses
        prepare = ["--tokenizer", m, "--no-eos", "--max-length", max_length, "--max-prompt-length", MAX_PROMPT_TOKENS,
                   "--samples-per-shard", SAMPLES_PER_SHARD, "--threads", 1]
        self.step("prompts", self.tool("make_story_prompts.py", "--out", d / "prompts.jsonl",
                                       "--num-prompts", size.num_prompts), [d / "prompts.jsonl"])
        self.step("prepare_prompts", self.tool("prepare_pairs.py", "--input", d / "prompts.jsonl", "--out",
                                               d / "prompts", *prepare), [d / "prompts" / "manifest.json"])
        self.step("sample_pairs", self.tool("sample_reference.py", "--pairs", d / "prompts", "--out", d / "samples",
                                            "--num-samples", 2 * size.pairs_per_prompt, "--seed", SEEDS["pairs"],
                                            *self.sampling()), [d / "samples" / "manifest.json"])
        self.step("label_pairs", self.tool("label_story_pairs.py", "--pairs", d / "prompts", "--samples",
                                           d / "samples", "--tokenizer", m, "--seed", SEEDS["labels"],
                                           "--report", d / "pairs_report.json", "--out", d / "pairs.jsonl"),
                  [d / "pairs.jsonl", d / "pairs_report.json"])
        self.step("prepare_pairs", self.tool("prepare_pairs.py", "--input", d / "pairs.jsonl", "--out", d / "pairs",
                                             "--eval-fraction", size.eval_fraction, *prepare),
                  [d / "pairs" / side / "manifest.json" for side in ("train", "eval")])

    def sampling(self) -> list:
        # float32 throughout, as configs/study_frontier.yaml trains: the figures do not depend on the CPU.
        return ["--model", self.model, "--max-new-tokens", self.size.max_new_tokens, "--batch-size", 64,
                "--dtype", "float32", "--threads", 1]

    def reference_data_steps(self) -> list[Callable[[], float]]:
        """The reference's log-probs of both splits and its D_ref samples: each needs only the pairs."""
        d, m, sample = self.data, self.model, self.sampling()
        score = lambda split: self.step(f"score_{split}", self.tool(
            "score_reference.py", "--model", m, "--pairs", d / "pairs" / split, "--out", d / "reference" / split,
            "--dtype", "float32", "--batch-size", 64, "--threads", 1), [d / "reference" / split / "manifest.json"])
        dref = lambda split, samples, seed: self.step(f"dref_{split}", self.tool(
            "sample_reference.py", "--pairs", d / "pairs" / split, "--out", d / "dref" / split, "--num-samples", samples,
            "--seed", seed, *sample), [d / "dref" / split / "manifest.json"])
        return [lambda: score("train"), lambda: score("eval"), lambda: dref("train", 1, SEEDS["dref"]),
                lambda: dref("eval", 2, SEEDS["dref_eval"])]

    def evaluate(self, key: str, model: Path, report: Path) -> float:
        return self.step(key, self.tool("evaluate.py", "--model", model, "--pairs", self.data / "pairs" / "eval",
                                        "--on-policy-samples", self.size.on_policy_samples, "--max-new-tokens",
                                        self.size.max_new_tokens, "--seed", SEEDS["on_policy"], "--reference-model",
                                        self.model, "--reward", REWARD, "--batch-size", 64, "--dtype", "float32", "--threads", 1,
                                        "--out", report), [report])

    def train(self, run: Run, index: int) -> float:
        folder = self.out / "runs" / run.name
        final = folder / "checkpoints" / f"step-{self.size.steps:08d}"
        settings = folder / "study_run.json"
        mine = self.run_settings(run)
        if folder.exists() and not ((final / "checkpoint.json").is_file() and settings.is_file()
                                    and json.loads(settings.read_text()) == mine):
            self.say(f"{run.name}: unfinished or made with other settings: trained again")
            shutil.rmtree(folder)
        command = train_command(CONFIG, mine["overrides"], self.nproc)
        key = f"train_{run.name}"
        self.say(f"run {index}/{len(self.runs)}: {run.name}")
        seconds = self.step(key, command, [final / "checkpoint.json"])
        if seconds:  # trained now: an evaluation of an earlier policy of this name is stale
            settings.write_text(json.dumps(mine, indent=1) + "\n")
            (self.out / "evals" / f"{run.name}.json").unlink(missing_ok=True)
        return seconds

    def train_and_evaluate(self, run: Run, index: int) -> None:
        self.train(run, index)
        checkpoint = self.out / "runs" / run.name / "checkpoints" / f"step-{self.size.steps:08d}"
        self.evaluate(f"eval_{run.name}", checkpoint, self.out / "evals" / f"{run.name}.json")
        self.recorded_timings()  # after every run: a restart still reports the time of finished ones

    def run_settings(self, run: Run) -> dict:
        d, size = self.data, self.size
        overrides = [
            f"job.output_dir={self.out / 'runs' / run.name}", f"model.path={self.model}",
            f"data.pairs={d / 'pairs' / 'train'}", f"data.reference={d / 'reference' / 'train'}",
            f"data.dref={d / 'dref' / 'train' if run.uses_dref else ''}",
            f"eval.pairs={d / 'pairs' / 'eval'}", f"eval.reference={d / 'reference' / 'eval'}",
            f"eval.dref={d / 'dref' / 'eval'}", f"eval.interval={size.eval_interval}",
            f"training.steps={size.steps}", f"optim.lr={size.lr:g}",
            f"optim.warmup_steps={min(10, max(size.steps // 10, 1))}",
            *run.method.overrides(run.beta),
        ]
        return {"overrides": overrides}

    def collect(self) -> list[dict]:
        timings = self.recorded_timings()
        reference = json.loads((self.out / "evals" / "reference.json").read_text())
        rows = [reference_row(reference, timings.get("eval_reference", 0.0))]
        curves = {}
        for run in self.runs:
            report = json.loads((self.out / "evals" / f"{run.name}.json").read_text())
            records = read_metrics(self.out / "runs" / run.name)
            rows.append(run_row(run, self.size, report, records, timings.get(f"train_{run.name}", 0.0),
                                timings.get(f"eval_{run.name}", 0.0)))
            curves[run.name] = kl_curve(records)
        extra = {
            "plan": describe_plan(self.size, self.runs),
            "model": str(self.model.resolve()),
            "reward": REWARD,
            "seeds": SEEDS,
            "data": json.loads((self.data / "pairs_report.json").read_text()),
            "kl_curves": {name: [list(point) for point in curve] for name, curve in curves.items()},
            "seconds": timings,
        }
        csv_path, json_path = write_results(self.out, rows, extra)
        title = (f"Reward/KL frontier: stories260K, {self.size.num_prompts} story openings, "
                 f"{self.size.steps} steps")
        plot_frontier(rows, self.out / "frontier.png", title)
        plot_kl_steps(curves, rows, self.out / "kl_steps.png")
        self.say(f"results: {csv_path}, {json_path}, {self.out / 'frontier.png'}, {self.out / 'kl_steps.png'}")
        return rows

    def recorded_timings(self) -> dict[str, float]:
        """Seconds of every step, this invocation's and those recorded by earlier ones (a restart)."""
        path = self.out / "timings.json"
        with self.lock:
            timings = json.loads(path.read_text()) if path.is_file() else {}
            timings.update(self.seconds)
            path.write_text(json.dumps(timings, indent=1) + "\n")
        return timings

    def run(self) -> list[dict]:
        self.check_folder()
        self.say(f"study in {self.out}: {len(self.runs)} runs of {self.size.steps} steps "
                 f"({', '.join(sorted({run.method.name for run in self.runs}))}), {self.nproc} processes per run")
        self.make_pairs()
        self.at_once(self.reference_data_steps())
        self.recorded_timings()
        self.at_once([lambda: self.evaluate("eval_reference", self.model, self.out / "evals" / "reference.json"),
                      *(lambda run=run, index=index: self.train_and_evaluate(run, index)
                        for index, run in enumerate(self.runs, 1))])
        rows = self.collect()
        print_table(rows)
        self.say("done")
        return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'run':<22} {'reward':>15} {'KL(pi||ref)':>15} {'held-out KL mon.':>17} {'pref acc':>9}")
    for row in rows:
        print(f"{row['run']:<22} {row['reward']:>7.3f} ± {row['reward_stderr']:<5.3f} "
              f"{row['kl_policy_ref']:>7.2f} ± {row['kl_policy_ref_stderr']:<5.2f} "
              f"{row['heldout_kl_ref_policy']:>17.2f} {row['heldout_preference_accuracy']:>9.3f}")


def main(argv=None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--out", required=True, help="output folder (created; a rerun resumes it)")
    parser.add_argument("--tiny", action="store_true", help="the CI size: checks the pipeline end to end in minutes")
    parser.add_argument("--methods", default=",".join(m.name for m in METHODS),
                        help="comma-separated subset of the methods")
    parser.add_argument("--nproc", type=int, default=2, help="training processes per run (torchrun)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="steps run at once where none needs another's output: the reference's scores and "
                             "samples, then its evaluation and the runs")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the reference model (a Hugging Face folder)")
    args = parser.parse_args(argv)
    known = {m.name: m for m in METHODS}
    wanted = [name for name in args.methods.split(",") if name]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    model = Path(args.model)
    if not (model / "config.json").is_file():
        parser.error(f"--model {model}: not a Hugging Face model folder (no config.json)")
    if importlib.util.find_spec("matplotlib") is None:  # the plots come last: fail before the sweep, not after it
        print("study_frontier: error: the plots need matplotlib: pip install -e '.[study]'", file=sys.stderr)
        return INPUT_ERROR_EXIT_CODE
    size = TINY if args.tiny else DEFAULT
    runs = plan_runs(size, tuple(known[name] for name in wanted))
    try:
        Study(Path(args.out).resolve(), size, runs, model.resolve(), args.nproc, args.jobs).run()
    except StudyError as error:
        print(f"study_frontier: error: {error}", file=sys.stderr)
        return error.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
