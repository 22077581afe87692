"""Tests for launch/tpu_vm.py and launch/gpu.py.

The scripts are run as subprocesses, almost always with ``--dry-run``, and
the printed commands are parsed back with ``shlex``. No network and no gcloud
are needed: the few non-dry runs use a fake ``gcloud`` on PATH, or
``--host=localhost`` with a temporary $HOME.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_vm.py")
GPU = os.path.join(REPO, "launch", "gpu.py")
LIBTPU = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
TARGET = ["--name=gd-test", "--zone=us-central2-b"]


def run(script, *args, env=None, cwd=REPO):
  """Runs a launcher; returns the CompletedProcess (text mode)."""
  return subprocess.run([sys.executable, script, *args], capture_output=True,
                        text=True, cwd=cwd, env=env, timeout=60)


def dry(script, *args):
  """Dry-runs a launcher, asserts success; returns the argv of each line."""
  proc = run(script, *args, "--dry-run")
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def remote_script(argv):
  """The shell snippet a printed gcloud ssh / ssh / bash -c line runs."""
  if argv[:2] == ["bash", "-c"]:
    return argv[2]
  if argv[0] == "ssh":
    return argv[-1]
  (command,) = [a for a in argv if a.startswith("--command=")]
  return command[len("--command="):]


def main_argv(script):
  """Tokens of the gdistill.main invocation inside a training snippet."""
  tokens = shlex.split(script)
  start = tokens.index("gdistill.main") - 2  # <python> -m gdistill.main
  return tokens[start:tokens.index(">", start)]


def env_of(script):
  """KEY=VALUE assignments passed to ``env`` before the python command."""
  tokens = shlex.split(script)
  start = tokens.index("env") + 1
  end = tokens.index("gdistill.main") - 2
  return dict(t.split("=", 1) for t in tokens[start:end])


def assert_usage_error(proc, fragment):
  """Exit code 2, a single line on stderr mentioning ``fragment``."""
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  assert proc.stdout == ""
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert "error:" in lines[0] and fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------
# tpu_vm.py


def test_tpu_all_dry_run_prints_every_step():
  lines = dry(TPU, "all", *TARGET, "--accelerator-type=v4-8",
              "--workdir=gs://bucket/gd/run1",
              "--config.note=hello world", "--config.batch_size=512")
  create, tar, scp, setup, train = lines
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "gd-test",
                    "--zone=us-central2-b", "--accelerator-type=v4-8",
                    "--version=tpu-ubuntu2204-base"]
  assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", REPO, "."]
  assert "--exclude=./.git" in tar
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar[2]]
  assert scp[6] == "gd-test:gdistill-src.tar.gz" and "--worker=all" in scp
  assert setup[4:6] == ["ssh", "gd-test"] and "--worker=all" in setup
  sh = remote_script(setup)
  assert f"-m pip install 'jax[tpu]' -f {LIBTPU}" in sh
  assert "-m pip install -e '.[gcs]'" in sh
  assert sh.index("pip install -e '.[gcs]'") < sh.index("jax[tpu]")
  assert train[4:6] == ["ssh", "gd-test"] and "--worker=all" in train
  sh = remote_script(train)
  assert "nohup" in sh and "gdistill-logs/train.log" in sh
  assert main_argv(sh) == [
      "python3", "-m", "gdistill.main", "--config=configs/imagenet64.py",
      "--workdir=gs://bucket/gd/run1", "--config.note=hello world",
      "--config.batch_size=512"]
  # The override with a space is quoted inside the remote command.
  assert "'--config.note=hello world'" in sh


def test_tpu_create_flags():
  (create,) = dry(TPU, "create", *TARGET, "--accelerator-type=v5litepod-8",
                  "--project=my-proj", "--spot")
  assert create[5:] == ["gd-test", "--zone=us-central2-b",
                        "--accelerator-type=v5litepod-8",
                        "--version=v2-alpha-tpuv5-lite", "--project=my-proj",
                        "--spot"]
  (create,) = dry(TPU, "create", *TARGET, "--accelerator-type=v4-32",
                  "--version=tpu-vm-v4-base", "--preemptible")
  assert create[-2:] == ["--version=tpu-vm-v4-base", "--preemptible"]


def test_tpu_setup_from_git_on_pod_slice():
  (setup,) = dry(TPU, "setup", *TARGET, "--accelerator-type=v4-32",
                 "--repo-url=https://example.com/gdistill.git", "--ref=v1",
                 "--jax-version=0.4.35")
  sh = remote_script(setup)
  assert "git clone https://example.com/gdistill.git" in sh
  assert 'git -C "$HOME"/gdistill checkout v1' in sh
  assert f"'jax[tpu]==0.4.35' -f {LIBTPU}" in sh
  assert "local_device_count" not in sh  # backend init would wait for peers


def test_tpu_train_local_workdir_and_env():
  proc = run(TPU, "train", *TARGET, "--accelerator-type=v4-32",
             "--workdir=runs/x", "--env=XLA_FLAGS=--xla_foo=1 --xla_bar",
             "--config.a.b=1", "--dry-run")
  assert proc.returncode == 0
  assert "warning:" in proc.stderr and "gs://" in proc.stderr
  (train,) = [shlex.split(l) for l in proc.stdout.splitlines()]
  sh = remote_script(train)
  assert '--workdir="$HOME"/runs/x' in sh
  assert main_argv(sh)[-1] == "--config.a.b=1"
  assert env_of(sh)["XLA_FLAGS"] == "--xla_foo=1 --xla_bar"


def test_tpu_logs_stop_fetch_delete():
  (logs,) = dry(TPU, "logs", *TARGET, "--worker=1", "--lines=5")
  assert "--worker=1" in logs
  assert remote_script(logs) == 'tail -n 5 -F "$HOME"/gdistill-logs/train.log'
  (stop,) = dry(TPU, "stop", *TARGET)
  assert "--worker=all" in stop and "kill" in remote_script(stop)
  assert dry(TPU, "fetch", *TARGET, "--workdir=gs://b/gd/run1/") == [
      ["mkdir", "-p", "runs/gd-test/run1"],
      ["gsutil", "-m", "rsync", "-r", "gs://b/gd/run1", "runs/gd-test/run1"]]
  mkdir, scp = dry(TPU, "fetch", *TARGET, "--workdir=wd/run1", "--dest=out")
  assert mkdir == ["mkdir", "-p", "out"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "gd-test:wd/run1",
                 "out", "--zone=us-central2-b", "--worker=0", "--recurse"]
  assert dry(TPU, "delete", *TARGET, "--project=p-1") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "gd-test",
       "--zone=us-central2-b", "--project=p-1", "--quiet"]]


@pytest.mark.parametrize("args, fragment", [
    (["create", "--zone=us-central2-b", "--accelerator-type=v4-8"], "--name"),
    (["create", "--name=gd", "--accelerator-type=v4-8"], "--zone"),
    (["create", *TARGET, "--accelerator-type=v4_8"], "accelerator type"),
    (["create", *TARGET, "--accelerator-type=v5e-8"], "v5litepod-8"),
    (["create", "--name=Bad_Name", "--zone=us-central2-b",
      "--accelerator-type=v4-8"], "--name"),
    (["create", "--name=gd", "--zone=uscentral", "--accelerator-type=v4-8"],
     "--zone"),
    (["create", *TARGET, "--accelerator-type=v4-8", "--spot",
      "--preemptible"], "--spot"),
    (["train", *TARGET], "--workdir"),
    (["train", *TARGET, "--workdir=w", "--config.lr"], "--config.KEY=VALUE"),
    (["train", *TARGET, "--workdir=w", "--bogus=1"], "--bogus"),
    (["logs", *TARGET, "--config.lr=1"], "--config.lr=1"),
    (["setup", *TARGET, "--ref=main"], "--repo-url"),
    (["setup", *TARGET, "--remote-dir=/"], "--remote-dir"),
    (["frobnicate", *TARGET], "frobnicate"),
])
def test_tpu_bad_arguments_exit_2(args, fragment):
  assert_usage_error(run(TPU, *args, "--dry-run"), fragment)


def _fake_gcloud(tmp_path, exit_code):
  """A ``gcloud`` on PATH that logs its argv and exits with ``exit_code``."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  log = tmp_path / "calls.txt"
  fake = bindir / "gcloud"
  fake.write_text(f"#!{sys.executable}\nimport shlex, sys\n"
                  f"open({str(log)!r}, 'a').write(shlex.join(['gcloud'] + "
                  f"sys.argv[1:]) + '\\n')\nsys.exit({exit_code})\n")
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
  return env, log


def test_tpu_real_run_executes_the_dry_run_commands(tmp_path):
  env, log = _fake_gcloud(tmp_path, 0)
  args = ["delete", *TARGET]
  printed = run(TPU, *args, "--dry-run").stdout
  proc = run(TPU, *args, env=env)
  assert proc.returncode == 0, proc.stderr
  assert log.read_text() == printed


def test_tpu_real_run_stops_on_first_failure(tmp_path):
  env, log = _fake_gcloud(tmp_path, 3)
  proc = run(TPU, "all", *TARGET, "--accelerator-type=v4-8",
             "--workdir=gs://b/r", "--repo-url=https://example.com/r.git",
             env=env)
  assert proc.returncode == 3
  assert "command failed with exit code 3: gcloud compute tpus tpu-vm create" \
      in proc.stderr
  assert len(log.read_text().splitlines()) == 1  # setup/train never ran


def test_missing_executable_is_reported(tmp_path):
  env = dict(os.environ, PATH=str(tmp_path))
  proc = run(TPU, "delete", *TARGET, env=env)
  assert proc.returncode == 127
  assert "command not found: gcloud" in proc.stderr


# ----------------------------------------------------------------------------
# gpu.py


def test_gpu_single_host_local(tmp_path):
  setup, train = dry(GPU, "all", "--host=localhost", "--gpus=0,1",
                     f"--workdir={tmp_path}/run1", "--config.seed=3")
  assert setup[:2] == ["bash", "-c"]
  sh = remote_script(setup)
  assert f"cd {REPO}" in sh and "-m pip install 'jax[cuda12]'" in sh
  sh = remote_script(train)
  assert main_argv(sh) == [
      "python3", "-m", "gdistill.main", "--config=configs/imagenet64.py",
      f"--workdir={tmp_path}/run1", "--config.seed=3"]
  env = env_of(sh)
  assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
  assert not any(k.startswith("JAX_") for k in env)


def test_gpu_local_relative_workdir_is_relative_to_cwd(tmp_path):
  proc = run(GPU, "train", "--host=localhost", "--workdir=wd", "--dry-run",
             cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  (train,) = [shlex.split(l) for l in proc.stdout.splitlines()]
  assert f"--workdir={tmp_path}/wd" in main_argv(remote_script(train))


def test_gpu_multi_host_one_process_per_host():
  hosts = ["alice@gpu-a", "gpu-b", "10.0.0.3"]
  lines = dry(GPU, "train", f"--hosts={','.join(hosts)}", "--port=4321",
              "--workdir=gs://b/gd/run1", "--venv=venvs/gd",
              "--config.note=a b")
  assert len(lines) == len(hosts)
  for index, (argv, host) in enumerate(zip(lines, hosts)):
    assert argv[0] == "ssh" and argv[-2] == host
    sh = remote_script(argv)
    env = env_of(sh)
    assert env["JAX_COORDINATOR_ADDRESS"] == "gpu-a:4321"
    assert env["JAX_NUM_PROCESSES"] == "3"
    assert env["JAX_PROCESS_ID"] == str(index)
    assert main_argv(sh) == [
        "$HOME/venvs/gd/bin/python", "-m", "gdistill.main",
        "--config=configs/imagenet64.py", "--workdir=gs://b/gd/run1",
        "--config.note=a b", "--config.multihost=True"]


def test_gpu_coordinator_override_and_ssh_options():
  lines = dry(GPU, "train", "--hosts=h1,h2", "--coordinator=10.1.2.3:9999",
              "--ssh-port=2222", "--ssh-key=/keys/id", "--workdir=gs://b/r",
              "--config.multihost=True")
  for argv in lines:
    assert argv[:5] == ["ssh", "-p", "2222", "-i", "/keys/id"]
    sh = remote_script(argv)
    assert env_of(sh)["JAX_COORDINATOR_ADDRESS"] == "10.1.2.3:9999"
    assert main_argv(sh).count("--config.multihost=True") == 1


def test_gpu_remote_setup_ships_code_then_installs():
  mkdir, rsync, install = dry(GPU, "setup", "--host=me@gpu", "--ssh-port=22",
                              "--jax-version=0.4.35")
  assert mkdir == ["ssh", "-p", "22", "me@gpu", 'mkdir -p "$HOME"/gdistill']
  assert rsync[0] == "rsync" and rsync[-2:] == [REPO + "/", "me@gpu:gdistill/"]
  assert "--exclude=/.git" in rsync and rsync[rsync.index("-e") + 1] == \
      "ssh -p 22"
  sh = remote_script(install)
  assert "-m pip install -e '.[gcs]'" in sh and "'jax[cuda12]==0.4.35'" in sh
  (clone,) = dry(GPU, "setup", "--host=gpu", "--repo-url=https://e.com/r.git")
  assert 'git clone https://e.com/r.git "$HOME"/gdistill' in remote_script(clone)


def test_gpu_logs_stop_fetch():
  (logs,) = dry(GPU, "logs", "--hosts=h1,h2", "--process=1", "--no-follow")
  assert logs == ["ssh", "h2", 'tail -n 100 "$HOME"/gdistill-logs/train.log']
  stops = dry(GPU, "stop", "--hosts=h1,h2")
  assert [s[1] for s in stops] == ["h1", "h2"]
  assert dry(GPU, "fetch", "--hosts=h1", "--workdir=wd/run1",
             "--dest=out") == [["mkdir", "-p", "out/run1"],
                               ["rsync", "-az", "h1:wd/run1/", "out/run1/"]]
  assert dry(GPU, "fetch", "--hosts=h1", "--workdir=gs://b/r")[1] == [
      "gsutil", "-m", "rsync", "-r", "gs://b/r", "runs/gpu/r"]


def test_gpu_real_local_stop_runs_bash(tmp_path):
  env = dict(os.environ, HOME=str(tmp_path))
  proc = run(GPU, "stop", "--host=localhost", env=env)
  assert proc.returncode == 0, proc.stderr
  assert "gdistill not running" in proc.stdout


@pytest.mark.parametrize("args, fragment", [
    (["train", "--workdir=w"], "--hosts"),
    (["train", "--hosts=h1,h1", "--workdir=w"], "twice"),
    (["train", "--hosts=localhost,h2", "--workdir=w"], "localhost"),
    (["train", "--hosts=-oProxyCommand=x", "--workdir=w"], "invalid host"),
    (["train", "--hosts=h1", "--workdir=w", "--gpus=first"], "--gpus"),
    (["train", "--hosts=h1", "--workdir=w", "--config.x"], "--config.KEY"),
    (["train", "--hosts=h1", "--workdir=w", "--port=0"], "--port"),
    (["train", "--hosts=h1", "--workdir=w", "--env=1X=2"], "--env"),
    (["logs", "--hosts=h1", "--process=1"], "--process"),
    (["stop", "--hosts=h1", "--config.x=1"], "--config.x=1"),
    (["setup", "--host=localhost", "--repo-url=u"], "--repo-url"),
])
def test_gpu_bad_arguments_exit_2(args, fragment):
  assert_usage_error(run(GPU, *args, "--dry-run"), fragment)
