"""Build (and cache) a minimal Linux guest that runs the kernel's own NBD client.

Everything comes from Debian packages fetched with ``apt-get download``: the
cloud kernel (for ``nbd.ko`` and the virtio network driver), busybox-static,
nbd-client, e2fsprogs, xfsprogs and util-linux, plus the library packages they
depend on. The packages are unpacked with ``dpkg-deb -x`` and only the files
the guest needs (the binaries, the shared libraries ``ldd`` names and the
kernel modules with their dependencies) go into an uncompressed ``newc``
initramfs. Uncompressed, because a TCG guest decompresses slowly and the image
is only ~30 MB.

Images are cached under ``/var/cache/portalbd-guest`` (or
``$PORTALBD_GUEST_CACHE``), keyed by every package version and by this
module's guest layout, so a new Debian point release rebuilds by itself and a
cached build costs two ``apt-cache`` calls.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sh

from portalbd.guest import scripts

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
TOOL_PACKAGES = ("busybox-static", "nbd-client", "e2fsprogs", "xfsprogs", "util-linux")

# Real tools copied into the guest's /sbin (callers use full paths: busybox's
# shell runs its own applet of the same name otherwise).
GUEST_TOOLS = (
    "nbd-client",
    "mke2fs",
    "e2fsck",
    "dumpe2fs",
    "mkfs.xfs",
    "xfs_repair",
    "fstrim",
    "fsfreeze",
    "blkdiscard",
)
# Links made next to the tools, as in Debian.
GUEST_TOOL_LINKS = {"mkfs.ext4": "mke2fs", "fsck.ext4": "e2fsck"}
GUEST_DATA_FILES = ("etc/mke2fs.conf",)
# Loaded at boot, each after the modules it depends on. ext4, jbd2 and
# crc32c are built into Debian's cloud kernel.
GUEST_MODULES = ("virtio_pci", "virtio_net", "nbd", "xfs", "qemu_fw_cfg")

# Bumped by hand when the guest layout changes in a way the source hash below
# would not notice (it hashes this file, so that is rare).
LAYOUT_VERSION = 1
MULTIARCH = "x86_64-linux-gnu"
LIB_DIRS = (f"lib/{MULTIARCH}", f"usr/lib/{MULTIARCH}", "lib", "usr/lib", "lib64")
BIN_DIRS = ("sbin", "usr/sbin", "bin", "usr/bin")


class GuestBuildError(RuntimeError):
    """The guest image could not be built; the message says which step failed."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: kernel, initramfs and what they were built from."""

    kernel: Path
    initrd: Path
    kernel_release: str
    packages: dict[str, str]
    key: str


def cache_root() -> Path:
    """The image cache: $PORTALBD_GUEST_CACHE, /var/cache when writable, else ~/.cache."""
    env = os.environ.get("PORTALBD_GUEST_CACHE")
    if env:
        return Path(env)
    system = Path("/var/cache/portalbd-guest")
    if os.access(system if system.exists() else system.parent, os.W_OK):
        return system
    return Path.home() / ".cache" / "portalbd-guest"


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a build tool (through ``sh``): its stdout, or GuestBuildError with its stderr."""
    try:
        tool = sh.Command(argv[0])
    except sh.CommandNotFound:
        raise GuestBuildError(f"{argv[0]} is not installed (needed to build the guest)") from None
    try:
        where = None if cwd is None else str(cwd)
        out = tool(*argv[1:], _cwd=where, _env=env, _timeout=600, _tty_out=False)
    except sh.ErrorReturnCode as exc:
        err = exc.stderr.decode(errors="replace").strip()[-2000:]
        raise GuestBuildError(f"{' '.join(argv[:4])}... failed ({exc.exit_code}): {err}") from None
    return str(out)


# --- package resolution -------------------------------------------------------


def _parse_depends(output: str) -> dict[str, list[str]]:
    """Map each package in `apt-cache depends` output to its first-choice hard dependencies."""
    deps: dict[str, list[str]] = {}
    current: list[str] | None = None
    alternative = False
    for line in output.splitlines():
        if not line.startswith(" "):
            current = deps.setdefault(line.strip(), [])
            alternative = False
            continue
        stripped = line.strip()
        kind, _, target = stripped.partition(": ")
        if current is None or kind.lstrip("|") not in ("Depends", "PreDepends"):
            continue
        # "|Depends: a" starts a group of alternatives whose first member wins.
        if not alternative and not target.startswith("<"):
            current.append(target)
        alternative = kind.startswith("|")
    return deps


def _candidate_versions(packages: Iterable[str]) -> dict[str, str]:
    names = sorted(set(packages))
    out = _run(["apt-cache", "show", "--no-all-versions", *names])
    versions: dict[str, str] = {}
    name = ""
    for line in out.splitlines():
        if line.startswith("Package: "):
            name = line.split(": ", 1)[1].strip()
        elif line.startswith("Version: ") and name and name not in versions:
            versions[name] = line.split(": ", 1)[1].strip()
    missing = [n for n in names if n not in versions]
    if missing:
        raise GuestBuildError(
            f"no installable version of {', '.join(missing)}: run apt-get update first"
        )
    return versions


def resolve_packages() -> dict[str, str]:
    """Every package the guest is made of, with the version apt would fetch now.

    The kernel is whatever the cloud metapackage currently points at; the
    libraries are the closure of the tools' hard dependencies on ``lib*``
    packages (other dependencies, like python3 for xfs_scrub, are not needed).
    """
    wanted = {*TOOL_PACKAGES}
    frontier = {KERNEL_METAPACKAGE, *TOOL_PACKAGES}
    kernels: list[str] = []
    while frontier:
        deps = _parse_depends(_run(["apt-cache", "depends", *sorted(frontier)]))
        if KERNEL_METAPACKAGE in frontier:
            meta = deps.pop(KERNEL_METAPACKAGE, [])
            kernels = [d for d in meta if d.startswith("linux-image-")]
        found = {d for ds in deps.values() for d in ds if d.startswith("lib") and ":" not in d}
        frontier = found - wanted
        wanted |= found
    if not kernels:
        raise GuestBuildError(
            f"apt-cache knows no kernel for {KERNEL_METAPACKAGE}: run apt-get update first"
        )
    return _candidate_versions({kernels[0], *wanted})


def _apt_state() -> str:
    """Changes whenever apt's view of the archive does (an update, a new sources entry)."""
    h = hashlib.sha256()
    for d in (Path("/var/lib/apt/lists"), Path("/etc/apt")):
        if d.is_dir():
            for p in sorted(d.rglob("*")):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolved_packages(root: Path) -> dict[str, str]:
    """resolve_packages(), remembered until apt's package lists change.

    Each apt-cache call costs over a second where apt keeps no binary cache,
    and the lists only change with an `apt-get update`.
    """
    memo = root / "resolved.json"
    state = _apt_state()
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(memo.read_text())
        if data["apt_state"] == state:
            return {str(k): str(v) for k, v in data["packages"].items()}
    packages = resolve_packages()
    root.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(json.dumps({"apt_state": state, "packages": packages}))
    tmp.replace(memo)
    return packages


def image_key(packages: dict[str, str]) -> str:
    """Hash of the package set and of the code and scripts that lay out the guest."""
    h = hashlib.sha256(f"layout {LAYOUT_VERSION}\n".encode())
    for name in sorted(packages):
        h.update(f"{name}={packages[name]}\n".encode())
    h.update(Path(__file__).read_bytes())
    h.update(scripts.INIT.encode())
    h.update(scripts.GUEST_LIB.encode())
    return h.hexdigest()[:16]


def _download(packages: dict[str, str], debs: Path) -> dict[str, Path]:
    debs.mkdir(parents=True, exist_ok=True)
    paths = {n: debs / f"{n}_{v.replace(':', '%3a')}.deb" for n, v in packages.items()}
    missing = [n for n, p in paths.items() if not p.exists()]
    if missing:
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            _run(
                [
                    "apt-get",
                    "download",
                    "-q",
                    "-o",
                    "APT::Sandbox::User=root",
                    *(f"{n}={packages[n]}" for n in missing),
                ],
                cwd=Path(tmp),
            )
            for name in missing:
                got = list(Path(tmp).glob(f"{name}_*.deb"))
                if len(got) != 1:
                    raise GuestBuildError(f"apt-get download left no single .deb for {name}")
                got[0].replace(paths[name])
    return paths


# --- kernel modules -----------------------------------------------------------


def _modinfo(data: bytes) -> dict[str, list[str]]:
    """The key=value strings of an ELF64 module's .modinfo section."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError("kernel module is not a 64-bit ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name = struct.unpack_from("<I", data, base)[0]
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name : end] != b".modinfo":
            continue
        for entry in data[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def _module_bytes(path: Path) -> bytes:
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko"):
        return path.read_bytes()
    raise GuestBuildError(f"unsupported kernel module compression: {path.name}")


def _module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def resolve_modules(moddir: Path, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """The wanted modules and their dependencies as (name, ELF bytes), dependencies first."""
    files = {_module_name(p): p for p in moddir.rglob("*.ko*")}
    builtin_file = moddir / "modules.builtin"
    builtin = (
        {_module_name(Path(line)) for line in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin:
            return
        if name in chain:
            raise GuestBuildError(f"kernel module dependency cycle: {' -> '.join(chain)}")
        if name not in files:
            raise GuestBuildError(f"kernel module {name} is not in {moddir}")
        data = _module_bytes(files[name])
        info = _modinfo(data)
        deps = [d for v in info.get("depends", []) for d in v.split(",") if d]
        for soft in info.get("softdep", []):
            # "pre: a b post: c": pre-dependencies that exist as modules load first.
            pre = re.findall(r"pre:\s*([^:]*?)(?:\s+post:|$)", soft)
            deps += [d for group in pre for d in group.split() if d.replace("-", "_") in files]
        for dep in deps:
            visit(dep, (*chain, name))
        done.add(name)
        order.append((name, data))

    for name in wanted:
        visit(name, ())
    return order


# --- shared libraries ---------------------------------------------------------


def _needed_libraries(binaries: Iterable[Path], pkgroot: Path) -> set[Path]:
    """Libraries (and the loader) the binaries need, taken from the unpacked packages."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(str(pkgroot / d) for d in LIB_DIRS)
    needed: set[Path] = set()
    for binary in binaries:
        out = _run(["ldd", str(binary)], env=env)
        for line in out.splitlines():
            line = line.strip()
            if "not found" in line:
                raise GuestBuildError(f"{binary.name} needs a library no package provides: {line}")
            m = re.search(r"(/\S+)\s+\(0x", line)
            if m:
                needed.add(Path(m.group(1)))
    return needed


def _guest_library_path(lib: Path) -> str:
    """Where a resolved library goes in the guest (the loader keeps its ABI path)."""
    if lib.name.startswith("ld-linux"):
        return "lib64/" + lib.name
    return f"lib/{MULTIARCH}/{lib.name}"


def _library_source(lib: Path, pkgroot: Path) -> Path:
    """Prefer the copy from the unpacked packages; ldd may name the host's loader."""
    for d in LIB_DIRS:
        candidate = pkgroot / d / lib.name
        if candidate.exists():
            return candidate
    return lib


# --- the initramfs ------------------------------------------------------------


def _find_tool(pkgroot: Path, name: str) -> Path:
    for d in BIN_DIRS:
        candidate = pkgroot / d / name
        if candidate.exists():
            return candidate
    raise GuestBuildError(f"no package provided the guest tool {name}")


def _assemble(pkgroot: Path, tree: Path) -> str:
    """Lay the guest's root file system out in `tree`; returns the kernel release."""
    releases = sorted(p.name for p in (pkgroot / "lib/modules").iterdir())
    if len(releases) != 1:
        raise GuestBuildError(f"expected one kernel in the packages, found {releases}")
    release = releases[0]
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "mnt", "lib64"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "usr").mkdir()
    for d in ("bin", "sbin"):
        (tree / "usr" / d).mkdir()

    shutil.copy2(_find_tool(pkgroot, "busybox"), tree / "bin/busybox")
    (tree / "bin/sh").symlink_to("busybox")
    tools = [_find_tool(pkgroot, name) for name in GUEST_TOOLS]
    for tool in tools:
        shutil.copy2(tool.resolve(), tree / "sbin" / tool.name)
    for link, target in GUEST_TOOL_LINKS.items():
        (tree / "sbin" / link).symlink_to(target)
    for lib in _needed_libraries(tools, pkgroot):
        dest = tree / _guest_library_path(lib)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(_library_source(lib, pkgroot).resolve(), dest)
    for rel in GUEST_DATA_FILES:
        src = pkgroot / rel
        if not src.exists():
            raise GuestBuildError(f"no package provided {rel}")
        shutil.copy2(src, tree / rel)

    moddir = tree / "lib/modules" / release
    moddir.mkdir(parents=True)
    names = []
    for name, data in resolve_modules(pkgroot / "lib/modules" / release, GUEST_MODULES):
        (moddir / f"{name}.ko").write_bytes(data)
        names.append(name)
    (tree / "etc/guest-modules").write_text("\n".join(names) + "\n")

    (tree / "init").write_text(scripts.INIT)
    (tree / "init").chmod(0o755)
    (tree / "etc/guest-lib.sh").write_text(scripts.GUEST_LIB)
    return release


def _cpio(tree: Path, out: Path) -> None:
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    with out.open("wb") as fh:
        try:
            sh.Command("cpio")("--quiet", "-o", "-H", "newc", "--owner=0:0",
                               _in="\n".join(names).encode(), _out=fh, _cwd=str(tree),
                               _tty_out=False)  # fmt: skip
        except sh.ErrorReturnCode as exc:
            raise GuestBuildError(f"cpio failed: {exc.stderr.decode(errors='replace')}") from None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_image(root: Path | None = None) -> GuestImage:
    """Return the cached guest for the current package versions, building it if needed."""
    root = root or cache_root()
    packages = resolved_packages(root)
    key = image_key(packages)
    image_dir = root / "images" / key
    with _locked(root):
        manifest = image_dir / "manifest.json"
        if not manifest.exists():
            debs = _download(packages, root / "debs")
            (root / "images").mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root / "images") as tmp:
                work = Path(tmp)
                pkgroot = work / "pkgroot"
                for deb in debs.values():
                    _run(["dpkg-deb", "-x", str(deb), str(pkgroot)])
                tree = work / "tree"
                tree.mkdir()
                release = _assemble(pkgroot, tree)
                staged = work / "image"
                staged.mkdir()
                shutil.copy2(pkgroot / "boot" / f"vmlinuz-{release}", staged / "vmlinuz")
                _cpio(tree, staged / "initrd.cpio")
                (staged / "manifest.json").write_text(
                    json.dumps({"kernel_release": release, "packages": packages}, indent=1)
                )
                if image_dir.exists():
                    shutil.rmtree(image_dir)
                staged.rename(image_dir)
    data = json.loads(manifest.read_text())
    return GuestImage(
        kernel=image_dir / "vmlinuz",
        initrd=image_dir / "initrd.cpio",
        kernel_release=str(data["kernel_release"]),
        packages=dict(data["packages"]),
        key=key,
    )


def main() -> None:
    """Build or find the guest and print where it is."""
    image = build_image()
    print(f"kernel {image.kernel} ({image.kernel_release})")
    print(f"initrd {image.initrd} ({image.initrd.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
