"""tools/score_reference.py and tools/sample_reference.py with the real stories260K model on HH-RLHF
prompts: world-size independence, agreement with the trainer's numbers, resumption after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from support import QUIET, REPO, SUBPROCESS_ENV as ENV, free_port, worker_pids
from mpo_dist.producers.prepare import PrepareOptions, prepare_pairs
from mpo_dist.data.shards import Manifest, ShardCursor, ShardError, ShardInfo
from mpo_dist.producers.job import manifest_fingerprint


def run_tool(tool: str, *args, nproc: int = 1, rendezvous: list[str] | None = None, check: bool = True):
    launcher = [sys.executable]
    if nproc > 1 and rendezvous is None:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    elif rendezvous is not None:
        launcher += ["-m", "torch.distributed.run", *rendezvous]
    result = subprocess.run(launcher + [str(REPO / "tools" / tool), *map(str, args)], env=ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def tree(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def stories(stories_inputs):
    return stories_inputs


# ------------------------------------------------------------------------------------------- scoring


@pytest.mark.e2e
def test_scoring_does_not_depend_on_the_number_of_processes(stories, tmp_path):
    common = ["--model", stories["model"], "--pairs", stories["pairs"], "--batch-size", 4, "--dtype", "float32"]
    run_tool("score_reference.py", *common, "--out", tmp_path / "one")
    result = run_tool("score_reference.py", *common, "--out", tmp_path / "two", nproc=2)
    assert "tokens/s" in result.stderr and "ETA" in result.stderr
    # Through a pipe: plain progress lines, no carriage return, each a whole line about rank 0's share.
    lines = [line for line in result.stderr.splitlines() if "ETA" in line]
    assert "\r" not in result.stderr and all(line.startswith("score_reference: rank 0 of 2, ") for line in lines), lines
    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert len(one) == len(Manifest.read(stories["pairs"]).shards) + 2  # shards, manifest.json, .job.json
    assert {k: v for k, v in one.items() if k != "manifest.json"} == {k: v for k, v in two.items() if k != "manifest.json"}
    manifest = Manifest.read(tmp_path / "one", "ref_logps")
    assert manifest.info["model"]["weights_hash"].startswith("sha256:")
    assert manifest.tokenizer_hash == Manifest.read(stories["pairs"]).tokenizer_hash
    # Provenance: the pairs it was scored from, and the model's dtype and tokenizer (checked by the trainer).
    assert manifest.info["pairs_fingerprint"] == manifest_fingerprint(stories["pairs"])
    assert manifest.info["model"]["dtype"] == "float32"
    assert manifest.info["model"]["tokenizer_hash"] == manifest.tokenizer_hash


@pytest.mark.unit
def test_scored_logps_equal_the_trainers_at_step_0(stories, tmp_path, one_process_group):
    """The trainer's path (meta init, FSDP2, DCP weight loading, FSDP forward method) reproduces the
    scored reference log-probs of the same model, pair by pair."""
    from mpo_dist.config import ModelConfig, ParallelConfig
    from mpo_dist.batch import MicroBatch
    from mpo_dist.data.collate import collate_pairs
    from mpo_dist.data.layout import lay_out
    from mpo_dist.data.samples import PairSource
    from mpo_dist.flops import CostModel
    from mpo_dist.model import build_model, materialize_model
    from mpo_dist.objective import policy_logprobs
    from mpo_dist.parallelize import apply_fsdp, build_mesh
    from mpo_dist.producers.score import score_pairs
    from transformers import AutoModelForCausalLM

    score_pairs(AutoModelForCausalLM.from_pretrained(str(stories["model"])), stories["pairs"], tmp_path / "ref",
                batch_size=3, log=QUIET)
    config = ModelConfig(path=str(stories["model"]), dtype="float32")
    policy = build_model(config)
    apply_fsdp(policy, build_mesh(ParallelConfig(), 1, "cpu"), ParallelConfig(), "float32")
    materialize_model(policy, config, torch.device("cpu"), seed=0)
    source = PairSource(stories["pairs"], tmp_path / "ref")
    samples = [source.read(i) for i in range(len(source.shards))]
    pairs = collate_pairs(samples, np.zeros(len(samples), bool))
    stored = torch.tensor([[s["ref_chosen_logp"] for s in samples], [s["ref_rejected_logp"] for s in samples]])
    for packing in ("never", "always"):  # the trainer's two layouts
        layout = partial(lay_out, packing=packing, pad_token_id=0, cost=CostModel.of(policy).layout_cost)
        batch = MicroBatch.build(pairs, None, layout)
        with torch.no_grad():
            logps = policy_logprobs(policy, batch).logps
        torch.testing.assert_close(torch.stack([batch.chosen(logps), batch.rejected(logps)]), stored, rtol=2e-6, atol=1e-4)


@pytest.mark.e2e
def test_a_tokenizer_that_did_not_make_the_pairs_is_refused(stories, tmp_path, shared_data):
    from transformers import AutoTokenizer

    # The same vocabulary, another tokenizer (a chat template changes what prompts become).
    templated = tmp_path / "stories-chat"
    tokenizer = AutoTokenizer.from_pretrained(str(stories["model"]), local_files_only=True)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(str(templated))
    prepare_pairs(stories["root"] / "hh.jsonl", templated, tmp_path / "templated-pairs",
                  PrepareOptions(samples_per_shard=20, max_length=160), log=QUIET)
    # Another vocabulary too (50257 tokens for a model of 512 embeddings).
    prepare_pairs(stories["root"] / "hh.jsonl", shared_data("gpt2-tokenizer"), tmp_path / "gpt2-pairs",
                  PrepareOptions(samples_per_shard=20), log=QUIET)
    for tool, extra in [("score_reference.py", []), ("sample_reference.py", ["--num-samples", 1, "--max-new-tokens", 4])]:
        for pairs, words in [("templated-pairs", ["has tokenizer", "was tokenized with"]),
                             ("gpt2-pairs", ["--pairs", "--model"])]:
            out = tmp_path / f"{tool}-{pairs}"
            result = run_tool(tool, "--model", stories["model"], "--pairs", tmp_path / pairs, "--out", out, *extra,
                              check=False)
            assert result.returncode == 2, result.stderr[-3000:]
            [line] = result.stderr.strip().splitlines()
            assert line.startswith(f"{tool[:-3]}: error: ") and all(word in line for word in words), line
            assert not (out / "manifest.json").exists()


# ------------------------------------------------------------------------------------------- sampling

SAMPLING = ["--num-samples", 2, "--max-new-tokens", 24, "--seed", 3, "--batch-size", 5]


@pytest.fixture(scope="module")
def several_stops_model(stories, tmp_path_factory):
    """stories260K configured like a chat model with several stop tokens (EOS, newline, full stop): its
    D_ref responses end at different steps, so batch slots are refilled while other rows decode."""
    folder = tmp_path_factory.mktemp("several-stops") / "stories260K"
    shutil.copytree(stories["model"], folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [2, 13, 426]}))
    return folder


@pytest.mark.e2e
def test_sampling_is_identical_on_1_process_2_processes_and_2_nodes(stories, several_stops_model, tmp_path):
    common = ["--model", several_stops_model, "--pairs", stories["pairs"], *SAMPLING, "--dtype", "float32"]
    run_tool("sample_reference.py", *common, "--out", tmp_path / "one")
    run_tool("sample_reference.py", *common, "--out", tmp_path / "two", nproc=2)
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"localhost:{free_port()}", "--rdzv-id", "sampling-test"]
    launcher = [sys.executable, "-m", "torch.distributed.run", *rendezvous, str(REPO / "tools" / "sample_reference.py"),
                *map(str, common), "--out", str(tmp_path / "nodes")]
    nodes = [subprocess.Popen(launcher, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    one = tree(tmp_path / "one")
    assert len(one) == len(Manifest.read(stories["pairs"]).shards) + 2  # shards, manifest.json, .job.json
    assert tree(tmp_path / "two") == one and tree(tmp_path / "nodes") == one  # byte for byte, the manifest too
    manifest = Manifest.read(tmp_path / "one", "dref")
    assert manifest.num_samples == 2 * Manifest.read(stories["pairs"]).num_samples
    assert manifest.info["sampling"] == {"num_samples": 2, "max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0, "seed": 3}
    assert manifest.info["pairs_fingerprint"] == manifest_fingerprint(stories["pairs"])  # D_ref is made from the pairs too
    assert manifest.info["model"]["dtype"] == "float32" and manifest.info["model"]["weights_hash"].startswith("sha256:")
    # Responses ended at different steps (any of the three stop ids, or the length): slots were refilled mid-batch.
    ends = [(meta["stop_reason"], arrays["response_ids"][-1], len(arrays["response_ids"]))
            for shard in manifest.shards
            for _, meta, arrays in ShardCursor(tmp_path / "one" / shard.name, "dref", shard.num_samples)]
    assert all((reason == "eos") == (last in (2, 13, 426)) for reason, last, _ in ends)
    assert 10 <= sum(reason == "eos" for reason, _, _ in ends) <= len(ends) - 10
    assert len({length for _, _, length in ends}) > 5


@pytest.mark.unit
def test_stored_logp_ref_equals_a_rescoring_and_samples_read_like_stories(stories, tmp_path):
    from transformers import AutoModelForCausalLM

    from mpo_dist.logprobs import sequence_logprobs
    from mpo_dist.producers.sample import SamplingParams, generate, sample_dref
    from mpo_dist.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(stories["model"])).eval()
    tokenizer = load_tokenizer(stories["model"])
    sample_dref(model, stories["pairs"], tmp_path / "dref", SamplingParams(num_samples=1, max_new_tokens=20, seed=0),
                eos_token_ids=2, pad_token_id=0, batch_size=7, log=QUIET)
    manifest = Manifest.read(tmp_path / "dref", "dref")
    reasons = set()
    for shard in manifest.shards:
        for key, meta, arrays in ShardCursor(tmp_path / "dref" / shard.name, "dref", shard.num_samples):
            ids = torch.tensor(np.concatenate([arrays["prompt_ids"], arrays["response_ids"]]))[None].long()
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(arrays["prompt_ids"]):] = True
            with torch.no_grad():  # each sample alone, unpadded
                alone = sequence_logprobs(model, ids, torch.ones_like(mask), mask).logps.item()
            assert meta["logp_ref"] == pytest.approx(alone, rel=1e-5, abs=1e-4), key
            assert key.endswith("-s0") and 1 <= len(arrays["response_ids"]) <= 20
            reasons.add(meta["stop_reason"])
            assert (meta["stop_reason"] == "eos") == (arrays["response_ids"][-1] == 2)
    assert reasons <= {"eos", "length"} and "length" in reasons
    greedy = generate(model, [np.array([1])], [0], SamplingParams(max_new_tokens=16, temperature=0), 2, 0, torch.device("cpu"))
    assert tokenizer.decode(greedy[0][0]).startswith("Once upon a time, there was a little girl named Lily")
    drawn = generate(model, [np.array([1])] * 4, [1, 2, 3, 4], SamplingParams(max_new_tokens=12), 2, 0, torch.device("cpu"))
    texts = [tokenizer.decode(response) for response, _ in drawn]
    assert len(set(texts)) > 1 and all(text.split() for text in texts)  # distinct stories, made of words


@pytest.mark.e2e
def test_sigkill_of_one_rank_then_rerun_gives_the_uninterrupted_output(stories, tmp_path):
    common = ["--model", stories["model"], "--pairs", stories["pairs"], "--num-samples", 3, "--max-new-tokens", 48,
              "--seed", 5, "--batch-size", 4]
    run_tool("sample_reference.py", *common, "--out", tmp_path / "clean")
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "tools" / "sample_reference.py"), *map(str, common), "--out", str(out)]
    job = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.tar")) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = worker_pids(job.pid)
    assert workers, "no worker processes found"
    os.kill(max(workers), signal.SIGKILL)  # one rank dies mid-job
    job.communicate(timeout=120)
    assert job.returncode != 0
    total = len(Manifest.read(stories["pairs"]).shards)
    assert not (out / "manifest.json").exists() and len(list(out.glob("shard-*.tar"))) < total
    rerun = run_tool("sample_reference.py", *common, "--out", out, nproc=2)
    assert "already done" in rerun.stderr
    assert tree(out) == tree(tmp_path / "clean")
    assert not list(out.glob(".*.tmp-*"))


@pytest.mark.e2e
def test_bad_sampling_parameters_are_refused(stories, tmp_path):
    result = run_tool("sample_reference.py", "--model", stories["model"], "--pairs", stories["pairs"], "--out", tmp_path,
                      "--num-samples", 1, "--max-new-tokens", 8, "--top-p", 0, check=False)
    assert result.returncode == 2 and "--top-p must be in (0, 1]" in result.stderr
    assert result.stderr.strip().splitlines() == ["sample_reference: error: --top-p must be in (0, 1], got 0.0"]
    result = run_tool("score_reference.py", "--model", stories["model"], "--pairs", stories["pairs"],
                      "--out", tmp_path / "ref", "--batch-size", 0, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["score_reference: error: --batch-size must be >= 1, got 0"]
    assert not (tmp_path / "ref").exists()


@pytest.mark.unit
def test_any_of_several_eos_ids_ends_a_response(stories):
    """Chat models stop at any of several tokens (e.g. end of turn): each one ends a sample."""
    from transformers import AutoModelForCausalLM

    from mpo_dist.producers.sample import SamplingParams, generate

    model = AutoModelForCausalLM.from_pretrained(str(stories["model"])).eval()
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    text, reason = generate(model, [np.array([1])], [0], greedy, None, 0, torch.device("cpu"))[0]
    assert reason == "length" and len(text) == 12
    stop_at = int(text[3])  # the 4th greedy token, declared a second stop token
    cut, reason = generate(model, [np.array([1])], [0], greedy, [2, stop_at], 0, torch.device("cpu"))[0]
    first = list(text).index(stop_at)
    assert reason == "eos" and cut.tolist() == text[: first + 1].tolist()


@pytest.mark.e2e
def test_a_rerun_with_other_settings_is_refused(stories, tmp_path):
    common = ["--model", stories["model"], "--pairs", stories["pairs"], "--out", tmp_path / "dref",
              "--num-samples", 1, "--max-new-tokens", 4]
    run_tool("sample_reference.py", *common)
    (tmp_path / "dref" / "shard-000001.tar").unlink()  # an unfinished job
    changed = run_tool("sample_reference.py", *common, "--seed", 9, check=False)
    assert changed.returncode == 2 and "made with other settings (sampling differ" in changed.stderr
    assert not (tmp_path / "dref" / "shard-000001.tar").exists()
    run_tool("sample_reference.py", *common)  # the same settings finish the job
    assert (tmp_path / "dref" / "shard-000001.tar").exists()
    scored = run_tool("score_reference.py", "--model", stories["model"], "--pairs", stories["pairs"],
                      "--out", tmp_path / "dref", check=False)
    assert scored.returncode == 2 and "--out" in scored.stderr


# ------------------------------------------------------------------------------------------- hostile input


@pytest.mark.unit
@pytest.mark.parametrize("tool", ["score", "sample"])
def test_a_pairs_manifest_naming_a_shard_outside_its_folder_writes_nothing_outside_out(tmp_path, tool):
    """A pairs manifest naming `../../victim.tar` is refused before any output is written."""
    from mpo_dist.producers.score import score_pairs
    from mpo_dist.producers.sample import SamplingParams, sample_dref

    pairs = tmp_path / "data" / "pairs"
    pairs.mkdir(parents=True)
    Manifest("pairs", "sha256:x", [ShardInfo("../../victim.tar", 1)]).write(pairs)
    out = tmp_path / "data" / "out"
    run = {"score": lambda: score_pairs(torch.nn.Linear(1, 1), pairs, out, log=QUIET),
           "sample": lambda: sample_dref(torch.nn.Linear(1, 1), pairs, out, SamplingParams(), eos_token_ids=None,
                                         pad_token_id=0, log=QUIET)}[tool]
    with pytest.raises(ShardError, match=r"pairs/manifest\.json: shard name '\.\./\.\./victim\.tar' is not a plain file name"):
        run()
    assert not (tmp_path / "victim.tar").exists() and not out.exists()


@pytest.mark.unit
def test_the_shard_job_refuses_a_path_as_an_output_name(tmp_path):
    from mpo_dist.producers.job import run_shard_job

    with pytest.raises(ShardError, match=r"shard name '\.\./x\.tar' is not a plain file name"):
        run_shard_job("t", [ShardInfo("../x.tar", 1)], tmp_path / "out", lambda i, s: 0, rank=0, world_size=1,
                      log=QUIET, params={})
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- importing D_ref


@pytest.mark.e2e
def test_imported_responses_give_the_shards_sample_reference_wrote(stories, tmp_path):
    """D_ref made by another engine: its responses (here sample_reference's own, as token ids) imported
    with import_dref give byte-identical shards, logp_ref re-scored by the same code."""
    common = ["--model", stories["model"], "--pairs", stories["pairs"], "--batch-size", 4]
    run_tool("sample_reference.py", *common, "--out", tmp_path / "sampled", "--num-samples", 2, "--max-new-tokens", 12)
    manifest = Manifest.read(tmp_path / "sampled", "dref")
    samples = [(key.rsplit("-s", 1), arrays["response_ids"].tolist()) for shard in manifest.shards
               for key, _, arrays in ShardCursor(tmp_path / "sampled" / shard.name, "dref", shard.num_samples)]
    # Lines in any order of keys (here every pair's first response, then every second): k follows a key's lines.
    lines = [json.dumps({"key": key, "response_ids": ids}) for (key, k), ids in sorted(samples, key=lambda s: s[0][1])]
    (tmp_path / "responses.jsonl").write_text("\n".join(lines) + "\n")
    # Imported on 2 processes, each holding half of the model: the same bytes as one process's sampling.
    run_tool("import_dref.py", *common, "--responses", tmp_path / "responses.jsonl", "--out", tmp_path / "imported",
             nproc=2)
    sampled, imported = tree(tmp_path / "sampled"), tree(tmp_path / "imported")
    assert {name for name in imported if name.startswith("shard-")} == {name for name in sampled if name.startswith("shard-")}
    assert all(imported[name] == sampled[name] for name in sampled if name.startswith("shard-"))
    info = Manifest.read(tmp_path / "imported", "dref").info
    assert info["sampling"] == {"num_samples": 2} and info["created_by"] == "tools/import_dref.py"
    assert info["imported"]["responses_sha256"].startswith("sha256:")
    assert info["pairs_fingerprint"] == manifest_fingerprint(stories["pairs"])
    assert Manifest.read(tmp_path / "imported", "dref").shards == manifest.shards  # names, counts, lengths


@pytest.mark.unit
def test_imported_text_is_tokenized_and_bad_lines_are_named(stories, tmp_path):
    from mpo_dist.errors import InputError
    from mpo_dist.producers.import_dref import read_external_responses
    from mpo_dist.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(stories["model"])
    pairs = Manifest.read(stories["pairs"])
    keys = [key for shard in pairs.shards for key, _, _ in ShardCursor(stories["pairs"] / shard.name, "pairs", shard.num_samples)]
    path = tmp_path / "responses.jsonl"

    def read(lines: list[dict]):
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return read_external_responses(path, stories["pairs"], tokenizer, [2, 13], 512)

    lines = [{"key": key, "response": "Once upon a time", "stop_reason": "eos"} for key in keys]
    lines[1] = {"key": keys[1], "response": "Once upon a time"}
    lines[2] = {"key": keys[2], "response_ids": [403, 407, 13]}
    responses = read(lines)
    assert responses.per_pair == 1
    ids, reason = responses.by_key[keys[0]][0]
    assert ids.tolist() == [403, 407, 261, 378, 2] and reason == "eos"  # the first stop id appended
    assert [(i.tolist(), r) for i, r in responses.by_key[keys[1]]] == [([403, 407, 261, 378], "length")]
    assert [(i.tolist(), r) for i, r in responses.by_key[keys[2]]] == [([403, 407, 13], "eos")]  # ends at a stop id
    with pytest.raises(InputError, match=rf"every pair needs the same number of responses K, the most any pair has \(2\), but '{keys[1]}' has 1 \({len(keys) - 1} pairs differ\)"):
        read(lines + [lines[0]])
    with pytest.raises(InputError, match=r"1 keys are not pairs of --pairs .* \(e.g. 'nope'\)"):
        read(lines + [{"key": "nope", "response": "x"}])
    with pytest.raises(InputError, match=rf"line {len(keys) + 1}: give exactly one of \"response\""):
        read(lines + [{"key": keys[0], "response": "x", "response_ids": [1]}])
    with pytest.raises(InputError, match=r"line 2: token ids must be in \[0, 512\)"):
        read([lines[0], {"key": keys[1], "response_ids": [5, 512]}])
