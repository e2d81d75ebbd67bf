"""The inputs of docs/threat-model.md other than a checkpoint's .metadata (tests/test_pickle_allowlist.py)
are data too: a YAML config builds no Python object, a shard record holds no object array, a model
folder's custom code and pickled .bin weights never run. Each hostile input would create MARKER."""

from __future__ import annotations

import builtins
import json
import os
import zlib

import numpy as np
import pytest
import torch

from mpo_dist.config import ConfigError, ModelConfig, load_config
from mpo_dist.errors import InputError, MissingInputError

pytestmark = pytest.mark.unit

SYSTEM = '!!python/object/apply:os.system ["touch {marker}"]'


def test_a_yaml_config_builds_no_python_object(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "config.yaml"
    path.write_text(f"job:\n  seed: {SYSTEM.format(marker=marker)}\n")
    with pytest.raises(ConfigError, match=f"config file {path} is not valid YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="value is not valid YAML"):
        load_config(None, [f"job.seed={SYSTEM.format(marker=marker)}"])
    assert not marker.exists()


@pytest.mark.parametrize("dtype", ["|O", {"names": ["field"], "formats": ["|O"]}], ids=["object", "struct-with-object"])
def test_a_shard_record_holds_no_python_object(dtype):
    """A record is a JSON header and raw arrays read with np.frombuffer: an object dtype (what would
    need pickle) is refused."""
    from mpo_dist.data.shards import decode_record, encode_record

    good = encode_record({"key": "a"}, {"ids": np.arange(2, dtype=np.int32)})
    header = json.dumps({"meta": {"key": "a"}, "arrays": [["ids", dtype, 1]]}).encode()
    body = len(header).to_bytes(4, "little") + header + bytes(8)
    hostile = b"MPO2" + zlib.crc32(body).to_bytes(4, "little") + body  # a checksum is no defence: its writer computes it
    assert decode_record(good)[0] == {"key": "a"}
    with pytest.raises(ValueError, match="(?i)object"):
        decode_record(hostile)


@pytest.fixture
def custom_code_folder(tmp_path):
    """A model folder whose config and tokenizer name custom code (auto_map) that would create MARKER."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "evil.py").write_text("from pathlib import Path\nPath(__file__).with_name('MARKER').write_text('ran')\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "evil_unknown", "auto_map": {"AutoConfig": "evil.Config"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tokenizer", None]},
                                                              "tokenizer_class": "Tokenizer"}))
    return folder


def test_a_model_folders_custom_code_never_runs(custom_code_folder, monkeypatch):
    """mpo_dist passes trust_remote_code=False: transformers refuses custom code without asking (on a
    terminal it would otherwise ask; answered "y" here, and still nothing runs)."""
    from mpo_dist.model import load_model_config
    from mpo_dist.tokenizer import load_tokenizer

    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(InputError, match=r"model.path .*: cannot read its config.json \(.* contains custom code"):
        load_model_config(ModelConfig(path=str(custom_code_folder)))
    with pytest.raises(InputError, match="cannot load a tokenizer"):
        load_tokenizer(custom_code_folder)
    config = json.loads((custom_code_folder / "config.json").read_text())
    (custom_code_folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert type(load_model_config(ModelConfig(path=str(custom_code_folder)))).__name__ == "LlamaConfig"  # built in
    assert not (custom_code_folder / "MARKER").exists() and asked == []


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_bin_weights_never_run(tmp_path):
    """The trainer reads safetensors only; reference and evaluation tools load through transformers,
    which reads a .bin with torch.load(weights_only=True)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mpo_dist.model import load_pretrained_weights

    marker, folder = tmp_path / "MARKER", tmp_path / "model"
    LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(str(folder))
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(MissingInputError, match=r"no \*.safetensors weights"):
        load_pretrained_weights(torch.nn.Linear(1, 1), folder)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert not marker.exists()
