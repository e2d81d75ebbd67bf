"""The pre-launch planner (mpo_dist/plan.py, tools/plan.py): its terms scale as the sharding says,
the activation term is what autograd really saves, and the verdict says what to change."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from dataclasses import replace

import pytest
import torch

from mpo_dist.config import ModelConfig, ParallelConfig, load_config
from mpo_dist.errors import InputError
from mpo_dist.plan import (GIB, Batch, Cluster, build_shape, inference_memory, layer_activation_bytes_per_token,
                           planning_model_config, training_changes, training_memory, training_traffic, verdict)
from support import REPO

pytestmark = pytest.mark.unit

LLAMA_8B = ModelConfig(path="/nowhere/Llama-3.1-8B-Instruct", dtype="bfloat16")
LLAMA_70B = ModelConfig(path="/nowhere/Llama-3.3-70B-Instruct", dtype="bfloat16")
H100S = Cluster(nodes=1, gpus_per_node=8, memory_bytes=80 * GIB)
BATCH = Batch(rows=8, width=1024, head_positions=8 * 1024)


@pytest.fixture(scope="module")
def shape_8b():
    return build_shape(LLAMA_8B)[0]


@pytest.fixture(scope="module")
def shape_70b():
    return build_shape(LLAMA_70B)[0]


def test_the_built_in_shapes_are_llama_3_8b_and_70b(shape_8b, shape_70b):
    assert (shape_8b.params, shape_8b.layers, shape_8b.hidden, shape_8b.kv_heads) == (8_030_261_248, 32, 4096, 8)
    assert (shape_70b.params, shape_70b.layers, shape_70b.hidden, shape_70b.intermediate) == (70_553_706_496, 80, 8192, 28672)
    assert shape_8b.root_params == 2 * 128256 * 4096 + 4096  # embeddings, head, final norm: one FSDP unit


def test_a_model_folder_that_is_not_here_needs_a_known_name_or_a_config():
    kwargs, source = planning_model_config(LLAMA_70B)
    assert kwargs["num_hidden_layers"] == 80 and "built-in llama-3-70b" in source
    assert planning_model_config(ModelConfig(config={"model_type": "llama", "hidden_size": 64}))[1] == "model.config"
    with pytest.raises(InputError, match="--model-config"):
        planning_model_config(ModelConfig(path="/nowhere/my-model"))


def test_state_per_gpu_halves_when_the_shards_double(shape_8b):
    parallel = ParallelConfig(activation_checkpointing=True)
    eight = training_memory(shape_8b, H100S, parallel, "bfloat16", BATCH, shards=8)
    sixteen = training_memory(shape_8b, replace(H100S, nodes=2), parallel, "bfloat16", BATCH, shards=16)
    for name in ("parameters", "gradients", "optimizer"):
        assert sixteen.term(name) == pytest.approx(eight.term(name) / 2)
    assert eight.term("parameters") == pytest.approx(4 * shape_8b.params / 8)  # float32 master weights
    assert eight.term("optimizer") == pytest.approx(2 * eight.term("parameters"))  # two AdamW moments
    assert sixteen.term("activations") == eight.term("activations")  # the batch per rank is unchanged
    assert sixteen.peak_bytes < eight.peak_bytes


def test_activation_checkpointing_lowers_activations(shape_8b):
    without = training_memory(shape_8b, H100S, ParallelConfig(activation_checkpointing=False), "bfloat16", BATCH, 8)
    with_ = training_memory(shape_8b, H100S, ParallelConfig(activation_checkpointing=True), "bfloat16", BATCH, 8)
    assert with_.term("activations") < without.term("activations") / 10
    assert with_.peak_bytes < without.peak_bytes


def _saved_bytes(layers: int, dtype: torch.dtype, rows: int = 2, width: int = 48) -> int:
    """Bytes autograd saves (parameters excluded) in the log-prob forward of a tiny random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mpo_dist.logprobs import sequence_logprobs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    lm = LlamaForCausalLM(config).to(dtype)
    lm.config._attn_implementation = "sdpa"
    parameters = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(3, 128, (rows, width))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sequence_logprobs(lm, ids, mask, mask)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_activation_term_is_what_autograd_saves_per_layer(dtype):
    from mpo_dist.model import build_model

    model = ModelConfig(config=dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=176,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    from mpo_dist.plan import ModelShape

    shape = ModelShape.of(build_model(model))
    per_layer = (_saved_bytes(3, dtype) - _saved_bytes(1, dtype)) / 2 / (2 * 48)
    assert layer_activation_bytes_per_token(shape, dtype.itemsize) == per_layer


def test_offload_moves_parameters_gradients_and_optimizer_to_the_host(shape_70b):
    on_gpus = training_memory(shape_70b, H100S, ParallelConfig(activation_checkpointing=True), "bfloat16", BATCH, 8)
    offloaded = training_memory(shape_70b, H100S, ParallelConfig(activation_checkpointing=True, cpu_offload=True),
                                "bfloat16", BATCH, 8)
    names = {t.name for t in offloaded.terms}
    assert not names & {"parameters", "gradients", "optimizer"}
    assert offloaded.host_bytes == pytest.approx(16 * shape_70b.params / 8)
    assert offloaded.peak_bytes < 80 * GIB < on_gpus.peak_bytes


def test_the_verdict_says_what_does_not_fit_and_what_would(shape_70b):
    parallel = ParallelConfig(activation_checkpointing=False)
    plan = training_memory(shape_70b, H100S, parallel, "bfloat16", BATCH, 8)
    result = verdict(plan, H100S.memory_bytes, lambda: training_changes(shape_70b, H100S, parallel, "bfloat16", BATCH, 8, 1))
    assert not result.fits and result.largest.name == "activations"
    assert result.advice[0].startswith("parallel.activation_checkpointing=true: peak")
    # Offload alone leaves 8 rows x 1024 positions of activations without checkpointing: still too many.
    assert any(a.startswith("parallel.cpu_offload=true") and a.endswith("(still does not fit)") for a in result.advice)
    assert any(a.startswith("shard over") for a in result.advice)
    sixty_four = Cluster(nodes=8, gpus_per_node=8, memory_bytes=80 * GIB)
    fitting = training_memory(shape_70b, sixty_four, ParallelConfig(activation_checkpointing=True), "bfloat16", BATCH, 64)
    assert verdict(fitting, sixty_four.memory_bytes).fits


def test_traffic_stays_in_the_node_under_hsdp_and_crosses_nodes_when_a_shard_group_spans_them(shape_8b):
    two_nodes = Cluster(nodes=2, gpus_per_node=8, memory_bytes=80 * GIB)
    hsdp = training_traffic(shape_8b, two_nodes, "bfloat16", replicate=2, shards=8, resharded=True, grad_accum=1)
    fsdp = training_traffic(shape_8b, two_nodes, "bfloat16", replicate=1, shards=16, resharded=True, grad_accum=1)
    assert hsdp.intra_node > 0 and 0 < hsdp.inter_node < hsdp.intra_node
    assert hsdp.inter_node == pytest.approx(2 * 0.5 * 4 * shape_8b.params / 8)  # all-reduce of float32 gradient shards
    assert fsdp.intra_node == 0 and fsdp.inter_node > hsdp.inter_node


def test_sharded_inference_holds_a_share_of_the_model_and_sampling_a_kv_cache(shape_70b):
    batch = Batch(rows=8, width=1024, head_positions=8 * 1024)
    one = inference_memory(shape_70b, H100S, "bfloat16", "score", 1, batch)
    eight = inference_memory(shape_70b, H100S, "bfloat16", "score", 8, batch)
    assert one.term("parameters") == pytest.approx(2 * shape_70b.params) and eight.term("parameters") == pytest.approx(one.term("parameters") / 8)
    assert eight.peak_bytes < 80 * GIB < one.peak_bytes
    evaluate = inference_memory(shape_70b, H100S, "bfloat16", "evaluate", 8, batch)
    assert evaluate.term("parameters") == pytest.approx(2 * eight.term("parameters"))  # policy and reference
    sample = inference_memory(shape_70b, H100S, "bfloat16", "sample", 8, batch, max_new_tokens=512)
    assert sample.term("KV cache") == 8 * (1024 + 512) * 80 * 2 * 8 * 128 * 2
    assert set(eight.moments) == {"forward"}  # a GPU's memory never holds the mapped weight files


def test_on_a_cpu_reading_the_weights_maps_the_ranks_slices_beside_its_shard(shape_8b):
    """Small batch: the peak is reading the weights, the shard twice (copy and mapped pages) plus the runtime."""
    batch = Batch(rows=2, width=64, head_positions=64)
    for shards in (1, 2):
        plan = inference_memory(shape_8b, Cluster(nodes=1, gpus_per_node=2, memory_bytes=64 * GIB, device="cpu"),
                                "bfloat16", "score", shards, batch)
        shard = 2 * shape_8b.params / shards
        assert plan.moments["reading the weights"] == pytest.approx(2 * shard + plan.term("runtime"))
        assert plan.peak_bytes == max(plan.moments.values()) == plan.moments["reading the weights"]
        evaluate = inference_memory(shape_8b, Cluster(nodes=1, gpus_per_node=2, memory_bytes=64 * GIB, device="cpu"),
                                    "bfloat16", "evaluate", shards, batch)  # two models, read one after the other
        assert evaluate.moments["reading the weights"] == pytest.approx(3 * shard + plan.term("runtime"))


def _plan_tool():
    spec = importlib.util.spec_from_file_location("_plan_tool", REPO / "tools" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan_output(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _plan_tool().main(list(argv)) == 0
    return out.getvalue()


def test_the_cli_plans_the_8b_config_on_one_node_of_80_gb():
    config = str(REPO / "configs" / "llama-8b.yaml")
    text = _plan_output(config, "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gib", "80", "parallel.dp_replicate=1")
    assert "8.03B parameters, 32 layers, hidden 4096, vocab 128256 (from the built-in llama-3-8b shape" in text
    assert "mesh: dp_replicate 1 x dp_shard 8; 4 pairs per rank per micro-batch = 12 rows x 1024 positions" in text
    shape = build_shape(LLAMA_8B)[0]
    assert f"  {'parameters':<20} {f'{4 * shape.params / 8 / GIB:,.2f} GiB':>14}  float32 sharded" in text
    assert "verdict: fits: peak" in text and "of 80.00 GiB" in text
    assert "positions/s over 8 GPUs" in text and "GB within a node, 0.0 GB across nodes" in text


def test_the_cli_says_what_to_change_when_it_does_not_fit():
    config = str(REPO / "configs" / "llama-8b.yaml")
    text = _plan_output(config, "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory-gib", "24", "parallel.dp_replicate=1",
                        "parallel.activation_checkpointing=false", "training.global_batch_size=8")
    assert "verdict: does not fit: peak" in text and "> 24.00 GiB; largest term: activations" in text
    advice = text.split("what to change (each alone):\n")[1].splitlines()
    assert advice[0].startswith("  - parallel.activation_checkpointing=true: peak")
    assert any("data.batch_size=1" in line for line in advice)
    assert any("parallel.cpu_offload=true" in line and "host" in line for line in advice)


def test_the_cli_reads_the_longest_row_from_the_pairs_manifest(tmp_path):
    from mpo_dist.benchmark import write_workload_pairs

    write_workload_pairs(tmp_path / "pairs", 8, prompt=20, response=50, vocab=128, seed=0)
    config = str(REPO / "configs" / "tiny_cpu.yaml")
    text = _plan_output(config, "--device", "cpu", "--gpus-per-node", "2", "model.path=", f"data.pairs={tmp_path / 'pairs'}",
                        "model.config={model_type: llama, vocab_size: 128, hidden_size: 64, intermediate_size: 176, "
                        "num_hidden_layers: 2, num_attention_heads: 4}", "loss.tau=0", "data.bucket_shapes=false")
    assert "longest row 70 (the longest pair of data.pairs" in text
    assert "16 pairs per rank per micro-batch = 32 rows x 70 positions" in text
    assert "runtime" in text and "(measured)" in text
    assert load_config(config, []).data.batch_size == 16
