"""DCP's `.metadata` pickle is data, never code (mpo_dist/dcp_reader.py, docs/threat-model.md).

Hand-written pickles exercise every opcode that loads a global (GLOBAL, STACK_GLOBAL, INST, EXT1/2/4)
or calls and mutates with one (REDUCE, BUILD, NEWOBJ, NEWOBJ_EX, OBJ, persistent ids), naming every
global of every module the allowlist names, dotted names and modules not imported: nothing outside the
allowlist is found, and an audit hook sees no import, file, process or attribute set on a type while
loading. Real metadata (dcp.save, the Checkpointer, two FSDP2 ranks of the trainer) loads as
`pickle.load` reads it, and the exploit that once ran a command is refused by convert_checkpoint,
evaluate and the trainer's resume=auto.
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import json
import pickle
import pkgutil
import shutil
import struct
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from support import QUIET, Counter, run_tool, toy_overrides, train
from mpo_dist.dcp_reader import SafeFileSystemReader

# The allowlist as reviewed: each entry is what DCP's own metadata pickles (see dcp_reader.py), plus
# the dtypes, which are values (never called). A change to the allowlist must change this too.
REVIEWED = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
     ("builtins", "getattr"), ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")}
DTYPES = {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
ALLOWED = REVIEWED | DTYPES

# The exploit of issue 21: a dotted name under an allowed module reaches subprocess (or io) by getattr.
POPEN = ("torch.distributed.checkpoint.metadata", "torch._strobelight.cli_function_profiler.subprocess.Popen")
FILE_IO = ("torch.distributed.checkpoint._extension", "io.FileIO")
DOTTED = [
    POPEN, FILE_IO,
    ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint._extension.io.FileIO"),
    ("torch.distributed.checkpoint.metadata", "os.system"),
    ("torch.distributed.checkpoint.filesystem", "os.system"),
    ("torch", "serialization.os.system"), ("torch", "Size.__class__"), ("torch", "Size.__new__"),
    ("torch.serialization", "_get_layout.__globals__"), ("builtins", "getattr.__self__.eval"),
    ("pathlib", "os.system"), ("pathlib", "PosixPath.__init__.__globals__"),
    ("torch.distributed.checkpoint.metadata", "Metadata.__init__.__globals__"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING.__class__"),
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"), ("io", "FileIO"),
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "__import__"), ("builtins", "open"), ("builtins", "setattr"),
]


# ----------------------------------------------------------------------------------------- the recorder

_recording: dict[int, list] = {}  # thread id -> the events raised in it while recording
_hooked = False


def _record(event: str, args: tuple) -> None:
    events = _recording.get(threading.get_ident())
    if events is not None:
        events.append((event, args))


@contextlib.contextmanager
def audited():
    """Every audit event this thread raises inside the block: "import", "open", "subprocess.Popen",
    "os.system", "os.exec", "pickle.find_class", "object.__setattr__" (on a type), ... An audit hook
    cannot be removed, so the one hook records only while a block is open."""
    global _hooked
    if not _hooked:
        sys.addaudithook(_record)
        _hooked = True
    events: list = []
    _recording[threading.get_ident()] = events
    try:
        yield events
    finally:
        del _recording[threading.get_ident()]


# ------------------------------------------------------------------------------------ pickle byte streams

def text(value: str) -> bytes:
    data = value.encode()
    if len(data) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def stream(*parts: bytes) -> bytes:
    return pickle.PROTO + bytes([4]) + b"".join(parts) + pickle.STOP


def by_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def by_stack_global(module: str, name: str) -> bytes:
    return text(module) + text(name) + pickle.STACK_GLOBAL


def by_inst(module: str, name: str) -> bytes:  # loads the global and calls it with no arguments
    return pickle.MARK + pickle.INST + f"{module}\n{name}\n".encode()


# copyreg extension codes (one per global: a global has one code) for the opcodes of each width.
EXTENSIONS = {pickle.EXT1: (251, POPEN), pickle.EXT2: (0xFADE, FILE_IO),
              pickle.EXT4: (0x7ADEFADE, ("torch.distributed.checkpoint.metadata", "os.system"))}


def by_extension(opcode: bytes) -> bytes:
    code, _ = EXTENSIONS[opcode]
    return opcode + code.to_bytes({pickle.EXT1: 1, pickle.EXT2: 2, pickle.EXT4: 4}[opcode], "little")


@contextlib.contextmanager
def extensions():
    """EXTENSIONS registered (copyreg.add_extension) for the block."""
    for code, (module, name) in EXTENSIONS.values():
        copyreg.add_extension(module, name, code)
    try:
        yield
    finally:
        for code, (module, name) in EXTENSIONS.values():
            copyreg.remove_extension(module, name, code)


def exploit(marker: Path) -> bytes:
    """Issue 21's .metadata: STACK_GLOBAL of a dotted name under an allowed module, REDUCE(["touch", MARKER])."""
    return stream(by_stack_global(*POPEN), pickle.EMPTY_LIST, pickle.MARK, text("touch"), text(str(marker)),
                  pickle.APPENDS, pickle.TUPLE1, pickle.REDUCE)


def read(data: bytes, folder: Path = Path("checkpoint")) -> tuple[object, list[tuple[str, tuple]]]:
    """`data` read as a checkpoint folder's .metadata by `SafeFileSystemReader.read_metadata`, as every
    entry point reads it, but served from memory (thousands of probes): what came back (Metadata, or
    the exception) and the audit events the read raised."""
    reader = SafeFileSystemReader(str(folder))
    reader.fs.create_stream = lambda path, mode: contextlib.nullcontext(io.BytesIO(data))
    with audited() as events:
        try:
            outcome = reader.read_metadata()
        except Exception as error:  # what was refused, or what a meaningless stream broke
            outcome = error
    return outcome, events


def read_file(folder: Path) -> tuple[object, list[tuple[str, tuple]]]:
    """FOLDER/.metadata read from disk as `read` does, without the event of opening it."""
    reader = SafeFileSystemReader(str(folder))
    with audited() as events:
        try:
            outcome = reader.read_metadata()
        except Exception as error:
            outcome = error
    return outcome, [(event, args) for event, args in events if (event, Path(args[0])) != ("open", folder / ".metadata")]


def shown(outcome) -> str:
    """An outcome for a failure message (a Metadata made without its fields has no repr)."""
    return f"{type(outcome).__name__}: {outcome}"[:100] if isinstance(outcome, BaseException) else type(outcome).__name__


def refused(outcome) -> bool:
    return isinstance(outcome, pickle.UnpicklingError) and "refusing" in str(outcome)


def wait_for(path: Path) -> bool:
    """Whether `path` appears within a moment (a command started by a pickle runs in the background)."""
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()


# -------------------------------------------------------------------------------------------- the exploit

@pytest.mark.unit
def test_the_dotted_name_exploit_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    (tmp_path / ".metadata").write_bytes(exploit(marker))
    outcome, events = read_file(tmp_path)
    assert refused(outcome) and "refusing to load " + ".".join(POPEN) in str(outcome)
    assert events == [] and not wait_for(marker)


@pytest.mark.unit
def test_io_fileio_through_the_extension_module_opens_nothing(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("kept")
    for form in (by_global, by_stack_global):
        outcome, events = read(stream(form(*FILE_IO), text(str(target)), text("w"), pickle.TUPLE2, pickle.REDUCE))
        assert refused(outcome) and events == []
    assert target.read_text() == "kept"


# ----------------------------------------------------------------------------------- the allowlist itself

@pytest.mark.unit
def test_the_allowlist_is_the_reviewed_one():
    from mpo_dist.dcp_reader import METADATA_GLOBALS

    assert set(METADATA_GLOBALS) == ALLOWED
    assert all(isinstance(METADATA_GLOBALS[key], torch.dtype) for key in DTYPES)
    assert not any("." in name for _, name in METADATA_GLOBALS)  # no attribute traversal


def probes() -> list[tuple[str, str]]:
    """Every name outside the allowlist in every module it names (and in modules an attacker wants:
    os, subprocess, io, DCP's other modules), dotted names, and modules never imported."""
    modules = {module for module, _ in ALLOWED} | {
        "os", "posix", "subprocess", "io", "sys", "copyreg", "pickle", "torch.distributed.checkpoint",
        "torch.distributed.checkpoint._extension", "torch.distributed.checkpoint.state_dict",
        "torch._strobelight.cli_function_profiler"}
    found = [(module, name) for module in sorted(modules) if module in sys.modules
             for name in sorted(vars(sys.modules[module])) if (module, name) not in ALLOWED]
    return found + DOTTED + [(module, "Anything") for module in never_imported()]


def never_imported() -> list[str]:
    """Modules no test has imported: finding a global there would import them."""
    dcp_modules = [f"torch.distributed.checkpoint.{info.name}" for info in pkgutil.iter_modules(dcp.__path__)]
    return [module for module in [*dcp_modules, "pathlib._local", "this"] if module not in sys.modules]


@pytest.mark.unit
def test_no_global_outside_the_allowlist_is_found_by_any_opcode():
    unimported = never_imported()
    assert any(module.startswith("torch.distributed.checkpoint.") for module in unimported)
    targets = probes()
    assert len(targets) > 1000
    wrong = []
    for module, name in targets:
        for form in (by_global, by_stack_global, by_inst):
            outcome, events = read(stream(form(module, name)))
            if not refused(outcome) or events:
                wrong.append((form.__name__, module, name, shown(outcome), events[:3]))
    with extensions():
        for opcode in EXTENSIONS:  # a plain load caches code -> global in copyreg, for every unpickler after it
            pickle.loads(stream(by_extension(opcode)))  # noqa: S301 (loads the global, calls nothing)
        for opcode in EXTENSIONS:
            outcome, events = read(stream(by_extension(opcode), text("true"), pickle.TUPLE1, pickle.REDUCE))
            if not refused(outcome) or events:
                wrong.append(("extension", opcode, shown(outcome), events[:3]))
    assert wrong == [], f"{len(wrong)} of {3 * len(targets) + 3} probes were not refused, e.g. {wrong[:5]}"
    assert [module for module in unimported if module in sys.modules] == []


def allowed_classes() -> list[type]:
    found = [getattr(sys.modules.get(module), name, None) for module, name in sorted(ALLOWED)]
    return [value for value in found if isinstance(value, type)]


def uses(global_ref: bytes, marker: Path) -> dict[str, bytes]:
    """What a pickle can do with a global: call it, make one, or set its state (a dict, or slots)."""
    argument = text(str(marker)) + pickle.TUPLE1
    slots = pickle.NONE + pickle.EMPTY_DICT + text("pwned") + text("yes") + pickle.SETITEM + pickle.TUPLE2
    return {
        "REDUCE": stream(global_ref, argument, pickle.REDUCE),
        "NEWOBJ": stream(global_ref, argument, pickle.NEWOBJ),
        "NEWOBJ_EX": stream(global_ref, argument, pickle.EMPTY_DICT, pickle.NEWOBJ_EX),
        "OBJ": stream(pickle.MARK, global_ref, text(str(marker)), pickle.OBJ),
        "BUILD dict": stream(global_ref, pickle.EMPTY_DICT, text("pwned"), text("yes"), pickle.SETITEM, pickle.BUILD),
        "BUILD slots": stream(global_ref, slots, pickle.BUILD),
        "BUILD after REDUCE": stream(global_ref, argument, pickle.REDUCE, slots, pickle.BUILD),
    }


@pytest.mark.unit
@pytest.mark.parametrize("form", [by_global, by_stack_global])
def test_allowed_globals_call_and_change_nothing_else(tmp_path, form):
    """Each allowed global under each opcode that uses one: nothing imported, opened or run, no class
    changed; a refused global is refused whatever the opcode."""
    marker = tmp_path / "MARKER"
    before = {cls: dict(vars(cls)) for cls in allowed_classes()}
    wrong = []
    for module, name in sorted(ALLOWED) + DOTTED:
        for use, data in uses(form(module, name), marker).items():
            outcome, events = read(data)
            if events or ((module, name) not in ALLOWED and not refused(outcome)):
                wrong.append((module, name, use, shown(outcome), events[:3]))
    assert wrong == [], f"{len(wrong)} loads did more than allowed, e.g. {wrong[:5]}"
    assert not wait_for(marker)
    assert {cls: dict(vars(cls)) for cls in allowed_classes()} == before


NEVER_IN_DCP_METADATA = {  # what a pickle does -> (the pickle, what the refusal says)
    "BUILD on a class": (stream(by_stack_global("torch.distributed.checkpoint.metadata", "Metadata"), pickle.NONE,
                                pickle.EMPTY_DICT, text("__eq__"), by_stack_global("torch", "Size"), pickle.SETITEM,
                                pickle.TUPLE2, pickle.BUILD), "refusing to set the state of <class"),
    "REDUCE of a dtype": (stream(by_stack_global("torch", "float32"), pickle.EMPTY_TUPLE, pickle.REDUCE),
                          "refusing to call torch.float32"),
    "NEWOBJ of torch.Size": (stream(by_stack_global("torch", "Size"), pickle.EMPTY_TUPLE, pickle.NEWOBJ),
                             "refusing to make a <class 'torch.Size'>"),
    # A first BUILD plants an instance __setstate__, a second would call it with any argument.
    "BUILD of a field that is not one": (stream(by_stack_global("torch.distributed.checkpoint.metadata", "Metadata"),
                                                pickle.EMPTY_TUPLE, pickle.NEWOBJ, pickle.EMPTY_DICT, text("__setstate__"),
                                                by_stack_global("torch.distributed.checkpoint.metadata", "Metadata"),
                                                pickle.SETITEM, pickle.BUILD, pickle.EMPTY_DICT, text("x"),
                                                pickle.BININT1 + b"\x01", pickle.SETITEM, pickle.BUILD),
                                         "refusing the state {'__setstate__': <class"),
    "Metadata without its entries": (stream(by_stack_global("torch.distributed.checkpoint.metadata", "Metadata"),
                                            pickle.EMPTY_TUPLE, pickle.NEWOBJ, pickle.EMPTY_DICT,
                                            text("state_dict_metadata"), pickle.BININT1 + b"\x01", pickle.SETITEM,
                                            pickle.BUILD),
                                     "state_dict_metadata is not a dict of DCP storage entries"),
    "PERSID": (stream(pickle.PERSID + b"0\n"), "refusing the PERSID opcode"),
    "BINPERSID": (stream(text("0"), pickle.BINPERSID), "refusing the BINPERSID opcode"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", NEVER_IN_DCP_METADATA)
def test_what_dcp_metadata_never_does_is_refused(monkeypatch, case):
    data, message = NEVER_IN_DCP_METADATA[case]
    metadata_class = torch.distributed.checkpoint.metadata.Metadata
    monkeypatch.setattr(metadata_class, "__eq__", metadata_class.__eq__)  # put back, should a load replace it
    outcome, events = read(data)
    assert isinstance(outcome, pickle.UnpicklingError) and message in str(outcome), outcome
    assert events == [] and metadata_class.__eq__ is not torch.Size


# ------------------------------------------------------------------------------------ real DCP metadata

class Plain:
    """Global state whose values DCP stores as bytes items (BytesStorageMetadata)."""

    def state_dict(self) -> dict:
        return {"name": "run", "blob": b"raw bytes", "counts": [1, 2], "nothing": None}

    def load_state_dict(self, state: dict) -> None:
        pass


def saved_by_dcp(folder: Path) -> Path:
    state = {"float32": torch.arange(6.0).reshape(2, 3), "bfloat16": torch.zeros(3, dtype=torch.bfloat16),
             "int64": torch.arange(3), "channels_last": torch.zeros(1, 2, 3, 3).to(memory_format=torch.channels_last),
             "bool": torch.ones(2, dtype=torch.bool), "blob": io.BytesIO(b"bytes"), "step": 7, "name": "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def saved_by_checkpointer(folder: Path) -> Path:
    from mpo_dist.checkpoint import Checkpointer, ModelOptimizerState, RNGState

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Checkpointer(folder, 2, rank=0, dp_rank=0, dp_world_size=1, log=QUIET).save(
            3, {"model_optimizer": ModelOptimizerState(model, optimizer), "plain": Plain()},
            {"rng": RNGState(), "counter": Counter(4)})


def assert_loads_as_pickle_reads_it(folder: Path) -> None:
    metadata, events = read_file(folder)
    assert events == []
    with open(folder / ".metadata", "rb") as handle:
        expected = pickle.load(handle)  # noqa: S301 (written by this test)
    assert metadata.state_dict_metadata == expected.state_dict_metadata
    assert metadata.storage_data == expected.storage_data and metadata.planner_data == expected.planner_data
    assert metadata.storage_meta.checkpoint_id == expected.storage_meta.checkpoint_id


@pytest.mark.unit
@pytest.mark.parametrize("save", [saved_by_dcp, saved_by_checkpointer])
def test_real_metadata_loads_as_pickle_reads_it(tmp_path, save):
    assert_loads_as_pickle_reads_it(save(tmp_path / "checkpoint"))


# ----------------------------------------------------------------------------- the entry points, end to end

@pytest.fixture(scope="module")
def trained_run(toy_inputs, tmp_path_factory) -> Path:
    """A toy run of one step on two ranks (FSDP2): its checkpoint is the trainer's own."""
    run = tmp_path_factory.mktemp("allowlist") / "run"
    train(*toy_overrides(toy_inputs, run, **{"training.steps": 1, "model.dtype": "float32"}), nproc=2)
    return run


def hostile_copy(checkpoint: Path, target: Path, marker: Path, step: int | None = None) -> Path:
    shutil.copytree(checkpoint, target)
    (target / ".metadata").write_bytes(exploit(marker))
    if step is not None:
        info = json.loads((target / "checkpoint.json").read_text())
        (target / "checkpoint.json").write_text(json.dumps({**info, "step": step}))
    return target


@pytest.mark.e2e
def test_two_fsdp2_ranks_metadata_loads_as_pickle_reads_it(trained_run):
    assert_loads_as_pickle_reads_it(trained_run / "checkpoints" / "step-00000001")


def one_line_refusal(result, tool: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"{tool}: error:") and "refusing to load " + ".".join(POPEN) in line, line
    return line


@pytest.mark.e2e
def test_convert_checkpoint_refuses_the_exploit(trained_run, tmp_path):
    marker = tmp_path / "MARKER"
    hostile = hostile_copy(trained_run / "checkpoints" / "step-00000001", tmp_path / "hostile", marker)
    result = run_tool("convert_checkpoint.py", "--checkpoint", hostile, "--out", tmp_path / "out")
    assert not wait_for(marker), "the hostile .metadata ran its command"
    assert str(hostile) in one_line_refusal(result, "convert_checkpoint") and not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_evaluate_refuses_the_exploit(trained_run, toy_inputs, tmp_path):
    marker = tmp_path / "MARKER"
    hostile = hostile_copy(trained_run / "checkpoints" / "step-00000001", tmp_path / "hostile", marker)
    result = run_tool("evaluate.py", "--model", hostile, "--pairs", toy_inputs["pairs"], "--reference",
                      toy_inputs["reference"], "--out", tmp_path / "report.json")
    assert not wait_for(marker), "the hostile .metadata ran its command"
    assert "--model" in one_line_refusal(result, "evaluate") and not (tmp_path / "report.json").exists()


@pytest.mark.e2e
def test_resume_auto_passes_over_the_exploit_without_running_it(trained_run, toy_inputs, tmp_path):
    """The hostile step-00000005 is a damaged checkpoint to resume=auto: warned about, set aside, never run."""
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    shutil.copytree(trained_run, run)
    hostile = hostile_copy(run / "checkpoints" / "step-00000001", run / "checkpoints" / "step-00000005", marker, step=5)
    result = train(*toy_overrides(toy_inputs, run, **{"training.steps": 2, "model.dtype": "float32"}),
                   "checkpoint.resume=auto", nproc=2)
    assert not wait_for(marker), "the hostile .metadata ran its command"
    assert f"checkpoint {hostile} is damaged (.metadata cannot be read (UnpicklingError: refusing to load " \
           + ".".join(POPEN) in result.stdout
    assert f"resumed from {run / 'checkpoints' / 'step-00000001'}" in result.stdout
    assert (run / "checkpoints" / "step-00000005.damaged").is_dir()  # set aside: never tried again
    assert (run / "checkpoints" / "step-00000002" / "checkpoint.json").is_file()
