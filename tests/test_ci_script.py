"""`.ci/run` leaves no virtualenv behind, unless CMTDP_CI_VENV asks to keep one; the XLA flags
the suite runs under (tests/conftest.py) suit the installed jaxlib.

The script runs against a fake `python3` whose `-m venv DIR` writes an `activate` that puts a
fake `python` first on PATH, so nothing is installed and no test suite runs inside the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests import conftest

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash") or "/bin/bash"

FAKE_PYTHON3 = """#!/usr/bin/env bash
if [[ "$1 $2" == "-m venv" ]]; then
  mkdir -p "$3/bin"
  printf '#!/usr/bin/env bash\\necho "python $*" >> "%s/calls"\\n' "$3" > "$3/bin/python"
  chmod +x "$3/bin/python"
  printf 'export PATH="%s/bin:$PATH"\\n' "$3" > "$3/bin/activate"
fi
"""


def _run_ci(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
  repo, bin_dir, scratch = tmp_path / "repo", tmp_path / "bin", tmp_path / "tmp"
  for folder in (repo / ".ci", bin_dir, scratch):
    folder.mkdir(parents=True)
  shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
  (bin_dir / "python3").write_text(FAKE_PYTHON3)
  (bin_dir / "python3").chmod(0o755)
  full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(scratch),
              "HOME": str(tmp_path), **env}
  res = subprocess.run([BASH, str(repo / ".ci" / "run")], env=full_env, capture_output=True,
                       text=True, timeout=60)
  return res, scratch


def test_ci_run_removes_its_virtualenv(tmp_path):
  res, scratch = _run_ci(tmp_path)
  assert res.returncode == 0, res.stderr
  assert list(scratch.iterdir()) == []


def test_ci_run_keeps_a_named_virtualenv(tmp_path):
  keep = tmp_path / "kept"
  res, _ = _run_ci(tmp_path, CMTDP_CI_VENV=str(keep))
  assert res.returncode == 0, res.stderr
  calls = (keep / "calls").read_text().splitlines()
  assert calls[-1] == "python -m pytest tests -q -n 2 --dist loadscope"
  assert any("install --quiet --no-deps -e ." in call for call in calls)


def test_readme_gives_the_command_ci_runs():
  """The quick start and docs/tests.md show exactly the test command of `.ci/run`."""
  command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert command.startswith("JAX_NUM_CPU_DEVICES=8 python -m pytest tests")
  for page in ("README.md", "docs/tests.md"):
    assert (ROOT / page).read_text().count(f"```bash\n{command}\n```") == 1, page


def test_the_fusion_emitters_flag_is_set_only_under_the_pinned_jaxlib():
  """XLA aborts every test on a flag its build does not know: another jaxlib gets only
  the optimisation level."""
  requirements = (ROOT / "requirements.txt").read_text()
  pinned = re.search(r"^jaxlib==(\S+)", requirements, re.MULTILINE).group(1)
  assert conftest.xla_flags_for_tests(pinned, requirements) == (
      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
  assert conftest.xla_flags_for_tests(pinned + "1", requirements) == (
      "--xla_backend_optimization_level=0")
  for line in (f"jaxlib=={pinned}  # a comment", f"jaxlib=={pinned}\r", f"jaxlib=={pinned}"):
    assert "fusion_emitters" in conftest.xla_flags_for_tests(pinned, f"jax=={pinned}\n{line}")
