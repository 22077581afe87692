#!/usr/bin/env python3
"""Set up and run gdistill on GPU machines over ssh (or on this machine).

One training process per host sees all of that host's GPUs (restrict them
with --gpus, which sets CUDA_VISIBLE_DEVICES). With several hosts
(--hosts=h1,h2,...) one process is started per host with
JAX_COORDINATOR_ADDRESS=<first host>:<port>, JAX_NUM_PROCESSES,
JAX_PROCESS_ID and --config.multihost=True. --host=localhost runs the
commands here with bash instead of ssh, from the local checkout (--src).

``--dry-run`` prints the exact commands, one per line, instead of running
them. Without it they run in order and the first failure stops the script
with its exit code.

Subcommands:
  setup    ship the code (rsync, or git clone with --repo-url) and pip install
           gdistill and jax[cuda12] on every host
  train    start `python -m gdistill.main --config=... --workdir=...` on every
           host, detached, log in ~/gdistill-logs/train.log
  logs     stream the training log of one host (default: process 0)
  stop     stop the training process on every host
  fetch    copy the workdir back (gsutil rsync for gs://, else rsync)
  all      setup + train

Examples:
  python launch/gpu.py all --host=localhost --workdir=workdirs/run1 --dry-run
  python launch/gpu.py train --hosts=gpu1,gpu2 --workdir=gs://b/gdistill/run1 \\
      --config.seed=1 --dry-run
"""

from __future__ import annotations

import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position

PROG = "gpu.py"
LOCALHOST = "localhost"
DEFAULT_PORT = 1234
_HOST = re.compile(r"^(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9][A-Za-z0-9._-]*$")
_GPUS = re.compile(r"^[0-9]+(,[0-9]+)*$")
_EXTRA = re.compile(r"^[a-z0-9_-]+$")


# ----------------------------------------------------------------------------
# Validation.


def parse_hosts(value: str) -> list[str]:
  """Splits ``h1,h2`` and checks each ``[user@]host``; rejects duplicates."""
  hosts = [h.strip() for h in (value or "").split(",") if h.strip()]
  if not hosts:
    raise common.UsageError("--hosts needs at least one host")
  for host in hosts:
    if not _HOST.match(host):
      raise common.UsageError(f"invalid host {host!r} (expected [user@]host)")
  if len(set(hosts)) != len(hosts):
    raise common.UsageError("--hosts lists a host twice; one process per host")
  if LOCALHOST in hosts and len(hosts) > 1:
    raise common.UsageError(
        "localhost cannot be combined with other hosts; name this machine by "
        "an address the other hosts can reach")
  return hosts


def is_local(host: str) -> bool:
  """``localhost`` runs commands here, without ssh."""
  return host == LOCALHOST


def validate(args) -> None:
  """Checks flags that argparse cannot; raises UsageError on the first."""
  args.hosts = parse_hosts(args.hosts)
  local = is_local(args.hosts[0])
  if getattr(args, "remote_dir", None) is not None:
    args.remote_dir = common.check_remote_dir(args.remote_dir)
  if getattr(args, "repo_url", None) and local:
    raise common.UsageError(
        "--repo-url is for remote hosts; localhost uses the checkout at --src")
  if getattr(args, "ref", None) and not getattr(args, "repo_url", None):
    raise common.UsageError("--ref needs --repo-url")
  if hasattr(args, "src") and not getattr(args, "repo_url", None):
    if not os.path.isdir(args.src):
      raise common.UsageError(f"--src {args.src!r} is not a directory")
  if getattr(args, "gpus", None) is not None and not _GPUS.match(args.gpus):
    raise common.UsageError(f"--gpus expects e.g. 0,1,2,3, got {args.gpus!r}")
  if getattr(args, "jax_extra", None) and not _EXTRA.match(args.jax_extra):
    raise common.UsageError(f"invalid --jax-extra {args.jax_extra!r}")
  if not 0 < args.port < 65536:
    raise common.UsageError(f"--port must be in 1..65535, got {args.port}")
  if args.ssh_port is not None and not 0 < args.ssh_port < 65536:
    raise common.UsageError(f"--ssh-port must be in 1..65535, got {args.ssh_port}")
  if getattr(args, "process", None) is not None and not (
      0 <= args.process < len(args.hosts)):
    raise common.UsageError(
        f"--process must be in 0..{len(args.hosts) - 1}, got {args.process}")
  if getattr(args, "lines", None) is not None and args.lines < 0:
    raise common.UsageError("--lines must be >= 0")
  if args.command in TRAINING_COMMANDS:
    warn_about_workdir(args)


def warn_about_workdir(args) -> None:
  """Several hosts need a workdir they all see (gs:// or a shared mount)."""
  if len(args.hosts) > 1 and not args.workdir.startswith("gs://"):
    common.warn(PROG, "several hosts with a non-gs:// --workdir: make sure it "
                "is on a filesystem every host shares")


# ----------------------------------------------------------------------------
# Command builders (pure: they return argv lists).


def ssh_options(args) -> list[str]:
  """``-p PORT`` / ``-i KEY`` when given."""
  opts = []
  if args.ssh_port is not None:
    opts += ["-p", str(args.ssh_port)]
  if args.ssh_key:
    opts += ["-i", os.path.expanduser(args.ssh_key)]
  return opts


def on_host(args, host: str, script: str) -> list[str]:
  """Runs a shell snippet on ``host``: ``ssh HOST SCRIPT`` or ``bash -c``."""
  if is_local(host):
    return ["bash", "-c", script]
  return ["ssh", *ssh_options(args), host, script]


def code_dir(args, host: str) -> str:
  """The checkout used on ``host``: --src here, --remote-dir elsewhere."""
  if is_local(host):
    return os.path.abspath(args.src)
  return args.remote_dir


def workdir_word(args, host: str) -> str:
  """``--workdir`` as a shell word: cwd-relative here, $HOME-relative remote."""
  if is_local(host) and not args.workdir.startswith("gs://"):
    return shlex.quote(os.path.abspath(os.path.expanduser(args.workdir)))
  return common.remote_workdir_word(args.workdir)


def rsync_source_commands(args, host: str) -> list[list[str]]:
  """Create the remote dir and rsync the local tree into it."""
  remote = common.home_relative(args.remote_dir)
  argv = ["rsync", "-az", "--delete"]
  argv += [f"--exclude=/{p}" for p in common.SRC_EXCLUDES_TOP]
  argv += [f"--exclude={p}" for p in common.SRC_EXCLUDES_ANY]
  opts = ssh_options(args)
  if opts:
    argv += ["-e", " ".join(["ssh", *opts])]
  argv += [os.path.abspath(args.src).rstrip("/") + "/", f"{host}:{remote}/"]
  return [on_host(args, host, f"mkdir -p {common.home_path(args.remote_dir)}"),
          argv]


def setup_commands(args) -> list[list[str]]:
  """Per host: get the code there, install gdistill and jax[cuda]."""
  commands = []
  requirement = common.jax_requirement(args.jax_extra, args.jax_version)
  py = common.python_for(args.python, args.venv)
  for host in args.hosts:
    code = code_dir(args, host)
    steps = [common.venv_step(args.python, args.venv)]
    if args.repo_url:
      steps += common.git_checkout_steps(args.repo_url, args.ref, code)
    elif not is_local(host):
      commands += rsync_source_commands(args, host)
    steps += common.pip_install_steps(py, code, requirement)
    steps.append(f"{py} -c 'import jax; print(\"jax\", jax.__version__, "
                 "jax.local_devices())'")
    commands.append(on_host(args, host, common.and_chain(steps)))
  return commands


def coordinator_address(args) -> str:
  """``--coordinator`` or the first host (without ``user@``) plus --port."""
  if args.coordinator:
    return args.coordinator
  return f"{args.hosts[0].rpartition('@')[2]}:{args.port}"


def process_env(args, index: int) -> dict[str, str]:
  """Environment of training process ``index``."""
  env = {}
  if args.gpus is not None:
    env["CUDA_VISIBLE_DEVICES"] = args.gpus
  if len(args.hosts) > 1:
    env["JAX_COORDINATOR_ADDRESS"] = coordinator_address(args)
    env["JAX_NUM_PROCESSES"] = str(len(args.hosts))
    env["JAX_PROCESS_ID"] = str(index)
  env.update(common.parse_env(args.env))
  return env


def process_overrides(args, overrides) -> list[str]:
  """User overrides, plus ``--config.multihost=True`` with several hosts."""
  overrides = list(overrides)
  if len(args.hosts) > 1 and not any(
      o.startswith("--config.multihost=") for o in overrides):
    overrides.append("--config.multihost=True")
  return overrides


def train_commands(args, overrides) -> list[list[str]]:
  """One detached training process per host, process 0 (coordinator) first."""
  py = common.python_for(args.python, args.venv)
  commands = []
  for index, host in enumerate(args.hosts):
    script = common.start_training_script(
        py, code_dir(args, host), args.config, workdir_word(args, host),
        process_overrides(args, overrides), process_env(args, index))
    commands.append(on_host(args, host, script))
  return commands


def logs_commands(args) -> list[list[str]]:
  """Print / follow the training log of one process."""
  script = common.tail_log_script(args.lines, not args.no_follow)
  return [on_host(args, args.hosts[args.process], script)]


def stop_commands(args) -> list[list[str]]:
  """Stop training on every host."""
  return [on_host(args, h, common.stop_training_script()) for h in args.hosts]


def fetch_commands(args) -> list[list[str]]:
  """Copy the workdir to ``DEST/<basename of workdir>``."""
  dest = args.dest or os.path.join("runs", "gpu")
  workdir = args.workdir.rstrip("/")
  if workdir.startswith("gs://"):
    return common.gsutil_fetch_commands(workdir, dest)
  target = os.path.join(dest, os.path.basename(workdir))
  host = args.hosts[args.process]
  if is_local(host):
    source = os.path.abspath(os.path.expanduser(workdir))
  else:
    source = f"{host}:{common.home_relative(workdir)}"
  argv = ["rsync", "-az"]
  opts = ssh_options(args)
  if opts and not is_local(host):
    argv += ["-e", " ".join(["ssh", *opts])]
  return [["mkdir", "-p", target], argv + [source + "/", target + "/"]]


# ----------------------------------------------------------------------------
# Command line.


def add_host_args(p):
  """--hosts, ssh options and --dry-run, shared by every subcommand."""
  g = p.add_argument_group("hosts")
  g.add_argument("--hosts", "--host", required=True, metavar="HOSTS",
                 help="comma-separated [user@]host list, or localhost; the "
                 "first host is process 0 and the coordinator")
  g.add_argument("--ssh-port", type=int, default=None, help="ssh port")
  g.add_argument("--ssh-key", default=None, help="ssh identity file")
  g.add_argument("--port", type=int, default=DEFAULT_PORT,
                 help="coordinator port on the first host, must be reachable "
                 f"from the others (default: {DEFAULT_PORT})")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="coordinator address if the first host's ssh name is "
                 "not reachable from the others (e.g. a private IP)")
  p.add_argument("--dry-run", action="store_true",
                 help="print the commands instead of running them")


def add_gpu_train_args(p):
  """Training flags plus --gpus."""
  common.add_train_args(p)
  p.add_argument("--gpus", default=None, metavar="IDS",
                 help="CUDA_VISIBLE_DEVICES for every process, e.g. 0,1 "
                 "(default: all GPUs of each host)")


def add_setup_args(p):
  """Source and install flags."""
  common.add_source_args(p)
  p.add_argument("--jax-extra", default="cuda12",
                 help="pip extra of jax to install (default: cuda12, i.e. "
                 "'jax[cuda12]' with CUDA from pip wheels)")


def build_parser():
  """The argparse tree for all subcommands."""
  summary, details = __doc__.split("\n\n", 1)
  parser = common.new_parser(PROG, summary)
  parser.epilog = details
  sub = parser.add_subparsers(dest="command", required=True,
                              metavar="SUBCOMMAND")

  def subcommand(name, help_text):
    p = sub.add_parser(name, help=help_text, description=help_text,
                       allow_abbrev=False)
    add_host_args(p)
    return p

  p = subcommand("setup", "install jax[cuda12] and gdistill on every host")
  common.add_python_args(p, common.DEFAULT_REMOTE_DIR)
  add_setup_args(p)

  p = subcommand("train", "start one training process per host")
  common.add_python_args(p, common.DEFAULT_REMOTE_DIR)
  p.add_argument("--src", default=common.REPO_ROOT,
                 help="checkout used with --host=localhost")
  add_gpu_train_args(p)

  p = subcommand("logs", "stream the training log of one process")
  p.add_argument("--process", type=int, default=0,
                 help="index into --hosts (default: 0)")
  p.add_argument("--lines", type=int, default=100,
                 help="lines of history to show (default: 100)")
  p.add_argument("--no-follow", action="store_true",
                 help="print and exit instead of following")

  subcommand("stop", "stop the training process on every host")

  p = subcommand("fetch", "copy the workdir back to this machine")
  p.add_argument("--workdir", required=True,
                 help="the --workdir used for training")
  p.add_argument("--dest", default=None,
                 help="local directory (default: runs/gpu); the workdir "
                 "lands in DEST/<basename of workdir>")
  p.add_argument("--process", type=int, default=0,
                 help="host to copy from, index into --hosts (default: 0)")

  p = subcommand("all", "setup + train")
  common.add_python_args(p, common.DEFAULT_REMOTE_DIR)
  add_setup_args(p)
  add_gpu_train_args(p)
  return parser


TRAINING_COMMANDS = ("train", "all")


def commands_for(args, overrides) -> list[list[str]]:
  """All commands the chosen subcommand runs, in order."""
  builders = {
      "setup": lambda: setup_commands(args),
      "train": lambda: train_commands(args, overrides),
      "logs": lambda: logs_commands(args),
      "stop": lambda: stop_commands(args),
      "fetch": lambda: fetch_commands(args),
      "all": lambda: setup_commands(args) + train_commands(args, overrides),
  }
  return builders[args.command]()


def main(argv=None) -> int:
  """Entry point; returns the exit code."""
  def parse_and_run():
    args, extras = build_parser().parse_known_args(argv)
    overrides = common.split_overrides(extras,
                                       args.command in TRAINING_COMMANDS)
    validate(args)
    common.Runner(args.dry_run).run_all(commands_for(args, overrides))
  return common.main_wrapper(PROG, parse_and_run)


if __name__ == "__main__":
  sys.exit(main())
