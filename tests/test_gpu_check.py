"""tools/gpu_check.sh, the GPU check, as far as a CPU takes it: its CPU fallback runs every stage
(the CUDA tests are skipped and counted; the attention paths run their plain-PyTorch twins and
equal the dense path) and reports figures that add up; the time budget and --skip leave stages out
and say why; a failing stage fails the check without losing the others; a Python without the
dependencies is told how to bring them. tools/bench_attention.py's equality figures catch a path
that attends wrongly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import REPO, SUBPROCESS_ENV

sys.path.insert(0, str(REPO / "tools"))
import bench_attention  # noqa: E402
import gpu_check  # noqa: E402

FLOAT32_LOGPS_ATOL = 1e-4  # the paths differ in summation order only (about 2e-6 measured)


def run_check(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), *map(str, args)], env=env or SUBPROCESS_ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def collect_cuda_marked_tests() -> subprocess.Popen:
    """pytest collecting the tests that carry the cuda mark, started now, counted by `count_collected`
    (it runs beside the check, on the core that the check's one-process stages leave idle)."""
    return subprocess.Popen([sys.executable, "-m", "pytest", "-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "tests/"], env=SUBPROCESS_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)


def count_collected(collection: subprocess.Popen) -> int:
    """How many tests `collection` collected."""
    stdout, _ = collection.communicate(timeout=300)
    return sum("::" in line for line in stdout.splitlines())


@pytest.mark.e2e
def test_the_cpu_fallback_runs_every_stage_and_its_figures_add_up(tmp_path):
    # The budget well above the ~2 minutes this takes, so that a loaded machine skips nothing; compile is left
    # to tests/test_cuda.py's CPU twin.
    collection = collect_cuda_marked_tests()
    try:
        result = run_check(tmp_path / "out", "--cpu", "--skip", "train_compiled", "--budget-s", "3600", timeout=1800)
        marked = count_collected(collection)
    finally:
        collection.kill()
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    assert {name: stage["status"] for name, stage in stages.items()} == {
        **dict.fromkeys(gpu_check.STAGES, "ok"), "train_compiled": "skipped"}
    assert stages["train_compiled"]["why"] == "--skip"
    # Every CUDA test was collected and skipped (none silently missing), none failed.
    assert marked >= 8 and stages["cuda_tests"]["skipped"] == stages["cuda_tests"]["tests"] == marked
    assert stages["cuda_tests"]["failed"] == 0
    # Four training configurations, each timed, in float32 (bf16 would be emulated on many CPUs, 10-50x slower);
    # MFU against the float32 matmul timed in the same run; no card, no GPU memory.
    assert report["dtype"] == "float32"
    rows = stages["train_eager"]["rows"]
    assert [row["name"] for row in rows] == ["padded fp32 1x2 mpo", "padded fp32 1x2 mpo recompute",
                                             "packed fp32 1x2 mpo", "packed fp32 1x2 mpo recompute"]
    bench = json.loads((tmp_path / "out" / "bench_train_eager.json").read_text())
    peak = bench["matmul_peaks"]["1x2"]["float32"]
    for row, config in zip(rows, bench["configurations"]):
        assert row["tokens_per_s"] > 0 and row["mfu_card"] is None and row["device_peak_bytes"] is None
        assert row["mfu_matmul"] == pytest.approx(config["flops_per_pair"] * config["pairs_per_s_median"] / peak)
    # The sampler against transformers' generate, the ratio of the medians.
    medians = stages["sampler"]["medians"]
    assert set(medians) == {"mpo_dist continuous", "mpo_dist static", "transformers generate"}
    assert medians["mpo_dist continuous"]["ratio_to_generate"] == pytest.approx(
        medians["mpo_dist continuous"]["tokens_per_second"] / medians["transformers generate"]["tokens_per_second"])
    # Saved, resumed, converted: the converted tensors are the checkpoint's, and training changed them.
    assert stages["checkpoint"]["tensors_equal"] == 3 and stages["checkpoint"]["tensors_changed_by_training"] >= 1
    assert stages["two_processes"]["summary"] == "two processes trained 2 steps"
    # The attention paths on CPU: every path and layout reported; packed rows on each path, padded rows on the
    # dense one, with the dense path's log-probs and gradients (FlexAttention forward only: no CPU backward).
    attention = report["attention_paths"]
    paths = {(row["path"], row["layout"]): row for row in attention["rows"]}
    assert set(paths) == {(path, layout) for path in bench_attention.PATHS for layout in bench_attention.LAYOUTS}
    assert {key: row["status"] for key, row in paths.items()} == {
        ("dense", "padded"): "ok", ("dense", "packed"): "ok", ("varlen", "packed"): "ok", ("flex", "packed"): "ok",
        ("varlen", "padded"): "skipped", ("flex", "padded"): "skipped"}
    assert "serves packed rows only" in paths["varlen", "padded"]["why"]
    assert [paths[key]["mode"] for key in (("dense", "padded"), ("dense", "packed"), ("varlen", "packed"), ("flex", "packed"))] == [
        "forward+backward", "forward+backward", "forward+backward", "forward"]
    assert "backward on CPU" in paths["flex", "packed"]["forward_only_why"]
    assert attention["header"]["dtype"] == "float32" and attention["header"]["tolerance"]["logps"] <= FLOAT32_LOGPS_ATOL
    for key, reference in ((("dense", "packed"), "dense padded"), (("varlen", "packed"), "dense packed"),
                           (("flex", "packed"), "dense packed")):
        row = paths[key]
        assert row["reference"] == reference and row["within_tolerance"] is True
        assert row["logps_max_abs_diff"] < FLOAT32_LOGPS_ATOL < row["logps_std"] / 100  # tokens differ far more
    for key in (("dense", "packed"), ("varlen", "packed")):
        assert paths[key]["grad_relative_diff"] < FLOAT32_LOGPS_ATOL
    assert paths["flex", "packed"]["grad_relative_diff"] is None
    for row in (row for row in paths.values() if row["status"] == "ok"):
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds_median"]) and row["tokens_per_s"] > 0
        assert row["peak_above_start_bytes"] is None or row["peak_above_start_bytes"] >= 0
    # The same tokens on every path and layout; packed rows compute the shared prompts once.
    assert len({row["tokens"] for row in paths.values() if row["status"] == "ok"}) == 1
    assert paths["dense", "packed"]["real_positions"] < paths["dense", "padded"]["real_positions"]
    assert stages["attention_paths"]["summary"].startswith("tokens/s against dense padded: dense packed ")
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert f"| varlen | packed | ok | forward+backward | {paths['varlen', 'packed']['tokens_per_s']:,.0f} |" in markdown
    assert "| flex | packed | ok | forward |" in markdown and "| (forward only) |" in markdown
    assert "| train_compiled | skipped |  | --skip |" in markdown
    assert f"| padded fp32 1x2 mpo | {rows[0]['tokens_per_s']:,.0f} |" in markdown
    assert "Training, MPO with D_ref rows, fp32, FSDP2. Timed fp32 matmul: 1x2: " in markdown


@pytest.mark.e2e
def test_stages_past_the_budget_are_skipped_and_say_why(tmp_path):
    result = run_check(tmp_path / "out", "--cpu", "--budget-s", "0", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]
    assert stages["environment"]["status"] == "skipped" and "over the time budget" in stages["environment"]["why"]
    assert stages["train_eager"]["why"] == "no workload (the workload stage did not finish)"


@pytest.mark.unit
def test_a_failed_stage_fails_the_check_and_the_other_stages_still_run(tmp_path):
    check = gpu_check.GpuCheck(tmp_path, tmp_path / "work", 60.0, "cpu", skip=set())

    def broken() -> dict:
        raise gpu_check.StageError("exit code 1: something broke")

    check.run_stage("cuda_tests", broken)
    check.run_stage("environment", lambda: {"summary": "fine"})
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert stages["cuda_tests"] == {"status": "failed", "why": "exit code 1: something broke", "seconds": stages["cuda_tests"]["seconds"]}
    assert stages["environment"]["status"] == "ok"
    assert "| cuda_tests | failed |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.e2e
def test_unknown_stages_and_missing_dependencies_are_input_errors(tmp_path):
    result = run_check(tmp_path / "out", "--skip", "traning", timeout=120)
    assert result.returncode == 2
    assert "gpu_check: error: --skip: traning is not a stage; the stages are environment, cuda_tests" in result.stderr
    # A Python without the project's dependencies (as on a GPU image): told to bring them as wheels.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    base_python = str(tmp_path / "bare" / "bin" / "python")
    result = run_check(tmp_path / "out", env={**SUBPROCESS_ENV, "PYTHON": base_python, "WHEELS": ""}, timeout=120)
    assert result.returncode == 2
    assert f"gpu_check.sh: error: {base_python} lacks webdataset" in result.stderr
    assert "set WHEELS to a folder of their wheels (bash tools/gpu_check.sh --download-wheels DIR" in result.stderr


@pytest.mark.unit
def test_the_attention_bench_catches_a_path_that_attends_wrongly(monkeypatch):
    """The varlen pieces with SDPA's top-left causal alignment (a rejected response's first token then
    sees the prompt's first token only): the bench's equality figures say so; dense rows stay equal."""
    from mpo_dist import attention
    from mpo_dist.varlen import varlen_attention_reference

    monkeypatch.setattr(attention, "varlen_attention", lambda q, k, v, descriptors, scale=None: varlen_attention_reference(
        q, k, v, descriptors, scale, alignment="top_left"))
    args = bench_attention.build_parser().parse_args(["--device", "cpu", "--paths", "dense,varlen", "--pairs", "2",
                                                      "--warmup", "0", "--repeats", "1"])
    rows = {(row["path"], row["layout"]): row for row in bench_attention.bench(args, log=lambda message: None)["rows"]}
    assert rows["dense", "packed"]["within_tolerance"] is True
    assert rows["dense", "packed"]["logps_max_abs_diff"] < FLOAT32_LOGPS_ATOL
    broken = rows["varlen", "packed"]
    assert broken["status"] == "ok" and broken["within_tolerance"] is False
    assert broken["logps_max_abs_diff"] > 100 * FLOAT32_LOGPS_ATOL and broken["grad_relative_diff"] > 100 * FLOAT32_LOGPS_ATOL
