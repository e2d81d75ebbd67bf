"""DCP metadata read under the allowlist: as today's Python pickles it, as Python 3.11.0-3.11.4 pickle it
(enum members as getattr(EnumClass, name): Debian bookworm's Python, the container test's base), and
never a getattr that is not an enum member's."""

from __future__ import annotations

import enum
import io
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mpo_dist.dcp_reader import SafeFileSystemReader

pytestmark = pytest.mark.unit


class OldEnumPickler(pickle.Pickler):
    """Pickles enum members the way Python 3.11.0-3.11.4 do: getattr(EnumClass, name)."""

    def __init__(self, file):
        super().__init__(file)
        self.rewritten = 0

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            self.rewritten += 1
            return getattr, (type(obj), obj.name)
        return NotImplemented


@pytest.fixture
def checkpoint(tmp_path):
    state = {"weight": torch.arange(6.0).reshape(2, 3), "blob": io.BytesIO(b"rank-local bytes"), "step": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    return tmp_path


def test_metadata_pickled_by_older_python_3_11_loads_the_same(checkpoint):
    expected = SafeFileSystemReader(str(checkpoint)).read_metadata()
    with open(checkpoint / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)  # noqa: S301 (our own file, to re-pickle it)
    buffer = io.BytesIO()
    pickler = OldEnumPickler(buffer)
    pickler.dump(metadata)
    assert pickler.rewritten >= 1  # the metadata does hold enum members
    (checkpoint / ".metadata").write_bytes(buffer.getvalue())

    loaded = SafeFileSystemReader(str(checkpoint)).read_metadata()
    assert loaded.state_dict_metadata == expected.state_dict_metadata
    target = {"weight": torch.zeros(2, 3), "blob": io.BytesIO(), "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=str(checkpoint), storage_reader=SafeFileSystemReader(str(checkpoint)),
                 no_dist=True)
    assert torch.equal(target["weight"], torch.arange(6.0).reshape(2, 3)) and target["step"] == 7


class GetattrOnSize:
    """A getattr that is not an enum member's lookup, on a class the allowlist admits."""

    def __reduce__(self):
        return getattr, (torch.Size, "__class__")


def test_getattr_other_than_an_enum_member_is_refused(checkpoint):
    (checkpoint / ".metadata").write_bytes(pickle.dumps(GetattrOnSize()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to call getattr on <class 'torch.Size'>"):
        SafeFileSystemReader(str(checkpoint)).read_metadata()
