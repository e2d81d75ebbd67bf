"""The trainer's first input checks: every configured path exists (one line naming the option and
the fix, before anything is read or built), and pairs of another tokenizer are one line about the
tokenizer, found from the manifests before the pre-flight reads every shard."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from support import SUBPROCESS_ENV, TRAIN_CONFIG, torchrun_command
from mpo_dist.config import load_config
from mpo_dist.data.input_paths import check_input_paths
from mpo_dist.errors import MissingInputError
from mpo_dist.metrics_file import METRICS_FILE

QUICKSTART_EVAL = "outputs/quickstart/pairs/eval"  # configs/tiny_cpu.yaml's eval.pairs


def train_in(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """configs/tiny_cpu.yaml with OVERRIDES, run from `cwd` (where its relative paths resolve) on 2 ranks."""
    command = torchrun_command(2, ["-m", "mpo_dist.train", "--config", str(TRAIN_CONFIG), "model.dtype=float32",
                                   *overrides])
    return subprocess.run(command, env=SUBPROCESS_ENV, cwd=cwd, capture_output=True, text=True, timeout=300)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The input-error line of each rank, its 'mpo_dist: error (rank R): ' prefix removed."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("mpo_dist: error")]
    assert sorted(line.split(":")[1] for line in lines) == [" error (rank 0)", " error (rank 1)"], result.stderr[-3000:]
    return [line.split(": ", 2)[2] for line in lines]


# ------------------------------------------------------------------------------ paths, in one process


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Folders that pass the path check (what is in the files is the later checks' business)."""
    folders = {"model": "config.json", "pairs": "manifest.json", "reference": "manifest.json", "dref": "manifest.json",
               "eval_pairs": "manifest.json", "eval_reference": "manifest.json", "eval_dref": "manifest.json",
               "checkpoint": "checkpoint.json"}
    for name, marker in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text("{}")
    return {name: tmp_path / name for name in folders}


def config_of(inputs: dict[str, Path], **changes):
    values = {"model.path": inputs["model"], "data.pairs": inputs["pairs"], "data.reference": inputs["reference"],
              "data.dref": inputs["dref"], "eval.pairs": inputs["eval_pairs"], "eval.reference": inputs["eval_reference"],
              "eval.dref": inputs["eval_dref"], "checkpoint.resume": inputs["checkpoint"], **changes}
    return load_config(str(TRAIN_CONFIG), [f"{key}={value}" for key, value in values.items()])


def refused(config, uses_dref: bool = True) -> str:
    with pytest.raises(MissingInputError) as error:
        check_input_paths(config, uses_dref=uses_dref)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.unit
def test_inputs_that_exist_pass(inputs):
    check_input_paths(config_of(inputs), uses_dref=True)
    check_input_paths(config_of(inputs, **{"checkpoint.resume": "auto"}), uses_dref=True)


@pytest.mark.unit
@pytest.mark.parametrize("option, fix", [
    ("model.path", "point model.path at a Hugging Face model folder"),
    ("data.pairs", "point data.pairs at the --out folder of tools/prepare_pairs.py"),
    ("data.reference", "point data.reference at the --out folder of tools/score_reference.py"),
    ("data.dref", "point data.dref at the --out folder of tools/sample_reference.py, or set loss.tau=0"),
    ("checkpoint.resume", "or set checkpoint.resume=auto"),
    ("eval.pairs", "point eval.pairs, eval.reference, eval.dref at held-out shards"),
    ("eval.reference", "or train without held-out evaluation: eval.pairs= eval.reference= eval.dref= eval.interval=0"),
    ("eval.dref", "or train without held-out evaluation"),
])
def test_a_missing_path_is_one_line_naming_the_option_and_the_fix(inputs, tmp_path, option, fix):
    missing = tmp_path / "nowhere" / option
    message = refused(config_of(inputs, **{option: missing}))
    assert message.startswith(f"{option}={missing} does not exist; ") and fix in message, message


@pytest.mark.unit
def test_a_folder_without_what_it_must_hold_is_named(inputs):
    (inputs["eval_pairs"] / "manifest.json").unlink()
    message = refused(config_of(inputs))
    assert message.startswith(f"eval.pairs={inputs['eval_pairs']} has no manifest.json: it is not a shard folder"), message
    (inputs["model"] / "config.json").unlink()
    assert refused(config_of(inputs)).startswith(f"model.path={inputs['model']} has no config.json"), message


@pytest.mark.unit
def test_every_missing_path_is_in_the_one_line(inputs, tmp_path):
    message = refused(config_of(inputs, **{"data.reference": tmp_path / "no-ref", "eval.dref": tmp_path / "no-dref"}))
    assert message.startswith(f"data.reference={tmp_path / 'no-ref'} does not exist; point data.reference"), message
    assert message.endswith(f"(also: eval.dref={tmp_path / 'no-dref'} does not exist)"), message


@pytest.mark.unit
def test_an_unused_dref_is_not_checked(inputs, tmp_path):
    check_input_paths(config_of(inputs, **{"data.dref": tmp_path / "nowhere"}), uses_dref=False)


@pytest.mark.unit
def test_a_relative_path_says_where_it_was_looked_for(inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = refused(config_of(inputs, **{"eval.pairs": QUICKSTART_EVAL}))
    assert message.startswith(f"eval.pairs={QUICKSTART_EVAL} does not exist (relative to {tmp_path}); "), message


@pytest.mark.unit
@pytest.mark.parametrize("keep_best", ["", "eval/loss/total"])
def test_the_overrides_that_turn_eval_off_load_and_pass(inputs, tmp_path, keep_best):
    """The message's 'train without held-out evaluation' overrides are the complete fix: the config
    loader takes them (empty values; eval.interval and checkpoint.keep_best would refuse an empty eval
    set) and the path check then passes."""
    config = config_of(inputs, **{"eval.pairs": tmp_path / "nowhere", "checkpoint.keep_best": keep_best})
    message = refused(config)
    overrides = message.split("or train without held-out evaluation: ", 1)[1].split(" (also", 1)[0].split()
    assert overrides[:4] == ["eval.pairs=", "eval.reference=", "eval.dref=", "eval.interval=0"]
    assert ("checkpoint.keep_best=" in overrides) == bool(keep_best)
    fixed = load_config(str(TRAIN_CONFIG), [f"{k}={v}" for k, v in {
        "model.path": inputs["model"], "data.pairs": inputs["pairs"], "data.reference": inputs["reference"],
        "data.dref": inputs["dref"], "checkpoint.keep_best": keep_best}.items()] + overrides)
    assert not fixed.eval.enabled
    check_input_paths(fixed, uses_dref=True)


# ------------------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    """The quickstart's tiny Llama and its toy tokenizer (a few records: only the model folder is used)."""
    from mpo_dist.data.toy_task import write_toy_task

    return write_toy_task(tmp_path_factory.mktemp("toy-model"), num_records=4, seed=0)[1]


@pytest.mark.e2e
def test_own_data_with_the_tiny_config_names_its_eval_folders(stories_inputs, tmp_path):
    """configs/tiny_cpu.yaml with another model and data (data.* and model.path overridden, run where
    the quickstart's outputs are not): its held-out eval folders are missing, and every rank says so in
    one line with the complete fix, instead of a FileNotFoundError traceback."""
    result = train_in(tmp_path, f"job.output_dir={tmp_path / 'run'}", f"model.path={stories_inputs['model']}",
                      f"data.pairs={stories_inputs['pairs']}", f"data.reference={stories_inputs['reference']}",
                      "data.dref=", "loss.tau=0")
    for line in error_lines(result):
        assert line.startswith(f"eval.pairs={QUICKSTART_EVAL} does not exist (relative to {tmp_path}); point eval.pairs, "
                               "eval.reference, eval.dref at held-out shards"), line
        assert ("or train without held-out evaluation: eval.pairs= eval.reference= eval.dref= eval.interval=0 "
                "(also: eval.reference=outputs/quickstart/reference/eval does not exist") in line, line
    assert not (tmp_path / "run" / METRICS_FILE).exists()


@pytest.mark.e2e
def test_pairs_of_another_tokenizer_are_one_line_about_the_tokenizer(stories_inputs, toy_model, tmp_path):
    """stories260K's pairs (a 512-token vocabulary) with the quickstart's toy model: nearly every pair
    holds ids outside the toy vocabulary, and the tokenizer check, which reads manifests only, says
    why in one line on each rank before the pre-flight would list them."""
    result = train_in(tmp_path, f"job.output_dir={tmp_path / 'run'}", f"model.path={toy_model}",
                      f"data.pairs={stories_inputs['pairs']}", f"data.reference={stories_inputs['reference']}",
                      "data.dref=", "loss.tau=0", "eval.pairs=", "eval.reference=", "eval.dref=", "eval.interval=0")
    for line in error_lines(result):
        assert re.match(rf"data\.pairs {re.escape(str(stories_inputs['pairs']))} was tokenized with tokenizer sha256:\w+, "
                        rf"but model\.path {re.escape(str(toy_model))} has tokenizer sha256:\w+; re-run "
                        r"tools/prepare_pairs\.py with the model's tokenizer", line), line
    assert "outside the vocabulary" not in result.stderr and "pre-flight" not in result.stderr, result.stderr[-3000:]
