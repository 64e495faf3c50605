"""Stand-in base images for the container test, made from Debian's packages.

No image registry is reachable here, so `python:3.11`, `python:3.11-slim` and `redis:7` are
replaced (through the compose file's documented FORKLIFT_*_IMAGE variables) by images that
behave like them for the project's Dockerfile and compose file:

- python: `debootstrap --variant=minbase bookworm` with python3, pip, venv, ca-certificates and
  passwd (`groupadd`/`useradd`), and a virtual environment at /usr/local, so that `python` and
  `pip` are on PATH and `pip install` works as in the official images (site-packages under
  /usr/local/lib/python3.11). The machine's CA bundle replaces Debian's, so pip in a build
  reaches PyPI through whatever TLS proxy the machine uses. Imported with `docker import`.
- redis: bookworm's redis-server 7 on top of it (tests/containers/redis/), entrypoint
  `redis-server` with protected mode off, /data as working directory and volume, redis-cli
  for the healthcheck.

The debootstrap tree is cached under /var/cache/forklift-test-images (outside the repository,
kept between runs); the images are tagged with a digest of everything they are made of (this
recipe, the CA bundle, the apt configuration) and not built again while that tag exists.

    python -m tests.containers.standins      # build (or find) them by hand
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path("/var/cache/forklift-test-images")
SUITE = "bookworm"
PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates", "passwd")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APT = Path("/etc/apt")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Bump when the way the tree is made changes (the digest covers the rest).
TREE_RECIPE = 1
IMAGE_PATH = "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
# On the stand-ins, and so inherited by every image built on them (the test's builds): how
# prune_stale_builds tells them from anyone else's images.
LABEL = "org.forklift.test-standin"
KEEP_RECENT_S = 6 * 3600

Log = Callable[[str], None]


@dataclass
class StandIns:
    """The stand-in image tags, and which of them this run had to make."""

    python: str
    redis: str
    built: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Unavailable(RuntimeError):
    """The stand-ins cannot be made on this machine (the reason says why)."""


def _sources() -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of every Debian source apt reads: one-line `.list` and deb822 `.sources`."""
    files = [APT / "sources.list", *sorted((APT / "sources.list.d").glob("*.list"))]
    for path in files:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    yield words[1], [words[2]]
    for path in sorted((APT / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        key, value = line.split(":", 1)
                        fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    yield uri, fields.get("suites", "").split()


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses for the suite (its proxy or local mirror
    included), so debootstrap reaches the same place apt does."""
    for uri, suites in _sources():
        if SUITE in suites:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def apt_config_files() -> list[Path]:
    """The machine's apt settings that say how to fetch (proxies, snapshot validity):
    copied into the images, so apt in a build fetches as the machine's apt does."""
    found = []
    for path in [APT / "apt.conf", *sorted((APT / "apt.conf.d").glob("*"))]:
        with contextlib.suppress(OSError):
            if path.is_file() and "Acquire" in path.read_text():
                found.append(path)
    return found


def apt_proxy_env() -> dict[str, str]:
    """`http_proxy`/`https_proxy` for debootstrap (which reads no apt configuration) from the
    machine's `Acquire::http(s)::Proxy`, if one is set."""
    env: dict[str, str] = {}
    try:
        dump = subprocess.run(
            ["apt-config", "dump"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return env
    for scheme in ("http", "https"):
        match = re.search(rf'^Acquire::{scheme}::Proxy "([^"]+)";', dump, re.M | re.I)
        if match and match.group(1).upper() != "DIRECT":
            env[f"{scheme}_proxy"] = match.group(1)
    return env


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:12]


def tree_key(mirror: str) -> str:
    return _digest(f"{TREE_RECIPE}|{SUITE}|minbase|{','.join(PACKAGES)}|{mirror}".encode())


def image_key(mirror: str) -> str:
    """Everything an image is made of: the recipe (this file, the redis stand-in's files),
    the mirror, the CA bundle and the apt settings copied in."""
    parts = [tree_key(mirror).encode(), Path(__file__).read_bytes()]
    parts += [p.read_bytes() for p in sorted((HERE / "redis").iterdir()) if p.is_file()]
    parts.append(CA_BUNDLE.read_bytes() if CA_BUNDLE.exists() else b"")
    parts += [p.name.encode() + b"\0" + p.read_bytes() for p in apt_config_files()]
    return _digest(*parts)


def _run(argv: list[str], log_file, check: bool = True, **kwargs) -> None:
    log_file.write(f"\n$ {' '.join(argv)}\n".encode())
    log_file.flush()
    result = subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({result.returncode}): see {log_file.name}")


def _unmount_under(path: Path) -> None:
    """Anything debootstrap left mounted inside a tree (a failed run): unmount it before the
    tree is removed, so nothing outside the tree is ever deleted through a mount."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    points = [m.split()[1] for m in mounts if len(m.split()) > 1]
    for point in sorted(points, key=len, reverse=True):
        if point == str(path) or point.startswith(f"{path}/"):
            subprocess.run(["umount", "-l", point], check=False)


def image_exists(docker: str, tag: str) -> bool:
    return (
        subprocess.run(
            [docker, "image", "inspect", tag], capture_output=True, timeout=60
        ).returncode
        == 0
    )


def _untag_others(docker: str, keep: set[str], log_file) -> None:
    """Stand-ins of an earlier recipe (or CA bundle) are not used again: drop their tags, so
    the disk does not fill with them (an image still in use by another keeps its layers)."""
    listed = subprocess.run(
        [docker, "images", "--format", "{{.Repository}}:{{.Tag}}", "forklift-standin/*"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    for tag in sorted(set(listed) - keep):
        _run([docker, "image", "rm", tag], log_file, timeout=120, check=False)


def prune_stale_builds(docker: str, build_output: str, started: float) -> list[str]:
    """Remove the untagged leftovers of earlier builds on the stand-ins: every untagged image
    with no children that carries the stand-in label, that this build did not use (the
    classic builder names each step's image, `---> <id>`, cached or not) and that was made
    KEEP_RECENT_S before this build `started` (so builds of another checkout beside or
    between these runs keep their cache). Their untagged parents go with them: old code
    layers and old bases do not pile up, while this build's layers, the cache of the next
    one, stay. The engine refuses to remove an image a container still uses."""
    used = set(re.findall(r"^ ---> ([0-9a-f]{12})\b", build_output, re.M))
    cutoff = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - KEEP_RECENT_S))
    ids = subprocess.run(
        [docker, "images", "-aq", "--no-trunc"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    if not ids:
        return []
    found = subprocess.run(
        [docker, "image", "inspect", *ids], capture_output=True, text=True, timeout=120
    )
    if found.returncode != 0:
        return []
    images = json.loads(found.stdout)
    parents = {image.get("Parent") for image in images}
    stale = [
        image["Id"]
        for image in images
        if LABEL in ((image.get("Config") or {}).get("Labels") or {})
        and not image.get("RepoTags")
        and image["Id"] not in parents
        and image["Id"].removeprefix("sha256:")[:12] not in used
        and str(image.get("Created", ""))[:19] < cutoff
    ]
    for image_id in stale:
        subprocess.run([docker, "image", "rm", image_id], capture_output=True, timeout=120)
    return stale


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One builder at a time per machine (two test runs must not debootstrap one tree)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_tree(mirror: str, log_file, log: Log) -> Path:
    """The debootstrap tree with the venv at /usr/local, from the cache or made now."""
    key = tree_key(mirror)
    tree = CACHE / f"{SUITE}-{key}"
    if (tree / ".complete").exists():
        return tree / "rootfs"
    if shutil.which("debootstrap") is None:
        raise Unavailable("debootstrap is not installed (bash .ci/install-system-deps.sh)")
    work = CACHE / f".tmp-{key}-{os.getpid()}"
    _unmount_under(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    log(f"debootstrap {SUITE} from {mirror} into {tree} (once; cached afterwards)")
    try:
        env = {**os.environ, **apt_proxy_env()}
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(work / "rootfs"),
                mirror,
            ],
            log_file,
            env=env,
            timeout=1800,
        )
        rootfs = work / "rootfs"
        # python:3.11 images have `python` and `pip` on PATH and a writable site-packages:
        # a virtual environment at /usr/local gives the same (PEP 668 forbids pip on Debian's).
        _run(
            ["chroot", str(rootfs), "/usr/bin/python3", "-m", "venv", "/usr/local"],
            log_file,
            timeout=300,
        )
        for pattern in (
            "var/cache/apt/archives/*.deb",
            "var/cache/apt/*.bin",
            "var/lib/apt/lists/*_*",
        ):
            for path in rootfs.glob(pattern):
                path.unlink()
        _unmount_under(work)
        (work / ".complete").write_text(f"{time.monotonic() - started:.0f} s\n")
        # Trees of other recipes (another mirror, an older recipe) are not used again.
        for old in CACHE.glob(f"{SUITE}-*"):
            _unmount_under(old)
            shutil.rmtree(old, ignore_errors=True)
        work.rename(tree)
    except BaseException:
        _unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"debootstrap took {time.monotonic() - started:.0f} s")
    return tree / "rootfs"


def import_python(docker: str, rootfs: Path, tag: str, log_file) -> None:
    """`docker import` of the tree, with the machine's CA bundle and apt fetch settings."""
    if CA_BUNDLE.exists():
        shutil.copyfile(CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
    conf_dir = rootfs / "etc/apt/apt.conf.d"
    for old in conf_dir.glob("90forklift-host-*"):
        old.unlink()
    for path in apt_config_files():
        shutil.copyfile(path, conf_dir / f"90forklift-host-{path.name}")
    argv = [
        docker,
        "import",
        "--change",
        f"ENV {IMAGE_PATH}",
        "--change",
        "ENV LANG=C.UTF-8",
        "--change",
        'CMD ["python3"]',
        "--change",
        f"LABEL {LABEL}={SUITE}",
        "-",
        tag,
    ]
    log_file.write(f"\n$ tar -C {rootfs} -c . | {' '.join(argv)}\n".encode())
    log_file.flush()
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", "-", "."],
        stdout=subprocess.PIPE,
        stderr=log_file,
    )
    try:
        result = subprocess.run(
            argv, stdin=tar.stdout, stdout=log_file, stderr=subprocess.STDOUT, timeout=900
        )
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar_code = tar.wait(60)
    if result.returncode != 0 or tar_code != 0:
        raise RuntimeError(f"docker import failed: see {log_file.name}")


def build_redis(docker: str, base: str, tag: str, log_file) -> None:
    # The classic builder: the Debian engine has no buildx, and this file needs nothing more.
    _run(
        [docker, "build", "--build-arg", f"BASE={base}", "-t", tag, str(HERE / "redis")],
        log_file,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        timeout=900,
    )


def ensure(docker: str, log_path: Path, log: Log = print) -> StandIns:
    """The stand-in images, found by their content tag or made now (log in `log_path`)."""
    if os.geteuid() != 0:
        raise Unavailable("the stand-in images need root (debootstrap, chroot)")
    mirror = apt_mirror()
    key = image_key(mirror)
    images = StandIns(
        python=f"forklift-standin/python:3.11-{SUITE}-{key}",
        redis=f"forklift-standin/redis:7-{SUITE}-{key}",
    )
    started = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(), log_path.open("ab") as log_file:
        if not image_exists(docker, images.python):
            rootfs = build_tree(mirror, log_file, log)
            log(f"docker import {images.python}")
            import_python(docker, rootfs, images.python, log_file)
            images.built.append(images.python)
        if not image_exists(docker, images.redis):
            log(f"docker build {images.redis} (tests/containers/redis)")
            build_redis(docker, images.python, images.redis, log_file)
            images.built.append(images.redis)
        if images.built:
            _untag_others(docker, {images.python, images.redis}, log_file)
    images.seconds = time.monotonic() - started
    return images


if __name__ == "__main__":
    from tests.containers.engine import docker_client

    client = docker_client()
    if client is None:
        sys.exit("no docker client")
    made = ensure(client, Path("test-artifacts/logs/standin-images.log"))
    print(f"{made.python}\n{made.redis}\nbuilt: {made.built or 'none'} in {made.seconds:.0f} s")
