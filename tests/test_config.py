"""Config loading: defaults, YAML, dotted overrides, and error messages that name key and source."""

import re
from dataclasses import fields
from pathlib import Path

import pytest

from mpo_dist.config import (Config, ConfigError, DataConfig, describe_config, grad_accum_for, load_config,
                             save_config)

pytestmark = pytest.mark.unit

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
# The two keys validation requires; everything else may stay at its default.
REQUIRED = ["data.pairs=some/pairs", "model.config={model_type: llama}", "data.reference=some/ref"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


def test_tiny_cpu_config_loads():
    config = load_config(str(TINY))
    assert config.model.path == "outputs/quickstart/toy/model" and config.model.config == {}
    assert config.model.dtype == "auto"  # float32 on a CPU that would emulate bfloat16
    assert config.data.pairs == "outputs/quickstart/pairs/train" and config.eval.pairs == "outputs/quickstart/pairs/eval"
    assert config.data.batch_size == 16 and config.training.global_batch_size == 32
    assert (config.loss.name, config.loss.beta, config.loss.tau) == ("mpo", 0.1, 0.05)
    assert config.data.dref == "outputs/quickstart/dref/train" and config.eval.dref == "outputs/quickstart/dref/eval"
    assert config.optim.lr == 3e-3 and isinstance(config.optim.lr, float)
    assert config.training.steps == 120
    assert config.job.output_dir == "outputs/quickstart/run"


def test_defaults():
    config = load_config(None, REQUIRED)
    expected = Config()
    expected.data.pairs, expected.model.config = "some/pairs", {"model_type": "llama"}
    expected.data.reference = "some/ref"
    assert config == expected
    assert config.optim.lr == 1e-6 and config.optim.betas == [0.9, 0.95]
    assert config.data.batching == "fixed" and config.data.shuffle is True
    assert DataConfig().batch_size == 8


def test_defaults_are_not_shared():
    a, b = Config(), Config()
    a.optim.betas.append(0.5)
    a.model.config["x"] = 1
    assert b.optim.betas == [0.9, 0.95] and b.model.config == {}


def test_overrides_change_value_and_type():
    config = load_config(str(TINY), ["optim.lr=3e-6", "data.shuffle=false", "optim.betas=[0.9,0.99]",
                                     "training.steps=7", "model.path=", "model.config={model_type: llama, vocab_size: 512}",
                                     "model.config.hidden_size=32", "job.output_dir=123"])
    assert config.optim.lr == 3e-6 and isinstance(config.optim.lr, float)
    assert config.data.shuffle is False
    assert config.optim.betas == [0.9, 0.99]
    assert config.training.steps == 7
    assert config.model.config["hidden_size"] == 32 and config.model.config["vocab_size"] == 512
    assert config.job.output_dir == "123"  # str fields keep the command-line text


def test_float_accepts_int_and_yaml_exponent_string(tmp_path):
    # PyYAML reads `3e-6` (no dot) as a string; float fields must still accept it.
    path = write(tmp_path, "data: {pairs: p, reference: r}\nmodel: {config: {a: 1}}\noptim: {lr: 3e-6, eps: 1}\n")
    config = load_config(str(path))
    assert config.optim.lr == 3e-6 and config.optim.eps == 1.0 and isinstance(config.optim.eps, float)


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "data:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    msg = str(e.value)
    assert "data.batch_sise" in msg and str(path) in msg
    assert "did you mean 'batch_size'" in msg and "dref_batch_size" in msg  # lists the valid keys


def test_unknown_section(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown section 'optimizer'.*did you mean 'optim'"):
        load_config(str(path))


def test_section_not_a_mapping(tmp_path):
    path = write(tmp_path, "loss: 3\n")
    with pytest.raises(ConfigError, match=r"section 'loss' must be a mapping"):
        load_config(str(path))


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: eight\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "data.batch_size: expected int, got 'eight' (str)" in str(e.value)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("value, got", [("true", "True (bool)"), ("1.5", "1.5 (float)")])
def test_int_rejects_bool_and_fraction(value, got):
    with pytest.raises(ConfigError, match=re.escape(f"training.steps: expected int, got {got} (command line)")):
        load_config(str(TINY), [f"training.steps={value}"])


@pytest.mark.parametrize("override, expected", [
    ("data.shuffle=1", "data.shuffle: expected bool"),
    ("optim.lr=fast", "optim.lr: expected float"),
    ("optim.betas=[0.9,x]", "optim.betas: expected list[float]"),
    ("model.config=3", "model.config: expected dict"),
])
def test_other_wrong_types(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(str(TINY), [override])


def test_literal_choice_lists_choices():
    with pytest.raises(ConfigError) as e:
        load_config(str(TINY), ["loss.name=kto"])
    assert "loss.name: expected one of 'mpo', 'dpo', 'ipo', got 'kto'" in str(e.value)


def test_beta_must_be_positive(tmp_path):
    text = TINY.read_text().replace("beta: 0.1", "beta: -1")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == f"loss.beta must be > 0, got -1.0 ({path})"


def test_range_error_names_command_line():
    with pytest.raises(ConfigError, match=r"loss\.beta must be > 0, got 0\.0 \(command line\)"):
        load_config(str(TINY), ["loss.beta=0"])


def test_tokens_batching_needs_max_tokens():
    with pytest.raises(ConfigError) as e:
        load_config(str(TINY), ["data.batching=tokens", "training.global_batch_size=0"])
    msg = str(e.value)
    assert msg.startswith("data.max_tokens must be > 0 when data.batching=tokens")
    assert "data.batching=fixed" in msg and "data.batching from command line" in msg
    assert load_config(str(TINY), ["data.batching=tokens", "data.max_tokens=4096",
                                   "training.global_batch_size=0"]).data.max_tokens == 4096
    with pytest.raises(ConfigError, match="training.global_batch_size counts pairs and needs data.batching=fixed"):
        load_config(str(TINY), ["data.batching=tokens", "data.max_tokens=4096"])


@pytest.mark.parametrize("override, expected", [
    ("optim.betas=[0.9]", "optim.betas must be two values each in [0, 1)"),
    ("loss.label_smoothing=0.5", "loss.label_smoothing must be in [0, 0.5)"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("data.pairs=", "data.pairs is required"),
    ("model.config={model_type: llama}", "model.path and model.config are both set"),
    ("data.dref=", "loss.tau > 0 needs D_ref samples: set data.dref"),
    ("data.reference=", "data.reference is required"),
    ("parallel.dp_shard=0", "parallel.dp_shard must be >= 1 or -1"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1]"),
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1"),
    ("job.preempt_signals=SIGTERM,USR9", "job.preempt_signals 'USR9' is not a signal name"),
])
def test_range_and_cross_field_checks(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(str(TINY), [override])
    assert expected in str(e.value) and "command line" in str(e.value)


@pytest.mark.parametrize("override, expected", [
    ("optim.lr", "must look like section.key=value (command line)"),
    ("lr=3e-6", "must look like section.key=value (command line)"),
    ("optim.lrr=1", "unknown key optim.lrr (command line); did you mean 'lr'"),
    ("optim.betas=[0.9", "value is not valid YAML (command line)"),
    ("optim.lr.x=1", "optim.lr is a float, not a mapping (command line)"),
])
def test_override_errors_name_command_line(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(str(TINY), [override])
    assert expected in str(e.value)


def test_malformed_yaml_names_file(tmp_path):
    path = write(tmp_path, "data:\n  pairs: [unclosed\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {path} is not valid YAML")):
        load_config(str(path))


def test_top_level_not_a_mapping(tmp_path):
    path = write(tmp_path, "- data\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {path} must be a mapping")):
        load_config(str(path))


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"config file not found: {missing}")):
        load_config(str(missing))


def test_save_load_round_trip(tmp_path):
    config = load_config(str(TINY), ["optim.lr=3e-6", "data.shuffle=false", "loss.name=ipo", "loss.tau=0"])
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config(str(path)) == config


def test_describe_config_lists_every_field():
    table = describe_config()
    for section in fields(Config):
        for f in fields(section.type):
            row = next(line for line in table.splitlines() if line.startswith(f"| `{section.name}.{f.name}` |"))
            assert f.metadata["help"] in row
    assert "| `optim.lr` | float | `1e-06` |" in table
    assert "one of 'mpo', 'dpo', 'ipo'" in table


def test_loss_options_of_another_loss_are_errors():
    with pytest.raises(ConfigError, match=r"loss.tau applies to loss.name=mpo only \(loss.name=dpo\)"):
        load_config(str(TINY), ["loss.name=dpo"])
    with pytest.raises(ConfigError, match=r"loss.label_smoothing applies to loss.name=dpo only"):
        load_config(str(TINY), ["loss.label_smoothing=0.1"])
    assert load_config(str(TINY), ["loss.name=dpo", "loss.tau=0", "loss.label_smoothing=0.1"]).loss.label_smoothing == 0.1


def test_loss_options_default_off():
    loss = load_config(str(TINY)).loss
    assert (loss.length_normalized_pair, loss.length_normalized_tau, loss.pair_logit_scale, loss.chosen_nll) == (
        False, False, 1.0, 0.0)
    assert isinstance(loss.pair_logit_scale, float) and isinstance(loss.chosen_nll, float)


@pytest.mark.parametrize("overrides, message", [
    (["loss.pair_logit_scale=0"], "loss.pair_logit_scale must be > 0, got 0.0 (command line)"),
    (["loss.pair_logit_scale=-0.5"], "loss.pair_logit_scale must be > 0, got -0.5 (command line)"),
    (["loss.pair_logit_scale=inf"], "loss.pair_logit_scale must be finite (not NaN or inf), got inf (command line)"),
    (["loss.pair_logit_scale=nan"], "loss.pair_logit_scale must be finite (not NaN or inf), got nan (command line)"),
    (["loss.name=dpo", "loss.tau=0", "loss.pair_logit_scale=0.5"],
     "loss.pair_logit_scale applies to loss.name=mpo only (loss.name=dpo); DPO and IPO scale the pair logit by "
     "loss.beta, got 0.5 (command line)"),
    (["loss.name=ipo", "loss.tau=0", "loss.pair_logit_scale=2"],
     "loss.pair_logit_scale applies to loss.name=mpo only (loss.name=ipo); DPO and IPO scale the pair logit by "
     "loss.beta, got 2.0 (command line)"),
    (["loss.chosen_nll=-0.1"], "loss.chosen_nll must be >= 0, got -0.1 (command line)"),
    (["loss.chosen_nll=inf"], "loss.chosen_nll must be finite (not NaN or inf), got inf (command line)"),
    (["loss.name=dpo", "loss.tau=0", "loss.length_normalized_tau=true"],
     "loss.length_normalized_tau applies to loss.name=mpo only (loss.name=dpo), got True (command line)"),
    (["loss.length_normalized_pair=1"], "loss.length_normalized_pair: expected bool, got 1 (int) (command line)"),
])
def test_bad_loss_option_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(str(TINY), overrides)
    assert str(e.value) == message


def test_loss_options_that_apply_load():
    mpo = load_config(str(TINY), ["loss.length_normalized_pair=true", "loss.length_normalized_tau=true",
                                  "loss.pair_logit_scale=0.1", "loss.chosen_nll=0.5"]).loss
    assert (mpo.length_normalized_pair, mpo.length_normalized_tau, mpo.pair_logit_scale, mpo.chosen_nll) == (True, True, 0.1, 0.5)
    for name in ("dpo", "ipo"):  # length normalisation of the pair and the chosen NLL apply to every loss
        loss = load_config(str(TINY), [f"loss.name={name}", "loss.tau=0", "loss.length_normalized_pair=true",
                                       "loss.chosen_nll=0.2", "loss.pair_logit_scale=1"]).loss
        assert (loss.name, loss.length_normalized_pair, loss.chosen_nll) == (name, True, 0.2)


@pytest.mark.parametrize("global_batch, batch, ranks, accum", [(64, 8, 2, 4), (16, 8, 2, 1), (48, 4, 3, 4), (24, 24, 1, 1)])
def test_global_batch_sets_the_accumulation(global_batch, batch, ranks, accum):
    config = load_config(str(TINY), [f"training.global_batch_size={global_batch}", f"data.batch_size={batch}"])
    assert grad_accum_for(config, ranks) == accum
    assert accum * batch * ranks == global_batch  # a step holds exactly the global batch at any world size


def test_without_global_batch_the_accumulation_is_as_configured():
    config = load_config(str(TINY), ["training.global_batch_size=0", "training.grad_accum=3"])
    assert grad_accum_for(config, 2) == 3 and grad_accum_for(config, 8) == 3


@pytest.mark.parametrize("global_batch, ranks", [(30, 2), (8, 2)])
def test_global_batch_that_does_not_divide_names_the_options(global_batch, ranks):
    config = load_config(str(TINY), [f"training.global_batch_size={global_batch}", "data.batch_size=8"])
    with pytest.raises(ConfigError, match=rf"training.global_batch_size={global_batch} is not a multiple of "
                                          rf"data.batch_size \(8\) x data-parallel ranks \({ranks}\)"):
        grad_accum_for(config, ranks)


@pytest.mark.parametrize("override, shown", [
    ("loss.beta=inf", "inf"), ("loss.beta=nan", "nan"), ("loss.beta=.inf", "inf"), ("loss.tau=inf", "inf"),
    ("optim.lr=inf", "inf"), ("optim.lr=-.inf", "-inf"), ("optim.eps=nan", "nan"), ("optim.weight_decay=inf", "inf"),
    ("optim.betas=[0.9, .nan]", "[0.9, nan]"), ("training.max_grad_norm=inf", "inf"),
    ("metrics.peak_tflops=nan", "nan"), ("optim.min_lr_ratio=nan", "nan"),
])
def test_non_finite_float_options_are_config_errors(override, shown):
    """NaN passes no range check and inf passes most: every float option must be finite (a NaN or
    inf hyper-parameter makes the loss non-finite from the first step)."""
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(str(TINY), [override])
    assert str(e.value) == f"{key} must be finite (not NaN or inf), got {shown} (command line)"


def test_label_smoothing_nan_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape("loss.label_smoothing must be finite (not NaN or inf), got nan")):
        load_config(str(TINY), ["loss.name=dpo", "loss.tau=0", "loss.label_smoothing=nan"])


def test_max_nonfinite_steps_defaults_to_10_and_must_be_positive():
    assert load_config(str(TINY)).training.max_nonfinite_steps == 10
    assert load_config(str(TINY), ["training.max_nonfinite_steps=1"]).training.max_nonfinite_steps == 1
    with pytest.raises(ConfigError, match=re.escape("training.max_nonfinite_steps must be >= 1, got 0 (command line)")):
        load_config(str(TINY), ["training.max_nonfinite_steps=0"])
