"""The import rules of docs/design.md, as import-linter contracts in pyproject.toml: they hold
for the repository, and breaking any of them on purpose (in a temporary copy) is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("engine", "models", "pallas_kernels", "scripts", "server.py", "pyproject.toml")

# (file, line appended to it, the contract that must then break)
VIOLATIONS = [
    ("models/config.py", "import engine.config", "models never imports engine"),
    ("pallas_kernels/compat.py", "import models.config", "pallas_kernels imports neither"),
    ("engine/cli.py", "import server", "nothing in engine imports server"),
    ("engine/serving/metrics.py", "import flask", "flask (and werkzeug) only in server.py"),
    ("engine/openai/api.py", "import sqlalchemy", "sqlalchemy is imported only under"),
    ("engine/tokenizer/detokenizer.py", "import engine.worker.compilation",
     "host code never reaches JAX"),
    ("engine/core/request.py", "import engine.serving.generation", "engine's parts are layered"),
    ("models/config.py", "import models.checkpoint", "no import cycles"),
]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    # The checked tree comes first on the path, ahead of the editable install.
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", command, "--no-cache"],
                          cwd=cwd, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)},
                          capture_output=True, text=True, timeout=300)


def test_the_repository_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_breaking_a_rule_in_a_copy_breaks_its_contract(tmp_path):
    for name in CHECKED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / name)
    for path, line, _ in VIOLATIONS:
        with open(tmp_path / path, "a") as module:
            module.write(f"\n{line}  # noqa: broken on purpose\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    summary = result.stdout.split("Broken contracts")[0]   # one line per contract
    broken = [line for line in summary.splitlines() if " BROKEN" in line]
    for _, _, contract in VIOLATIONS:
        assert any(line.startswith(contract) for line in broken), (contract, result.stdout)
    assert len(broken) == len({contract for _, _, contract in VIOLATIONS})
