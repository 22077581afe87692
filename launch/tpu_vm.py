#!/usr/bin/env python3
"""Create, set up, train on, and tear down a Cloud TPU VM for gdistill.

Every step is a ``gcloud compute tpus tpu-vm ...`` (or ``tar``/``gsutil``)
command. ``--dry-run`` prints the exact commands, one per line, instead of
running them. Without it they run in order and the first failure stops the
script with its exit code.

Subcommands:
  create   gcloud compute tpus tpu-vm create
  setup    ship the code (or git clone it) to every worker, pip install
           gdistill and jax[tpu] (libtpu index)
  train    start `python -m gdistill.main --config=... --workdir=...` on every
           worker (--worker=all), detached, log in ~/gdistill-logs/train.log
  logs     stream the training log of one worker (default: worker 0)
  stop     stop the training process on every worker
  fetch    copy the workdir back (gsutil rsync for gs://, else scp from
           worker 0)
  delete   delete the TPU VM
  all      create + setup + train

Examples:
  python launch/tpu_vm.py all --name=gd-v4 --zone=us-central2-b \\
      --accelerator-type=v4-8 --workdir=gs://my-bucket/gdistill/run1 \\
      --config.seed=1 --dry-run
  python launch/tpu_vm.py logs --name=gd-v4 --zone=us-central2-b
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position

PROG = "tpu_vm.py"
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
REMOTE_TARBALL = "gdistill-src.tar.gz"

# Accelerator families gcloud accepts, and the default TPU software version.
DEFAULT_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
_ACCELERATOR = re.compile(r"^(v2|v3|v4|v5litepod|v5p|v6e)-([1-9][0-9]*)$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_PROJECT = re.compile(r"^[a-z][-a-z0-9.:]*[a-z0-9]$")


# ----------------------------------------------------------------------------
# Validation.


def parse_accelerator(accelerator: str) -> tuple[str, int]:
  """Splits ``v4-32`` into ``("v4", 32)``; raises UsageError when unknown."""
  m = _ACCELERATOR.match(accelerator or "")
  if not m:
    hint = ""
    if (accelerator or "").startswith("v5e-"):
      hint = f" (v5e is spelled v5litepod-{accelerator[4:]})"
    raise common.UsageError(
        f"unknown accelerator type {accelerator!r}{hint}; expected "
        "FAMILY-SIZE with FAMILY in " + ", ".join(DEFAULT_VERSIONS) +
        " (e.g. v4-8, v4-32, v5litepod-8)")
  return m.group(1), int(m.group(2))


def is_multi_host(accelerator: str) -> bool:
  """True for pod slices spanning several VMs (more than 8 cores/chips)."""
  return parse_accelerator(accelerator)[1] > 8


def validate(args) -> None:
  """Checks flags that argparse cannot; raises UsageError on the first."""
  if not _NAME.match(args.name):
    raise common.UsageError(
        f"invalid --name {args.name!r}: lowercase letters, digits and '-', "
        "starting with a letter, at most 63 characters")
  if not _ZONE.match(args.zone):
    raise common.UsageError(
        f"invalid --zone {args.zone!r} (expected e.g. us-central2-b)")
  if args.project is not None and not _PROJECT.match(args.project):
    raise common.UsageError(f"invalid --project {args.project!r}")
  if getattr(args, "accelerator_type", None) is not None:
    parse_accelerator(args.accelerator_type)
  if getattr(args, "remote_dir", None) is not None:
    args.remote_dir = common.check_remote_dir(args.remote_dir)
  if getattr(args, "ref", None) and not getattr(args, "repo_url", None):
    raise common.UsageError("--ref needs --repo-url")
  if getattr(args, "repo_url", None) is None and hasattr(args, "src"):
    if not os.path.isdir(args.src):
      raise common.UsageError(f"--src {args.src!r} is not a directory")
  if getattr(args, "worker", None) is not None and args.worker < 0:
    raise common.UsageError("--worker must be >= 0")
  if getattr(args, "lines", None) is not None and args.lines < 0:
    raise common.UsageError("--lines must be >= 0")


# ----------------------------------------------------------------------------
# Command builders (pure: they return argv lists).


def location_flags(args) -> list[str]:
  """``--zone`` and, when given, ``--project``."""
  flags = [f"--zone={args.zone}"]
  if args.project:
    flags.append(f"--project={args.project}")
  return flags


def ssh(args, worker: str, script: str) -> list[str]:
  """``gcloud ... ssh NAME --worker=W --command=SCRIPT``."""
  return GCLOUD_TPU + ["ssh", args.name, *location_flags(args),
                       f"--worker={worker}", f"--command={script}"]


def create_commands(args) -> list[list[str]]:
  """The ``tpu-vm create`` command."""
  family, _ = parse_accelerator(args.accelerator_type)
  version = args.version or DEFAULT_VERSIONS[family]
  argv = GCLOUD_TPU + ["create", args.name, f"--zone={args.zone}",
                       f"--accelerator-type={args.accelerator_type}",
                       f"--version={version}"]
  if args.project:
    argv.append(f"--project={args.project}")
  if args.spot:
    argv.append("--spot")
  if args.preemptible:
    argv.append("--preemptible")
  return [argv]


def local_tarball(name: str) -> str:
  """Where the local source tarball is written before scp."""
  return os.path.join(tempfile.gettempdir(), f"gdistill-src-{name}.tar.gz")


def install_check(py: str, multi_host: bool) -> str:
  """Smoke test after install.

  On a single host it initialises the TPU backend (catches a jax/libtpu
  mismatch). On pod slices initialising the backend waits for every worker,
  so only the import is checked there.
  """
  if multi_host:
    return f"{py} -c 'import jax; print(\"jax\", jax.__version__)'"
  return (f"{py} -c 'import jax; print(\"jax\", jax.__version__, "
          "jax.local_device_count(), \"TPU devices\")'")


def setup_commands(args) -> list[list[str]]:
  """Ship or clone the code on every worker, then install it and jax[tpu]."""
  py = common.python_for(args.python, args.venv)
  code = args.remote_dir
  commands, steps = [], [common.venv_step(args.python, args.venv)]
  if args.repo_url:
    steps += common.git_checkout_steps(args.repo_url, args.ref, code)
  else:
    tarball = local_tarball(args.name)
    commands.append(common.tar_source_command(os.path.abspath(args.src),
                                              tarball))
    commands.append(GCLOUD_TPU + ["scp", tarball,
                                  f"{args.name}:{REMOTE_TARBALL}",
                                  *location_flags(args), "--worker=all"])
    steps += [f"rm -rf {common.home_path(code)}",
              f"mkdir -p {common.home_path(code)}",
              f"tar -xzf {common.home_path(REMOTE_TARBALL)} -C "
              f"{common.home_path(code)}",
              f"rm -f {common.home_path(REMOTE_TARBALL)}"]
  steps += common.pip_install_steps(
      py, code, common.jax_requirement("tpu", args.jax_version), LIBTPU_INDEX)
  multi = (is_multi_host(args.accelerator_type)
           if args.accelerator_type else True)
  steps.append(install_check(py, multi))
  commands.append(ssh(args, "all", common.and_chain(steps)))
  return commands


def train_commands(args, overrides) -> list[list[str]]:
  """Start the same training command, detached, on every worker."""
  py = common.python_for(args.python, args.venv)
  env = common.parse_env(args.env)
  script = common.start_training_script(
      py, args.remote_dir, args.config,
      common.remote_workdir_word(args.workdir), overrides, env)
  return [ssh(args, "all", script)]


def logs_commands(args) -> list[list[str]]:
  """Print / follow the training log of one worker."""
  script = common.tail_log_script(args.lines, not args.no_follow)
  return [ssh(args, str(args.worker), script)]


def stop_commands(args) -> list[list[str]]:
  """Stop training on every worker."""
  return [ssh(args, "all", common.stop_training_script())]


def fetch_commands(args) -> list[list[str]]:
  """Copy the workdir to ``DEST/<basename of workdir>``."""
  dest = args.dest or os.path.join("runs", args.name)
  if args.workdir.startswith("gs://"):
    return common.gsutil_fetch_commands(args.workdir, dest)
  remote = common.home_relative(args.workdir.rstrip("/"))
  return [["mkdir", "-p", dest],
          GCLOUD_TPU + ["scp", f"{args.name}:{remote}", dest,
                        *location_flags(args), f"--worker={args.worker}",
                        "--recurse"]]


def delete_commands(args) -> list[list[str]]:
  """Delete the TPU VM without a confirmation prompt."""
  return [GCLOUD_TPU + ["delete", args.name, *location_flags(args), "--quiet"]]


def warn_about_workdir(args) -> None:
  """Pod slices need a workdir every worker can see (gs://)."""
  if (args.accelerator_type and is_multi_host(args.accelerator_type)
      and not args.workdir.startswith("gs://")):
    common.warn(PROG, f"{args.accelerator_type} spans several hosts; a local "
                "--workdir is not shared between workers, use gs://...")


# ----------------------------------------------------------------------------
# Command line.


def add_target_args(p, dry_run=True):
  """--name/--zone/--project/--dry-run, shared by every subcommand."""
  g = p.add_argument_group("TPU VM")
  g.add_argument("--name", required=True, help="TPU VM name")
  g.add_argument("--zone", required=True, help="zone, e.g. us-central2-b")
  g.add_argument("--project", default=None,
                 help="GCP project (default: gcloud's configured project)")
  if dry_run:
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands instead of running them")


def add_accelerator_arg(p, required):
  """--accelerator-type (required for create, informative elsewhere)."""
  p.add_argument("--accelerator-type", required=required, default=None,
                 help="e.g. v4-8, v4-32, v5litepod-8, v5p-8, v6e-8"
                 + ("" if required else "; tells setup/train whether this "
                    "is a multi-host pod slice"))


def add_create_args(p):
  """Flags for ``create``."""
  add_accelerator_arg(p, required=True)
  p.add_argument("--version", default=None,
                 help="TPU software version (default by family: "
                 + ", ".join(f"{k}: {v}" for k, v in DEFAULT_VERSIONS.items())
                 + ")")
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true",
                        help="Spot VM (cheaper, can be preempted)")
  capacity.add_argument("--preemptible", action="store_true",
                        help="preemptible VM (older flavour of --spot)")


def build_parser():
  """The argparse tree for all subcommands."""
  summary, details = __doc__.split("\n\n", 1)
  parser = common.new_parser(PROG, summary)
  parser.epilog = details
  sub = parser.add_subparsers(dest="command", required=True,
                              metavar="SUBCOMMAND")

  def subcommand(name, help_text):
    return sub.add_parser(name, help=help_text, description=help_text,
                          allow_abbrev=False)

  p = subcommand("create", "create the TPU VM")
  add_target_args(p)
  add_create_args(p)

  p = subcommand("setup", "install jax[tpu] and gdistill on every worker")
  add_target_args(p)
  add_accelerator_arg(p, required=False)
  common.add_python_args(p, common.DEFAULT_REMOTE_DIR)
  common.add_source_args(p)

  p = subcommand("train", "start training on every worker (--worker=all)")
  add_target_args(p)
  add_accelerator_arg(p, required=False)
  common.add_python_args(p, common.DEFAULT_REMOTE_DIR)
  common.add_train_args(p)

  p = subcommand("logs", "stream the training log of one worker")
  add_target_args(p)
  p.add_argument("--worker", type=int, default=0, help="worker (default: 0)")
  p.add_argument("--lines", type=int, default=100,
                 help="lines of history to show (default: 100)")
  p.add_argument("--no-follow", action="store_true",
                 help="print and exit instead of following")

  p = subcommand("stop", "stop the training process on every worker")
  add_target_args(p)

  p = subcommand("fetch", "copy the workdir back to this machine")
  add_target_args(p)
  p.add_argument("--workdir", required=True,
                 help="the --workdir used for training")
  p.add_argument("--dest", default=None,
                 help="local directory (default: runs/NAME); the workdir "
                 "lands in DEST/<basename of workdir>")
  p.add_argument("--worker", type=int, default=0,
                 help="worker to scp from for non-gs:// workdirs (default: 0)")

  p = subcommand("delete", "delete the TPU VM")
  add_target_args(p)

  p = subcommand("all", "create + setup + train")
  add_target_args(p)
  add_create_args(p)
  common.add_python_args(p, common.DEFAULT_REMOTE_DIR)
  common.add_source_args(p)
  common.add_train_args(p)
  return parser


TRAINING_COMMANDS = ("train", "all")


def commands_for(args, overrides) -> list[list[str]]:
  """All commands the chosen subcommand runs, in order."""
  builders = {
      "create": lambda: create_commands(args),
      "setup": lambda: setup_commands(args),
      "train": lambda: train_commands(args, overrides),
      "logs": lambda: logs_commands(args),
      "stop": lambda: stop_commands(args),
      "fetch": lambda: fetch_commands(args),
      "delete": lambda: delete_commands(args),
      "all": lambda: (create_commands(args) + setup_commands(args)
                      + train_commands(args, overrides)),
  }
  return builders[args.command]()


def main(argv=None) -> int:
  """Entry point; returns the exit code."""
  def parse_and_run():
    args, extras = build_parser().parse_known_args(argv)
    overrides = common.split_overrides(extras,
                                       args.command in TRAINING_COMMANDS)
    validate(args)
    if args.command in TRAINING_COMMANDS:
      warn_about_workdir(args)
    common.Runner(args.dry_run).run_all(commands_for(args, overrides))
  return common.main_wrapper(PROG, parse_and_run)


if __name__ == "__main__":
  sys.exit(main())
