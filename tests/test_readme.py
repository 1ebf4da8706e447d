"""The README's two commands exist, install what they lack, and CI runs exactly the test one."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_readme_commands_are_the_scripts_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert commands[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for script in ("demo.sh", "test.sh"):
        assert 'source "$(dirname "$0")/setup.sh"' in (ROOT / "scripts" / script).read_text()
    assert "pip install --quiet torch==2.13.0" in (ROOT / "scripts" / "setup.sh").read_text()
