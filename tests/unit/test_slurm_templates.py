"""launch/slurm/: rendering of the Slurm templates, and the rendered scripts' requeue logic.

The behavioural tests run the rendered batch scripts with ``bash`` where ``srun`` and ``scontrol``
are stub scripts on PATH (no Slurm here): the stub ``srun`` records its arguments and environment,
then exits with a given code or waits for a signal; the stub ``scontrol`` records its calls and
answers ``show hostnames``. ``torchrun_node.py`` (what srun starts on each node) is tested with the
real torchrun.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests._modules import load_file_module

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = ROOT / "launch" / "slurm"
TEMPLATES = ("distill.sbatch", "teacher_service.sbatch")


render_mod = load_file_module("slurm_render", SLURM_DIR / "render.py")
torchrun_node = load_file_module("slurm_torchrun_node", SLURM_DIR / "torchrun_node.py")


def _values(template: str, **extra) -> dict:
    values = {"CONFIG": "configs/run.yaml", "SAVE_DIR": "/ckpt/run"}
    if template == "teacher_service.sbatch":
        values["TEACHER_DIR"] = "/models/teacher"
    values.update(extra)
    return values


def _render(template: str, **extra) -> str:
    text = (SLURM_DIR / template).read_text()
    return render_mod.render(text, _values(template, **extra), template_name=template)


def _sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("nodes", [1, 4])
def test_rendered_script_is_valid_bash_with_the_values(template, nodes, tmp_path):
    script = _render(template, NODES=nodes, GPUS_PER_NODE=4, CPUS_PER_TASK=48, TIME="2-00:00:00",
                     PARTITION="gpu", ACCOUNT="proj-1", JOB_NAME="kd-run", SIGNAL_SECONDS=900, MEM="0")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True, capture_output=True)
    assert "{{" not in script and "}}" not in script
    total = nodes + 1 if template == "teacher_service.sbatch" else nodes
    sbatch = _sbatch_lines(script)
    for directive in (f"--nodes={total}", "--ntasks-per-node=1", "--gpus-per-node=4", "--cpus-per-task=48",
                      "--time=2-00:00:00", "--partition=gpu", "--account=proj-1", "--job-name=kd-run",
                      "--mem=0", "--output=logs/%x-%j.out", "--error=logs/%x-%j.err", "--open-mode=append",
                      "--requeue", "--signal=B:USR1@900"):
        assert f"#SBATCH {directive}" in sbatch, directive
    # sbatch reads #SBATCH lines only up to the first command: all of them come before it
    first_command = next(i for i, line in enumerate(script.splitlines())
                         if line.strip() and not line.lstrip().startswith("#"))
    assert all(script.splitlines().index(line) < first_command for line in sbatch)
    for needle in ("--rdzv-backend c10d", '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"', '--rdzv-id "$SLURM_JOB_ID"',
                   '--save "$SAVE_DIR" --auto-resume', 'scontrol requeue "$SLURM_JOB_ID"', "trap 'on_stop USR1' USR1",
                   "trap 'on_stop TERM' TERM", 'kill -USR1 "$', "export NCCL_NVLS_ENABLE=0",
                   "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "export CUDA_DEVICE_MAX_CONNECTIONS=1",
                   "# export NCCL_SOCKET_IFNAME=", "# export NCCL_IB_HCA=", "launch/slurm/torchrun_node.py",
                   '--config-file "$CONFIG"', "GPUS_PER_NODE=4", "--max-restarts 0"):
        assert needle in script, needle
    if template == "distill.sbatch":
        assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in script
        assert '--nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE"' in script
    else:
        assert f"NODES={nodes}\n" in script and "REPLICAS=4\n" in script  # default: one per GPU
        for needle in ("-m megatron_distill.teacher_service --teacher-load \"$TEACHER_DIR\" --topk \"$TOPK\"",
                       '--replicas "$REPLICAS"', '--host 0.0.0.0 --port "$PORT"',
                       '--teacher-remote "$TEACHER_URL" --kd-topk "$TOPK"', 'TEACHER_URL="http://${SERVICE_HOST}:${PORT}"',
                       "openssl rand -hex 16", "secrets.token_hex(16)", "export MEGATRON_DISTILL_TEACHER_TOKEN"):
            assert needle in script, needle


@pytest.mark.parametrize("template", TEMPLATES)
def test_optional_values_left_empty_drop_their_lines(template):
    script = _render(template)
    sbatch = "\n".join(_sbatch_lines(script))
    for flag in ("--partition", "--account", "--qos", "--mem"):
        assert flag not in sbatch
    assert "\nsource " not in script
    assert "\nexport NCCL_SOCKET_IFNAME" not in script and "\nexport NCCL_IB_HCA" not in script
    script = _render(template, QOS="high", ENV_SCRIPT="/opt/env.sh", NCCL_SOCKET_IFNAME="^docker,lo",
                     NCCL_IB_HCA="mlx5_0,mlx5_1")
    assert "#SBATCH --qos=high" in script
    assert "\nsource /opt/env.sh\n" in script
    assert "\nexport NCCL_SOCKET_IFNAME='^docker,lo'\n" in script
    assert "\nexport NCCL_IB_HCA=mlx5_0,mlx5_1\n" in script


def test_missing_unknown_and_invalid_values_are_errors_naming_them():
    text = (SLURM_DIR / "distill.sbatch").read_text()
    values = {"NODES": "four", "GPUS_PER_NODE": 0, "TIME": "tomorrow", "PARTITION": "gpu; rm -rf ~",
              "JOB_NAME": "run$(id)", "LOG_DIR": "my logs", "MASTER_PORT": 80, "EXTRA_ARGS": "--lr 'unclosed",
              "TEACHER_DIR": "/models/t", "BOGUS": "1", "PYTHON": "python\nrm -rf ~", "MEM": "lots"}
    with pytest.raises(render_mod.RenderError) as err:
        render_mod.render(text, values, template_name="distill.sbatch")
    problems = err.value.problems
    expected = {"NODES": "integer", "GPUS_PER_NODE": ">= 1", "TIME": "time limit", "PARTITION": "#SBATCH",
                "JOB_NAME": "#SBATCH", "LOG_DIR": "#SBATCH", "MASTER_PORT": ">= 1024", "EXTRA_ARGS": "shell words",
                "PYTHON": "one line", "MEM": "#SBATCH"}
    for name, reason in expected.items():
        assert any(f"invalid value for {name}:" in p and reason in p for p in problems), (name, problems)
    assert any("missing value for CONFIG" in p for p in problems)
    assert any("missing value for SAVE_DIR" in p for p in problems)
    assert any("unknown variable BOGUS" in p for p in problems)
    assert any("unknown variable TEACHER_DIR" in p for p in problems)  # not a variable of distill.sbatch
    assert len(problems) == len(expected) + 4


def test_cross_checks_and_reserved_flags():
    with pytest.raises(render_mod.RenderError) as err:
        _render("teacher_service.sbatch", TIME="10", SIGNAL_SECONDS=600, REPLICAS=5, TEACHER_GPUS_PER_REPLICA=2,
                EXTRA_ARGS="--save=/x --kd-topk 8 --lr 1e-5", TOTAL_NODES=3)
    problems = "\n".join(err.value.problems)
    assert "SIGNAL_SECONDS" in problems and "TIME 10" in problems
    assert "REPLICAS: 5 replicas x TEACHER_GPUS_PER_REPLICA 2 = 10 GPUs > GPUS_PER_NODE 8" in problems
    assert "EXTRA_ARGS: --kd-topk, --save is set by the template itself" in problems
    assert "TOTAL_NODES is computed" in problems
    # fractional GPUs per replica are fine when they fit
    assert "TEACHER_GPUS_PER_REPLICA=0.5\n" in _render("teacher_service.sbatch", REPLICAS=16,
                                                      TEACHER_GPUS_PER_REPLICA="0.5", TEACHER_CPUS_PER_REPLICA=1)


@pytest.mark.parametrize("value,seconds", [("30", 1800), ("30:15", 1815), ("4:00:00", 14400), ("1-0", 86400),
                                           ("1-2:30", 95400), ("1-02:03:04", 93784)])
def test_slurm_time_limits(value, seconds):
    assert render_mod.time_limit_seconds(value) == seconds


def test_cli_values_file_set_override_output_mode_and_errors(tmp_path, capsys):
    values = tmp_path / "values.yaml"
    values.write_text("NODES: 2\nCONFIG: configs/a.yaml\nSAVE_DIR: /ckpt/a\nPARTITION:\n"
                      "EXTRA_ARGS: [--train-iters, 7]\n")
    out = tmp_path / "job.sbatch"
    assert render_mod.main(["distill.sbatch", "--values", str(values), "--set", "NODES=3", "JOB_NAME=x",
                            "-o", str(out)]) == 0
    script = out.read_text()
    assert "#SBATCH --nodes=3" in script and "#SBATCH --job-name=x" in script
    assert "EXTRA_ARGS=(--train-iters 7)" in script and "--partition" not in script
    assert out.stat().st_mode & stat.S_IXUSR
    assert render_mod.main(["distill.sbatch", "--set", "NODES=2", "WHAT=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown variable WHAT" in err and "missing value for CONFIG" in err
    assert render_mod.main(["nope.sbatch"]) == 2
    assert "no template 'nope.sbatch'" in capsys.readouterr().err
    assert render_mod.main(["teacher_service.sbatch", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "TEACHER_DIR" in listing and "(required)" in listing and "TOTAL_NODES" in listing


def test_readme_documents_every_variable_with_its_default():
    readme = (SLURM_DIR / "README.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([A-Z_]+)` \| ([^|]*) \|", readme, re.M)}
    used = set()
    for template in TEMPLATES:
        used |= set(render_mod.placeholders((SLURM_DIR / template).read_text()))
    assert used <= set(rows), sorted(used - set(rows))
    assert set(rows) <= used | {"MEGATRON_DISTILL_TEACHER_TOKEN"}, sorted(set(rows) - used)
    for name, var in render_mod.VARIABLES.items():
        default = var.default
        if default is render_mod.REQUIRED:
            assert "required" in rows[name], name
        elif not callable(default):
            shown = "(empty)" if default == "" else f"`{default}`"
            assert shown in rows[name], (name, rows[name])


# --------------------------------------------------------------------------------------------
# behaviour of the rendered scripts, with stub srun / scontrol
# --------------------------------------------------------------------------------------------

SRUN_STUB = r"""#!/bin/bash
# stub srun: record the arguments and some environment, then act as $STUB_SERVICE / $STUB_TRAIN say
if [[ " $* " == *" megatron_distill.teacher_service "* ]]; then role=service; mode=${STUB_SERVICE:-serve}
else role=train; mode=${STUB_TRAIN:-exit:0}; fi
printf '%s\n' "$@" > "$STUB_DIR/$role.args"
{ echo "NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-}"; echo "MASTER_ADDR=${MASTER_ADDR:-}";
  echo "FROM_ENV_SCRIPT=${FROM_ENV_SCRIPT:-}"; echo "TOKEN=${MEGATRON_DISTILL_TEACHER_TOKEN:-}";
} > "$STUB_DIR/$role.env"
trap 'echo USR1 >> "$STUB_DIR/$role.signals"; exit 75' USR1
trap 'echo TERM >> "$STUB_DIR/$role.signals"; exit 143' TERM
case "$mode" in
  exit:*) exit "${mode#exit:}" ;;
  serve) echo "teacher service listening on http://0.0.0.0:8765 (2 replica(s), top-64, token required)" ;;
  fail) echo "boom" >&2; exit 3 ;;
  serve-then-die) echo "teacher service listening on http://0.0.0.0:8765"; sleep 0.3; exit 9 ;;
esac
touch "$STUB_DIR/$role.started"
while :; do sleep 0.05; done
"""

SCONTROL_STUB = r"""#!/bin/bash
echo "$*" >> "$STUB_DIR/scontrol.calls"
if [ "$1" = show ] && [ "$2" = hostnames ]; then printf '%s\n' $STUB_HOSTS; fi
exit 0
"""


def _stub_env(tmp_path: Path, hosts: list[str], **env) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_DIR": str(tmp_path),
            "STUB_HOSTS": " ".join(hosts), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "kd",
            "SLURM_JOB_NODELIST": "node[1-9]", "SLURM_NNODES": str(len(hosts))}
    base.update({k: str(v) for k, v in env.items()})
    return base


def _write_script(tmp_path: Path, template: str, **values) -> Path:
    script = _render(template, REPO_DIR=str(tmp_path), LOG_DIR="logs", **values)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    return path


def _run(path: Path, env: dict, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(path)], env=env, cwd=path.parent, capture_output=True, text=True,
                          timeout=timeout)


def _calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "scontrol.calls"
    return calls.read_text().splitlines() if calls.exists() else []


def _wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("step_rc,requeued", [(0, False), (1, False), (2, False), (75, True), (76, False)])
def test_distill_exit_code_handling(tmp_path, step_rc, requeued):
    path = _write_script(tmp_path, "distill.sbatch")
    result = _run(path, _stub_env(tmp_path, ["node1", "node2"], STUB_TRAIN=f"exit:{step_rc}"))
    assert result.returncode == step_rc, result.stdout + result.stderr
    assert ("requeue 4242" in _calls(tmp_path)) == requeued
    assert _calls(tmp_path)[0] == "show hostnames node[1-9]"


def test_distill_launch_arguments_environment_and_quoting(tmp_path):
    env_script = tmp_path / "env.sh"
    env_script.write_text("export FROM_ENV_SCRIPT=yes\n")
    nasty = "configs/my run $(touch PWNED).yaml"
    path = _write_script(tmp_path, "distill.sbatch", CONFIG=nasty, SAVE_DIR="/ckpt/a b",
                         EXTRA_ARGS="--train-iters 5 --run-name 'two words'", ENV_SCRIPT=str(env_script),
                         GPUS_PER_NODE=2, MASTER_PORT=29999)
    result = _run(path, _stub_env(tmp_path, ["node1", "node2"]))
    assert result.returncode == 0, result.stdout + result.stderr
    args = (tmp_path / "train.args").read_text().splitlines()
    assert args[:4] == ["--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=0"]
    i = args.index("launch/slurm/torchrun_node.py")
    assert args[i + 1:i + 13] == ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                                  "--rdzv-endpoint", "node1:29999", "--rdzv-id", "4242", "--max-restarts", "0"]
    j = args.index("launch/pretrain_distill.py")
    assert args[j + 1:] == ["--config-file", nasty, "--train-iters", "5", "--run-name", "two words",
                            "--save", "/ckpt/a b", "--auto-resume"]
    env = (tmp_path / "train.env").read_text()
    assert "NCCL_NVLS_ENABLE=0" in env and "MASTER_ADDR=node1" in env and "FROM_ENV_SCRIPT=yes" in env
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_distill_signal_is_forwarded_as_usr1_and_the_job_requeued(tmp_path, sig):
    path = _write_script(tmp_path, "distill.sbatch")
    proc = subprocess.Popen(["bash", str(path)], env=_stub_env(tmp_path, ["node1"], STUB_TRAIN="wait"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(tmp_path / "train.started")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 75, out
    assert (tmp_path / "train.signals").read_text().split() == ["USR1"]  # never TERM: srun would SIGKILL the ranks
    assert "requeue 4242" in _calls(tmp_path)
    assert f"got SIG{sig.name[3:]}" in out


def test_distill_does_not_requeue_past_max_requeues(tmp_path):
    path = _write_script(tmp_path, "distill.sbatch", MAX_REQUEUES=3)
    result = _run(path, _stub_env(tmp_path, ["node1"], STUB_TRAIN="exit:75", SLURM_RESTART_COUNT=3))
    assert result.returncode == 75
    assert "requeue 4242" not in _calls(tmp_path) and "MAX_REQUEUES=3" in result.stdout


def test_teacher_service_job_requeue_token_and_service_stop(tmp_path):
    path = _write_script(tmp_path, "teacher_service.sbatch", NODES=2, TOPK=64, REPLICAS=2, PORT=9000)
    env = _stub_env(tmp_path, ["svc", "t1", "t2"], STUB_TRAIN="exit:75")
    result = _run(path, env)
    assert result.returncode == 75, result.stdout + result.stderr
    assert "requeue 4242" in _calls(tmp_path)
    assert (tmp_path / "service.signals").read_text().split() == ["TERM"]  # stopped after the trainer
    service = (tmp_path / "service.args").read_text().splitlines()
    assert service[:3] == ["--nodes=1", "--ntasks=1", "--nodelist=svc"]
    i = service.index("megatron_distill.teacher_service")
    assert service[i + 1:] == ["--teacher-load", "/models/teacher", "--topk", "64", "--replicas", "2",
                               "--gpus-per-replica", "1", "--cpus-per-replica", "2", "--dtype", "bfloat16",
                               "--host", "0.0.0.0", "--port", "9000"]
    train = (tmp_path / "train.args").read_text().splitlines()
    assert train[:4] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--nodelist=t1,t2"]
    assert "node1" not in train and "t1:29500" in train
    j = train.index("launch/pretrain_distill.py")
    assert train[j + 1:] == ["--config-file", "configs/run.yaml", "--teacher-remote", "http://svc:9000",
                             "--kd-topk", "64", "--save", "/ckpt/run", "--auto-resume"]
    tokens = {(tmp_path / f"{role}.env").read_text().split("TOKEN=")[1].strip() for role in ("service", "train")}
    assert len(tokens) == 1 and re.fullmatch(r"[0-9a-f]{32}", tokens.pop())
    assert (tmp_path / "logs" / "kd-4242.teacher-run0.log").read_text().startswith("teacher service listening")
    # a token from the submitting environment is used as is; a finished run is not requeued
    (tmp_path / "scontrol.calls").unlink()
    result = _run(path, {**env, "STUB_TRAIN": "exit:0", "MEGATRON_DISTILL_TEACHER_TOKEN": "s3cret"})
    assert result.returncode == 0 and "requeue 4242" not in _calls(tmp_path)
    assert "TOKEN=s3cret" in (tmp_path / "train.env").read_text()


def test_teacher_service_failures_end_the_job_without_requeue(tmp_path):
    path = _write_script(tmp_path, "teacher_service.sbatch", NODES=1)
    result = _run(path, _stub_env(tmp_path, ["svc", "t1"], STUB_SERVICE="fail"))
    assert result.returncode == 1 and "before it was ready" in result.stdout
    assert not (tmp_path / "train.args").exists()
    # the service dies during training: the trainer is asked to save (USR1), the job is not requeued
    result = _run(path, _stub_env(tmp_path, ["svc", "t1"], STUB_SERVICE="serve-then-die", STUB_TRAIN="wait"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert (tmp_path / "train.signals").read_text().split() == ["USR1"]
    assert "requeue 4242" not in _calls(tmp_path) and "not requeueing" in result.stdout


def test_teacher_service_signal_during_training_requeues(tmp_path):
    path = _write_script(tmp_path, "teacher_service.sbatch", NODES=1)
    proc = subprocess.Popen(["bash", str(path)], env=_stub_env(tmp_path, ["svc", "t1"], STUB_TRAIN="wait"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(tmp_path / "train.started")
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 75, out
    assert (tmp_path / "train.signals").read_text().split() == ["USR1"]
    assert (tmp_path / "service.signals").read_text().split() == ["TERM"]
    assert "requeue 4242" in _calls(tmp_path)


# --------------------------------------------------------------------------------------------
# torchrun_node.py: the workers' exit code and signal forwarding
# --------------------------------------------------------------------------------------------


def test_node_exit_code_policy():
    from megatron_distill.resilience import EXIT_PREEMPTED

    assert torchrun_node.EXIT_PREEMPTED == EXIT_PREEMPTED == 75
    f = torchrun_node.node_exit_code
    assert f({}) == 0
    assert f({0: 75, 1: 75}) == 75
    assert f({0: -9, 1: 75}) == 75  # the rest of the group killed by torchrun after one worker exited 75
    assert f({0: 75, 1: 1}) == 1  # a real failure wins: no requeue
    assert f({0: -15, 1: 77}) == 77
    assert f({2: 76, 0: 2}) == 2  # lowest rank first
    assert f({0: -9, 1: -15}) == 137


def test_torchrun_node_forwards_usr1_and_passes_the_exit_code_through(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent("""
        import os, signal, sys, time
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        signal.signal(signal.SIGTERM, lambda *a: got.append(2))
        open(os.path.join(os.environ["OUT"], "ready"), "w").close()
        while not got:
            time.sleep(0.01)
        time.sleep(0.3)  # "saving a checkpoint": torchrun must neither stop nor kill us meanwhile
        open(os.path.join(os.environ["OUT"], "saved"), "w").write(str(got))
        sys.exit(75)
    """))
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SLURM_DIR / "torchrun_node.py"), "--standalone",
                             "--nproc-per-node", "1", "--max-restarts", "0", "--monitor-interval", "0.05", str(worker)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(tmp_path / "ready", timeout=30)
        proc.send_signal(signal.SIGUSR1)  # plain torchrun dies of SIGUSR1 and exits 1 for a worker's 75
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 75, out
    assert (tmp_path / "saved").read_text() == "[1]"
    assert "worker exit codes {0: 75} -> exit 75" in out
