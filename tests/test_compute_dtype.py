"""model.dtype=auto and the tools' --dtype auto (mpo_dist/compute_dtype.py): bfloat16 where the device
computes it natively, float32 on a CPU that would emulate it (10-50x slower). The trainer and the tools
say what they chose, a bfloat16 forced where it is emulated is warned about, and what is recorded in
manifests and compared before training is the resolved name, never `auto`. The CPU probe is faked
(torch's capability readings), so every case runs on any machine."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import fully_shard

from support import QUIET, TRAIN_CONFIG, run_tool, toy_overrides
from mpo_dist.compute_dtype import choose_dtype, resolve_dtype
from mpo_dist.config import load_config
from mpo_dist.data.shards import Manifest
from mpo_dist.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

AVX2 = ("AVX2", {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False})
# AVX512 without its BF16 extension: oneDNN runs bf16 matmuls there, but by converting to float32 (no gain).
AVX512 = ("AVX512", {**AVX2[1], "avx512_f": True})
SAPPHIRE_RAPIDS = ("AVX512", {**AVX512[1], "avx512_bf16": True, "amx_bf16": True, "amx_tile": True})
GRAVITON3 = ("SVE256", {"architecture": "aarch64", "neon": True, "bf16": True, "sve": True, "sve_bf16": True})


def fake_cpu(monkeypatch, cpu: tuple[str, dict], onednn_bf16: bool) -> None:
    level, features = cpu
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: features)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)


# ------------------------------------------------------------------------------------------ resolving


@pytest.mark.unit
@pytest.mark.parametrize("cpu, onednn_bf16", [(AVX2, False), (AVX512, True), (SAPPHIRE_RAPIDS, False)],
                         ids=["avx2", "avx512-without-bf16", "bf16-instructions-without-onednn-kernels"])
def test_auto_is_float32_on_a_cpu_that_would_emulate_bfloat16(monkeypatch, cpu, onednn_bf16):
    fake_cpu(monkeypatch, cpu, onednn_bf16)
    dtype, why = resolve_dtype("auto", "cpu")
    assert dtype == "float32"
    assert why.startswith(f"this CPU has no native bfloat16: {cpu[0]}") and "emulated, 10-50x slower" in why


@pytest.mark.unit
def test_auto_is_float32_on_avx2_with_the_line_it_prints(monkeypatch):
    fake_cpu(monkeypatch, AVX2, onednn_bf16=False)
    lines = []
    assert choose_dtype("auto", torch.device("cpu"), "model.dtype", "mpo_dist", log=lines.append) == "float32"
    assert lines == ["mpo_dist: model.dtype=auto -> float32 (this CPU has no native bfloat16: AVX2; "
                     "bfloat16 would be emulated, 10-50x slower)"]


@pytest.mark.unit
@pytest.mark.parametrize("cpu, seen", [(SAPPHIRE_RAPIDS, "AVX512 with amx_bf16, avx512_bf16"),
                                       (GRAVITON3, "SVE256 with sve_bf16, bf16")], ids=["amx", "arm-bf16"])
def test_auto_is_bfloat16_on_a_cpu_that_computes_it(monkeypatch, cpu, seen):
    fake_cpu(monkeypatch, cpu, onednn_bf16=True)
    assert resolve_dtype("auto", "cpu") == ("bfloat16", f"{seen} computes bfloat16 natively")


@pytest.mark.unit
def test_auto_is_bfloat16_on_a_gpu_that_computes_it_and_float32_on_one_that_would_emulate_it(monkeypatch):
    fake_cpu(monkeypatch, AVX2, onednn_bf16=False)  # the host CPU does not matter
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("auto", torch.device("cuda", 0))[0] == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # a V100
    assert resolve_dtype("auto", "cuda")[0] == "float32"


@pytest.mark.unit
def test_a_torch_without_the_probes_resolves_auto_to_float32_without_failing(monkeypatch):
    def missing():
        raise AttributeError("not in this build")

    for target, name in [(torch.backends.cpu, "get_cpu_capability"), (torch.cpu, "get_capabilities"),
                         (torch.ops.mkldnn, "_is_mkldnn_bf16_supported")]:
        monkeypatch.setattr(target, name, missing)
    assert resolve_dtype("auto", "cpu")[0] == "float32"


@pytest.mark.unit
def test_set_names_are_kept_and_others_refused(monkeypatch):
    fake_cpu(monkeypatch, AVX2, onednn_bf16=False)
    assert resolve_dtype("float32", "cpu") == ("float32", "as set")
    assert resolve_dtype("bfloat16", "cpu")[0] == "bfloat16"  # slow, but what was asked
    with pytest.raises(InputError, match="dtype must be one of auto, float32, bfloat16, got 'float16'"):
        resolve_dtype("float16", "cpu")


@pytest.mark.unit
def test_bfloat16_set_where_it_is_emulated_is_warned_about(monkeypatch):
    fake_cpu(monkeypatch, AVX2, onednn_bf16=False)
    lines = []
    assert choose_dtype("bfloat16", "cpu", "--dtype", "score_reference", log=lines.append) == "bfloat16"
    assert lines == ["score_reference: WARNING: --dtype=bfloat16, but this CPU has no native bfloat16: AVX2; bfloat16 "
                     "would be emulated, 10-50x slower; --dtype=auto picks float32 here"]
    fake_cpu(monkeypatch, SAPPHIRE_RAPIDS, onednn_bf16=True)
    lines.clear()
    choose_dtype("bfloat16", "cpu", "--dtype", "score_reference", log=lines.append)
    assert lines == ["score_reference: --dtype=bfloat16 (as set)"]


# ------------------------------------------------------------------------------------------ the trainer


@pytest.mark.unit
def test_the_trainer_logs_what_auto_became_and_computes_in_it(toy_inputs, one_process_group, monkeypatch, capsys, tmp_path):
    from mpo_dist.trainer import Trainer

    fake_cpu(monkeypatch, AVX2, onednn_bf16=False)
    config = load_config(str(TRAIN_CONFIG), toy_overrides(toy_inputs, tmp_path / "run", **{
        "model.dtype": "auto", "data.reference_dtype_mismatch": "error", "metrics.tensorboard": "false"}))
    trainer = Trainer(config)  # the toy reference was scored in float32: no mismatch
    try:
        assert fully_shard.state(trainer.model)._mp_policy.param_dtype == torch.float32
    finally:
        trainer.close()
    assert ("mpo_dist: model.dtype=auto -> float32 (this CPU has no native bfloat16: AVX2; bfloat16 would be "
            "emulated, 10-50x slower)") in capsys.readouterr().out.splitlines()


@pytest.mark.unit
def test_the_trainer_compares_the_references_dtype_with_what_auto_became(toy_inputs, one_process_group, monkeypatch,
                                                                          capsys, tmp_path):
    """A reference scored in float32 on one machine, trained with model.dtype=auto on one that computes
    bfloat16: the mismatch is still seen (auto is resolved before the comparison)."""
    from mpo_dist.trainer import Trainer

    fake_cpu(monkeypatch, SAPPHIRE_RAPIDS, onednn_bf16=True)
    config = load_config(str(TRAIN_CONFIG), toy_overrides(toy_inputs, tmp_path / "run", **{
        "model.dtype": "auto", "data.reference_dtype_mismatch": "error", "metrics.tensorboard": "false"}))
    with pytest.raises(InputError, match="made with the reference model in float32, but model.dtype=bfloat16"):
        Trainer(config)
    assert "mpo_dist: model.dtype=auto -> bfloat16 (AVX512 with amx_bf16, avx512_bf16 computes bfloat16 natively)" \
        in capsys.readouterr().out.splitlines()


@pytest.mark.unit
def test_the_provenance_check_refuses_an_unresolved_dtype(toy_inputs):
    from mpo_dist.data.preflight import check_provenance

    pairs, reference = Manifest.read(toy_inputs["pairs"], "pairs"), Manifest.read(toy_inputs["reference"])
    with pytest.raises(ValueError, match="model_dtype must be resolved first"):
        check_provenance(pairs, toy_inputs["pairs"], reference, toy_inputs["reference"], model_dtype="auto", log=QUIET)


@pytest.mark.unit
def test_sharding_refuses_an_unresolved_dtype(one_process_group):
    from mpo_dist.config import ModelConfig, ParallelConfig
    from mpo_dist.model import build_model
    from mpo_dist.parallelize import apply_fsdp, build_mesh

    policy = build_model(ModelConfig(config={"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    with pytest.raises(ValueError, match="dtype_name must be one of float32, bfloat16 .*got 'auto'"):
        apply_fsdp(policy, build_mesh(ParallelConfig(), 1, "cpu"), ParallelConfig(), "auto")


# ------------------------------------------------------------------------------------------ the tools


@pytest.mark.unit
@pytest.mark.parametrize("cpu, onednn_bf16, expected", [(AVX2, False, torch.float32), (SAPPHIRE_RAPIDS, True, torch.bfloat16)],
                         ids=["avx2", "amx"])
def test_the_reference_is_loaded_and_recorded_in_what_auto_became(stories_inputs, monkeypatch, capsys, cpu, onednn_bf16,
                                                                  expected):
    from mpo_dist.distributed import RankInfo
    from mpo_dist.producers.score import open_reference

    fake_cpu(monkeypatch, cpu, onednn_bf16)
    name = str(expected).removeprefix("torch.")
    reference = open_reference(stories_inputs["model"], stories_inputs["pairs"], "auto", RankInfo(0, 1, 0),
                               tool="score_reference")
    assert reference.model_info["model"]["dtype"] == name  # what manifests and job files record
    assert {parameter.dtype for parameter in reference.model.parameters()} == {expected}
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("score_reference:")]
    assert len(said) == 2 and said[0].startswith(f"score_reference: --dtype=auto -> {name} (")  # once the model is accepted
    assert said[1].endswith("parameters, a whole copy per process")  # how the weights are held


@pytest.mark.e2e
def test_score_reference_defaults_to_auto_and_records_what_it_became(stories_inputs, tmp_path):
    dtype, why = resolve_dtype("auto", "cpu")  # this machine's answer, as the tool gets it
    result = run_tool("score_reference.py", "--model", stories_inputs["model"], "--pairs", stories_inputs["pairs"],
                      "--out", tmp_path / "reference", "--batch-size", 8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"score_reference: --dtype=auto -> {dtype} ({why})" in result.stderr.splitlines()
    assert Manifest.read(tmp_path / "reference").info["model"]["dtype"] == dtype
