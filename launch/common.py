"""Shared helpers for the launch scripts (``tpu_vm.py`` and ``gpu.py``).

Everything here is plain standard library: argument parsing with one-line
errors, shell quoting, building the remote shell snippets that install and
start gdistill, and a runner that either prints commands (``--dry-run``) or
executes them, stopping at the first failure.

Conventions shared by both launchers:

* Remote paths that are relative (``gdistill``, ``gdistill-logs``) are
  relative to the remote ``$HOME``; ``~/x`` means the same thing.
* A relative ``--workdir`` on a remote machine is relative to its $HOME,
  not to the code directory: ``setup`` replaces the code directory, and must
  never take checkpoints with it. ``--config`` is relative to the code
  directory, where training runs from.
* Training writes its log to ``$HOME/gdistill-logs/train.log`` and its pid to
  ``$HOME/gdistill-logs/train.pid`` on every host / worker.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import shlex
import subprocess
import sys
from typing import Iterable, Mapping, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/imagenet64.py"
DEFAULT_REMOTE_DIR = "gdistill"
LOG_DIR = "gdistill-logs"
LOG_FILE = LOG_DIR + "/train.log"
PID_FILE = LOG_DIR + "/train.pid"
MAIN_MODULE = "gdistill.main"

# Paths (relative to the repo root) never shipped to a remote machine.
SRC_EXCLUDES_TOP = (".git", "runs", "workdirs", "venv", ".venv", "build",
                    "dist", ".pytest_cache", LOG_DIR)
SRC_EXCLUDES_ANY = ("__pycache__", "*.pyc", "*.egg-info")

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OVERRIDE = re.compile(r"^--config\.[A-Za-z_][A-Za-z0-9_.]*=")


class UsageError(Exception):
  """Bad command-line arguments; reported on one line with exit code 2."""


class CommandError(Exception):
  """A launched command failed; carries the exit code to propagate."""

  def __init__(self, message: str, returncode: int):
    super().__init__(message)
    self.returncode = returncode or 1


class OneLineParser(argparse.ArgumentParser):
  """ArgumentParser whose errors are a single line on stderr, exit code 2."""

  def error(self, message):  # pylint: disable=missing-function-docstring
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def new_parser(prog: str, description: str) -> OneLineParser:
  """Top-level parser with exact option matching (``--config`` vs overrides)."""
  return OneLineParser(
      prog=prog, description=description, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter)


# ----------------------------------------------------------------------------
# Running commands.


class Runner:
  """Prints (dry run) or runs local commands, one argv list at a time."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def run(self, argv: Sequence[str]) -> None:
    """Prints ``shlex.join(argv)`` or runs it with ``check=True``."""
    line = shlex.join(argv)
    if self.dry_run:
      print(line, flush=True)
      return
    print(f"+ {line}", file=sys.stderr, flush=True)
    try:
      subprocess.run(list(argv), check=True)
    except FileNotFoundError as e:
      raise CommandError(
          f"command not found: {argv[0]} (is it installed and on PATH?)",
          127) from e
    except subprocess.CalledProcessError as e:
      raise CommandError(
          f"command failed with exit code {e.returncode}: {line}",
          e.returncode) from e

  def run_all(self, commands: Iterable[Sequence[str]]) -> None:
    """Runs commands in order, stopping at the first failure."""
    for argv in commands:
      self.run(argv)


def main_wrapper(prog: str, parse_and_run) -> int:
  """Calls ``parse_and_run()`` and maps errors to messages and exit codes.

  Returns the process exit code: 0 on success, 2 for usage errors, the failed
  command's exit code otherwise, 130 on Ctrl-C.
  """
  try:
    parse_and_run()
  except UsageError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  except CommandError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return e.returncode
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130
  return 0


def warn(prog: str, message: str) -> None:
  """Prints a warning on stderr (never on stdout, which dry runs own)."""
  print(f"{prog}: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------
# Argument validation.


def split_overrides(extras: Sequence[str], allowed: bool) -> list[str]:
  """Validates unparsed arguments as ``--config.KEY=VALUE`` overrides.

  ``allowed`` is False for subcommands that do not train, where any leftover
  argument is an error.
  """
  for arg in extras:
    if not allowed:
      raise UsageError(f"unrecognized argument: {arg}")
    if arg.startswith("--config.") and "=" not in arg:
      raise UsageError(
          f"write config overrides as --config.KEY=VALUE (got {arg})")
    if not _OVERRIDE.match(arg):
      raise UsageError(
          f"unrecognized argument: {arg} (only --config.KEY=VALUE overrides "
          "are passed through)")
  return list(extras)


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
  """Parses repeated ``--env KEY=VALUE`` flags into an ordered dict."""
  env = {}
  for pair in pairs or ():
    key, sep, value = pair.partition("=")
    if not sep or not _ENV_KEY.match(key):
      raise UsageError(f"--env expects KEY=VALUE, got {pair!r}")
    env[key] = value
  return env


def check_remote_dir(path: str) -> str:
  """Rejects remote code directories that would be dangerous to ``rm -rf``."""
  norm = path.rstrip("/")
  if norm in ("", "~", ".", "..", "$HOME") or posixpath.normpath(norm) == "/":
    raise UsageError(f"--remote-dir must name a dedicated directory, got {path!r}")
  if norm.startswith("-"):
    raise UsageError(f"--remote-dir must not start with '-', got {path!r}")
  return norm


# ----------------------------------------------------------------------------
# Remote shell snippets.


def home_path(path: str) -> str:
  """Shell-quotes a remote path; relative and ``~/`` paths go under $HOME."""
  if path == "~":
    return '"$HOME"'
  if path.startswith("~/"):
    path = path[2:]
  if path.startswith("/"):
    return shlex.quote(path)
  return '"$HOME"/' + shlex.quote(path)


def home_relative(path: str) -> str:
  """Path for scp/rsync remote specs, which are already relative to $HOME."""
  return path[2:] if path.startswith("~/") else path


def remote_workdir_word(workdir: str) -> str:
  """Shell word for ``--workdir`` on a remote: gs:// as is, else under $HOME."""
  if workdir.startswith("gs://"):
    return shlex.quote(workdir)
  return home_path(workdir)


def python_for(python: str, venv: str | None) -> str:
  """The (quoted) interpreter: the venv's python when a venv is used."""
  if venv:
    return home_path(posixpath.join(venv, "bin", "python"))
  return home_path(python) if "/" in python else shlex.quote(python)


def and_chain(steps: Iterable[str]) -> str:
  """Joins shell steps with ``&&`` so the first failure stops the rest."""
  return " && ".join(s for s in steps if s)


def venv_step(python: str, venv: str | None) -> str:
  """Creates the venv if it does not exist yet (empty when no venv)."""
  if not venv:
    return ""
  base = python_for(python, None)
  return (f"{{ [ -x {home_path(posixpath.join(venv, 'bin', 'python'))} ] || "
          f"{base} -m venv {home_path(venv)}; }}")


def git_checkout_steps(repo_url: str, ref: str | None, code_dir: str) -> list[str]:
  """Fresh clone of ``repo_url`` into ``code_dir`` (optionally at ``ref``)."""
  steps = [f"rm -rf {home_path(code_dir)}",
           f"git clone {shlex.quote(repo_url)} {home_path(code_dir)}"]
  if ref:
    steps.append(f"git -C {home_path(code_dir)} checkout {shlex.quote(ref)}")
  return steps


def pip_install_steps(py: str, code_dir: str, jax_requirement: str,
                      find_links: str | None = None) -> list[str]:
  """Installs gdistill (editable) and then the accelerator build of JAX.

  gdistill goes first so that its pinned ``jax`` is in place; installing the
  ``jax[...]`` extra afterwards (without ``-U``) pulls the plugin / libtpu
  that matches that jax version.
  """
  jax_cmd = f"{py} -m pip install {shlex.quote(jax_requirement)}"
  if find_links:
    jax_cmd += f" -f {shlex.quote(find_links)}"
  return [
      f"cd {home_path(code_dir)}",
      f"{py} -m pip install -U pip",
      f"{py} -m pip install -e '.[gcs]'",  # gs:// workdirs need gcsfs
      jax_cmd,
  ]


def jax_requirement(extra: str, version: str | None) -> str:
  """``jax[extra]`` optionally pinned to ``==version``."""
  return f"jax[{extra}]" + (f"=={version}" if version else "")


def train_command(py: str, config: str, workdir_word: str,
                  overrides: Sequence[str]) -> str:
  """The exact training command line (already shell-quoted).

  ``workdir_word`` is a ready shell word (see ``remote_workdir_word``).
  """
  head = shlex.join(["-m", MAIN_MODULE, f"--config={config}"])
  tail = shlex.join(list(overrides))
  return f"{py} {head} --workdir={workdir_word}" + (f" {tail}" if tail else "")


def env_assignments(env: Mapping[str, str]) -> str:
  """``K=V ...`` words for ``env``, each shell-quoted."""
  return " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())


def start_training_script(py: str, code_dir: str, config: str,
                          workdir_word: str, overrides: Sequence[str],
                          env: Mapping[str, str]) -> str:
  """Remote shell: refuse if already running, else start training detached.

  The process is started with ``nohup`` and all three standard streams
  redirected, so the ssh session returns at once and the run survives the
  disconnect. Its pid goes to ``PID_FILE`` (used by ``stop``).
  """
  log, pid = home_path(LOG_FILE), home_path(PID_FILE)
  full_env = {"PYTHONUNBUFFERED": "1", **env}
  cmd = train_command(py, config, workdir_word, overrides)
  guard = (f"if [ -f {pid} ] && kill -0 \"$(cat {pid})\" 2>/dev/null; then "
           f"echo \"gdistill already running on $(hostname) (pid $(cat {pid})); "
           "use the stop subcommand first\" >&2; exit 1; fi")
  start = (f"(nohup env {env_assignments(full_env)} {cmd} > {log} 2>&1 "
           f"< /dev/null & echo $! > {pid})")
  return and_chain([
      f"mkdir -p {home_path(LOG_DIR)}",
      guard,
      f"cd {home_path(code_dir)}",
      start,
      f"echo \"started gdistill on $(hostname), log: {LOG_FILE}\"",
  ])


def stop_training_script() -> str:
  """Remote shell: SIGTERM the process recorded in ``PID_FILE``, if alive."""
  pid = home_path(PID_FILE)
  return (f"if [ -f {pid} ] && kill -0 \"$(cat {pid})\" 2>/dev/null; then "
          f"kill \"$(cat {pid})\" && echo \"stopped gdistill on $(hostname)\"; "
          "else echo \"gdistill not running on $(hostname)\"; fi")


def tail_log_script(lines: int, follow: bool) -> str:
  """Remote shell: print (and optionally follow) the training log."""
  return f"tail -n {int(lines)}{' -F' if follow else ''} {home_path(LOG_FILE)}"


def tar_source_command(src: str, tarball: str) -> list[str]:
  """Local ``tar`` of the source tree, without VCS data, venvs and outputs."""
  argv = ["tar", "-czf", tarball]
  argv += [f"--exclude=./{p}" for p in SRC_EXCLUDES_TOP]
  argv += [f"--exclude={p}" for p in SRC_EXCLUDES_ANY]
  return argv + ["-C", src, "."]


def gsutil_fetch_commands(workdir: str, dest: str) -> list[list[str]]:
  """Copy a gs:// workdir into ``dest/<basename>`` with ``gsutil rsync``."""
  target = os.path.join(dest, posixpath.basename(workdir.rstrip("/")))
  return [["mkdir", "-p", target],
          ["gsutil", "-m", "rsync", "-r", workdir.rstrip("/"), target]]


def add_train_args(parser: argparse.ArgumentParser, workdir_required=True):
  """Flags shared by every subcommand that starts training."""
  g = parser.add_argument_group(
      "training", "Extra --config.KEY=VALUE arguments are passed through to "
      "gdistill.main unchanged.")
  g.add_argument("--config", default=DEFAULT_CONFIG,
                 help="config file, relative to the code dir "
                 f"(default: {DEFAULT_CONFIG})")
  g.add_argument("--workdir", required=workdir_required,
                 help="gs://bucket/path, or a path on the machine; relative "
                 "paths are relative to $HOME there (gpu.py --host=localhost: "
                 "to the current directory)")
  g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for the training process "
                 "(repeatable)")


def add_python_args(parser: argparse.ArgumentParser, default_remote_dir: str):
  """Flags naming the remote code directory and Python interpreter."""
  g = parser.add_argument_group("remote environment")
  g.add_argument("--remote-dir", default=default_remote_dir,
                 help="code directory on the machine, relative to $HOME "
                 f"unless absolute (default: {default_remote_dir})")
  g.add_argument("--python", default="python3",
                 help="remote Python interpreter (default: python3)")
  g.add_argument("--venv", default=None,
                 help="use (and create during setup) a virtualenv at this "
                 "path, relative to $HOME unless absolute")


def add_source_args(parser: argparse.ArgumentParser):
  """Flags choosing where the code comes from during setup."""
  g = parser.add_argument_group("source (default: ship the local checkout)")
  g.add_argument("--repo-url", default=None,
                 help="git URL to clone on the machine instead of shipping "
                 "the local tree")
  g.add_argument("--ref", default=None,
                 help="branch, tag or commit to check out with --repo-url")
  g.add_argument("--src", default=REPO_ROOT,
                 help="local source tree to ship (default: this checkout)")
  g.add_argument("--jax-version", default=None,
                 help="pin jax to this version (default: what gdistill "
                 "resolves)")
