"""README stays true: the config table is the generated one and CI runs README's test command."""

import re
from pathlib import Path

from mpo_dist.config import describe_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_config_table_is_generated_from_the_dataclasses():
    assert describe_config().strip() in README


def test_ci_runs_the_readme_test_command_verbatim():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    quickstart, tests = blocks[0], blocks[1]
    assert "launch/quickstart.sh" in quickstart and "launch/install.sh" in quickstart
    assert "torch==${TORCH_VERSION:-2.13.0}" in (ROOT / "launch" / "install.sh").read_text()
    assert tests in (ROOT / ".ci" / "run").read_text()
