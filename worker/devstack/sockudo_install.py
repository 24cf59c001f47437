"""Install Sockudo (the Ably-compatible server) from Rust's package registry, once per machine.

The build takes long (see README), so it lands in a per-user cache outside the clone and
is reused by every later run, CI's fresh clones included.

    python -m worker.devstack.sockudo_install        # install if missing, print the path
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SOCKUDO_VERSION = "5.2.0"
SOCKUDO_FEATURES = "ably-compat"
# What the crate's build runs beyond the Rust toolchain, and the Debian package with it:
# a C compiler and linker, and protoc for a metrics exporter's protobuf build script.
BUILD_TOOLS = {
    "cc": "gcc",
    "make": "make",
    "pkg-config": "pkg-config",
    "protoc": "protobuf-compiler",
}


class SockudoInstallError(RuntimeError):
    """The Sockudo binary is missing and could not be built."""


def install_root() -> Path:
    """Where this pinned build lives: `SOCKUDO_HOME`, else the user's cache directory."""
    base = os.environ.get("SOCKUDO_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ai-transport-worker"
    )
    return Path(base) / f"sockudo-{SOCKUDO_VERSION}-{SOCKUDO_FEATURES}"


def binary_path() -> Path:
    """The Sockudo binary to run: `SOCKUDO_BIN` if set, else the pinned cached build."""
    override = os.environ.get("SOCKUDO_BIN")
    return Path(override) if override else install_root() / "bin" / "sockudo"


def _cargo() -> str:
    cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
    if not os.path.exists(cargo):
        raise SockudoInstallError(
            "cargo was not found: install the Rust toolchain (https://rustup.rs, or "
            "`apt-get install cargo`), then run `python -m worker.devstack.sockudo_install`"
        )
    return cargo


def _install_build_packages() -> None:
    """Install missing Debian build packages when we are root on a Debian-like system."""
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SockudoInstallError(f"the Sockudo build needs these packages: {' '.join(missing)}")
    print(f"sockudo: installing build packages {missing}", file=sys.stderr, flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True)


def ensure_installed() -> Path:
    """Return the Sockudo binary, building the pinned version first if it is not there."""
    binary = binary_path()
    if binary.exists():
        return binary
    if os.environ.get("SOCKUDO_BIN"):
        raise SockudoInstallError(f"SOCKUDO_BIN points at {binary}, which does not exist")
    root = install_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time: a second caller waits for the first one's binary.
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        return _build(root, binary)


def _build(root: Path, binary: Path) -> Path:
    cargo = _cargo()
    _install_build_packages()
    print(
        f"sockudo: building {SOCKUDO_VERSION} --features {SOCKUDO_FEATURES} into {root} "
        "(first time only; 12 to 18 minutes on 2 cores)",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    cmd = [
        cargo, "install", "--locked", "sockudo",
        "--version", SOCKUDO_VERSION, "--features", SOCKUDO_FEATURES,
        "--root", str(root),
    ]  # fmt: skip
    result = subprocess.run(cmd)
    if result.returncode != 0 or not binary.exists():
        raise SockudoInstallError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}")
    minutes = (time.monotonic() - started) / 60
    print(f"sockudo: built in {minutes:.1f} min: {binary}", file=sys.stderr, flush=True)
    return binary


def main() -> int:
    try:
        print(ensure_installed())
    except SockudoInstallError as exc:
        print(f"sockudo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
