"""The README and docs/ stay true: the two commands are what install and CI run, the configuration
page is the generated one, every relative link resolves, and every command names flags, configs and
options that exist."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

from mpo_dist.config import describe_config, load_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _load_tool(name: str):
    """A tools/ script as a module (tools/ is no package; some tools import each other by name)."""
    path = ROOT / "tools" / name
    spec = importlib.util.spec_from_file_location(f"_docs_tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return module


def _bash_blocks(page: Path) -> list[str]:
    """The bash blocks of a page, indented ones (inside a list item) included, without the indent."""
    blocks = re.findall(r"^( *)```bash\n(.*?)\n\1```", page.read_text(), flags=re.S | re.M)
    return [re.sub(rf"^{indent}", "", body, flags=re.M) for indent, body in blocks]


def test_readme_opens_with_the_quickstart_and_the_test_command_that_ci_runs():
    blocks = _bash_blocks(ROOT / "README.md")
    quickstart, tests = blocks[0], blocks[1]
    assert "launch/quickstart.sh" in quickstart and "launch/install.sh" in quickstart
    assert "torch==${TORCH_VERSION:-2.13.0}" in (ROOT / "launch" / "install.sh").read_text()
    assert tests in (ROOT / ".ci" / "run").read_text()
    assert len(README.splitlines()) < 250


def test_configuration_page_is_the_generated_one():
    tool = _load_tool("config_reference.py")
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == tool.render(), f"docs/configuration.md is out of date: run `{tool.REGENERATE}`"
    rows = describe_config().splitlines()[2:]
    assert len(rows) > 50 and all(row in page.splitlines() for row in rows)  # no option left out of a section
    assert "| `optim.lr` | float | `1e-06` | AdamW learning rate |" in page


def test_configuration_check_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    tool = _load_tool("config_reference.py")
    monkeypatch.setattr(tool, "PAGE", tmp_path / "configuration.md")
    tool.PAGE.write_text(tool.render().replace("AdamW learning rate", "the learning rate"))
    assert tool.main(["--check"]) == 1
    assert "run python tools/config_reference.py" in capsys.readouterr().err
    assert tool.main([]) == 0 and tool.main(["--check"]) == 0


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_anchor(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


def test_every_relative_link_and_anchor_resolves():
    assert len(PAGES) >= 12
    broken = []
    for page in PAGES:
        for target in _links(page):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_anchor_follows_github():
    assert _anchor("The D_ref sampler against transformers' `generate`: `tools/bench_sampler.py`") == \
        "the-d_ref-sampler-against-transformers-generate-toolsbench_samplerpy"
    assert _anchor("Resuming") == "resuming"



def test_every_repository_path_a_page_names_exists():
    pattern = (r"(?<![\w/.])(?:tests|tools|mpo_dist|launch|configs)/[\w/.-]*\w\.(?:py|sh|sbatch|yaml)")
    named = {(page.relative_to(ROOT), path) for page in PAGES for path in re.findall(pattern, page.read_text())}
    assert len(named) > 50
    missing = sorted(f"{page}: {path}" for page, path in named if not (ROOT / path).exists())
    assert not missing, "\n".join(missing)

# ---- every command in the docs names flags, configs and options that exist --------------------------

SEPARATORS = {"&&", "||", "|", ";", ">", ">>", "do", "then"}


def _commands(block: str) -> list[list[str]]:
    """Each shell command of a bash block as tokens: continuation lines joined, comments dropped."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        command: list[str] = []
        for token in shlex.split(line, comments=True):
            token = token.rstrip(";")
            if token in SEPARATORS:
                commands.append(command)
                command = []
            elif token:
                command.append(token)
        commands.append(command)
    return [c for c in commands if c]


def _tool_flags(name: str, cache: dict[str, set[str]]) -> set[str]:
    if name not in cache:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            _load_tool(name).main(["--help"])
        assert exit_.value.code == 0, name
        cache[name] = set(re.findall(r"--[a-z][a-z0-9-]*", out.getvalue()))
    return cache[name]


def _flags(tokens: list[str]) -> list[str]:
    return [m.group(1) for t in tokens if (m := re.match(r"\[?(--[a-z][a-z0-9-]*)", t))]


def _repo_path(token: str) -> Path:
    return ROOT / token.removeprefix("/opt/mpo_dist/")


def _check_command(tokens: list[str], helps: dict[str, set[str]]) -> list[str]:
    problems = []
    for i, token in enumerate(tokens):
        if re.fullmatch(r"(tools|launch)/[\w.-]+\.(py|sh|sbatch)", token) and not _repo_path(token).exists():
            problems.append(f"{token}: no such file")
        if re.fullmatch(r"tools/\w+\.py", token) and _repo_path(token).exists():
            unknown = [f for f in _flags(tokens[i + 1:]) if f not in _tool_flags(Path(token).name, helps)]
            problems += [f"{token}: no option {f}" for f in unknown]
        if token == "-m" and tokens[i + 1:i + 2] == ["mpo_dist.train"]:
            rest = tokens[i + 2:]
            config = rest[rest.index("--config") + 1] if "--config" in rest else None
            if config and not _repo_path(config).exists():
                problems.append(f"{config}: no such config")
                continue
            overrides = [t for t in rest if re.match(r"\w+\.\w+=", t)]
            try:
                load_config(config and str(_repo_path(config)), overrides)
            except Exception as error:  # a ConfigError names the key
                problems.append(f"{' '.join(tokens)}: {error}")
    return problems


def test_every_command_in_the_docs_uses_real_files_flags_and_options():
    helps: dict[str, set[str]] = {}
    problems, checked = [], 0
    for page in PAGES:
        for block in _bash_blocks(page):
            for tokens in _commands(block):
                checked += 1
                problems += [f"{page.relative_to(ROOT)}: {p}" for p in _check_command(tokens, helps)]
    assert checked > 40 and len(helps) >= 8
    assert not problems, "\n".join(problems)


def test_the_command_check_finds_a_wrong_flag_and_a_wrong_option():
    helps: dict[str, set[str]] = {}
    block = ("python tools/prepare_pairs.py --input x.jsonl --tokenizer t --out o --max-lenght 9\n"
             "torchrun --nproc-per-node 2 -m mpo_dist.train --config configs/tiny_cpu.yaml optim.lrr=1")
    problems = [p for tokens in _commands(block) for p in _check_command(tokens, helps)]
    assert problems[0] == "tools/prepare_pairs.py: no option --max-lenght"
    assert "optim.lrr" in problems[1] and len(problems) == 2
