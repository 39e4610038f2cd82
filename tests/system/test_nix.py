"""What CI can check of the Nix side without KVM or a nixpkgs checkout.

- every .nix file parses (`nix-instantiate --parse`);
- every VM test script, assembled exactly as nixos/tests/lib.nix assembles it,
  type-checks against the driver stub and passes pyflakes' rules;
- the Nix dependency list matches pyproject.toml;
- the systemd template unit passes `systemd-analyze verify` and carries the
  module's hardening;
- the daemon's sd_notify handshake: READY=1 only once the NBD port accepts
  connections, STOPPING=1 on SIGTERM, nothing on a failed start;
- with a copy of nixpkgs' lib/ (PORTALBD_NIXPKGS_LIB), the NixOS module is
  evaluated for real: rendered config, units, and assertion messages.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from portalbd import config as portalbd_config
from portalbd.instance import memory_budgets
from portalbd.launch import free_port, portalbd_command

ROOT = Path(__file__).resolve().parents[2]
VM_TESTS = ROOT / "nixos" / "tests"
STUB_DIR = VM_TESTS / "driver_stub"
TEMPLATE_UNIT = ROOT / "contrib" / "systemd" / "portalbd@.service"
MODULE = ROOT / "nixos" / "modules" / "portalbd.nix"
SKIP_DIRS = {".git", ".venv", "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache"}

# Globals the driver defines for a test script (Driver.test_symbols()).
DRIVER_SYMBOLS = [
    "start_all", "test_script", "machines_qemu", "machines_nspawn", "vlans", "driver", "log",
    "os", "create_machine", "subtest", "run_tests", "join_all", "retry", "serial_stdout_off",
    "serial_stdout_on", "polling_condition", "BaseMachine", "t", "debug",
]  # fmt: skip

NIX_ENV = {**os.environ, "NIX_CONFIG": "build-users-group =\nexperimental-features ="}


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (./dev test installs it)")
    return path


def nix_eval(expr: str) -> Any:
    """Evaluate a Nix expression strictly and return it as JSON data."""
    p = subprocess.run(
        [_need("nix-instantiate"), "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=NIX_ENV,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def nix_files() -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        found += [Path(dirpath) / f for f in filenames if f.endswith(".nix")]
    return sorted(found)


def vm_tests() -> list[Path]:
    return sorted(p for p in VM_TESTS.glob("*.nix") if p.name != "lib.nix")


# -- parsing -------------------------------------------------------------------


@pytest.mark.parametrize("path", nix_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nix_file_parses(path: Path) -> None:
    p = subprocess.run(
        [_need("nix-instantiate"), "--parse", str(path)],
        capture_output=True,
        text=True,
        env=NIX_ENV,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr


def test_parse_errors_name_file_and_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nix"
    broken.write_text("{\n  a = 1;\n  b = ;\n}\n")
    p = subprocess.run(
        [_need("nix-instantiate"), "--parse", str(broken)],
        capture_output=True,
        text=True,
        env=NIX_ENV,
    )
    assert p.returncode != 0
    assert "syntax error" in p.stderr and f"{broken}:3" in p.stderr, p.stderr


def test_flake_lists_every_vm_test() -> None:
    flake = (ROOT / "flake.nix").read_text()
    listed = re.search(r"vmTests = \[(.*?)\];", flake, re.S)
    assert listed is not None
    assert sorted(re.findall(r'"([\w-]+)"', listed.group(1))) == [p.stem for p in vm_tests()]
    for test in vm_tests():
        assert test.with_suffix(".py").is_file(), f"{test.name} has no script beside it"


# -- VM test scripts -------------------------------------------------------------


def assembled_script(test: Path) -> tuple[str, list[str]]:
    """The script the driver would run for `test`, and the test's node names.

    The test file is called with `pkgs` and `lib` that throw when touched, which
    proves the script does not depend on them (so CI sees exactly what runs).
    """
    info = nix_eval(
        f"""let t = import {test} {{ pkgs = throw "pkgs"; lib = throw "lib"; }};
        in {{ script = t.testScript; nodes = builtins.attrNames t.nodes; name = t.name; }}"""
    )
    assert info["name"].startswith("portalbd-"), info["name"]
    return info["script"], info["nodes"]


def machine_names(nodes: list[str]) -> list[str]:
    names = [re.sub(r"^[^A-Za-z_]|[^A-Za-z0-9_]", "_", n) for n in nodes]
    return [*names, "machine"] if len(names) == 1 and "machine" not in names else names


@pytest.fixture(scope="module")
def assembled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, list[str]]]:
    """name -> (script as the driver runs it, the same with the stub header, node names)."""
    out = tmp_path_factory.mktemp("vm-scripts")
    result = {}
    for test in vm_tests():
        script, nodes = assembled_script(test)
        module = test.stem.replace("-", "_")
        raw = out / f"raw_{module}.py"
        raw.write_text(script)
        header = "from nixos_test_driver import *  # noqa: F403\n"
        header += "".join(f"{name}: Machine\n" for name in machine_names(nodes))
        typed = out / f"{module}.py"
        typed.write_text(header + script)
        result[test.stem] = (raw, typed, nodes)
    return result


def test_vm_scripts_type_check(
    assembled: dict[str, tuple[Path, Path, list[str]]], tmp_path: Path
) -> None:
    files = [str(typed) for _, typed, _ in assembled.values()]
    p = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file", "",
         "--cache-dir", str(tmp_path / "cache"), "--python-version", "3.11", *files],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "MYPYPATH": str(STUB_DIR)},
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr


def test_vm_scripts_pass_pyflakes(assembled: dict[str, tuple[Path, Path, list[str]]]) -> None:
    """nixpkgs lints every test script with pyflakes; ruff's F rules are the same checks."""
    for name, (raw, _, nodes) in assembled.items():
        builtins = DRIVER_SYMBOLS + machine_names(nodes)
        p = subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F",
             "--config", f"builtins = {json.dumps(builtins)}", str(raw)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert p.returncode == 0, f"{name}: {p.stdout}{p.stderr}"


def test_mypy_catches_a_wrong_driver_call(tmp_path: Path) -> None:
    """The stub is strict enough to catch the typical slip."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from nixos_test_driver import *  # noqa: F403\nmachine: Machine\n"
        'machine.wait_for_open_port("10809")\nmachine.succeed("true", timeout="1")\n'
    )
    p = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file", "",
         "--cache-dir", str(tmp_path / "cache"), str(bad)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "MYPYPATH": str(STUB_DIR)},
    )  # fmt: skip
    assert p.returncode == 1, p.stdout
    assert 'Argument 1 to "wait_for_open_port" of "Machine" has incompatible type' in p.stdout
    assert 'Argument "timeout" to "succeed" of "Machine"' in p.stdout


def _methods(tree: ast.Module, classes: set[str]) -> dict[str, list[str]]:
    """Parameter names of the methods of the named classes (later classes win)."""
    found: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in classes:
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    args = item.args
                    found[item.name] = [
                        a.arg for a in args.posonlyargs + args.args + args.kwonlyargs
                    ]
    return found


@pytest.mark.skipif(
    not os.environ.get("NIXOS_TEST_DRIVER_SRC"),
    reason="set NIXOS_TEST_DRIVER_SRC to nixpkgs' nixos/lib/test-driver/src/test_driver",
)
def test_stub_matches_the_driver_source() -> None:
    """Every Machine method the stub declares exists in the driver, with the same parameters."""
    src = Path(os.environ["NIXOS_TEST_DRIVER_SRC"])
    machine_src = src / "machine" / "__init__.py"
    if not machine_src.exists():
        machine_src = src / "machine.py"  # drivers before the machine/ package
    real = _methods(ast.parse(machine_src.read_text()), {"BaseMachine", "Machine", "QemuMachine"})
    stub = _methods(ast.parse((STUB_DIR / "nixos_test_driver.pyi").read_text()), {"Machine"})
    assert set(stub) <= set(real), sorted(set(stub) - set(real))
    mismatched = {name: (args, real[name]) for name, args in stub.items() if args != real[name]}
    assert not mismatched, mismatched
    driver = (src / "driver.py").read_text()
    symbols = re.search(r"general_symbols = dict\((.*?)\n        \)", driver, re.S)
    assert symbols is not None
    names = set(re.findall(r"^\s+(\w+)=", symbols.group(1), re.M))
    declared = {"start_all", "join_all", "run_tests", "serial_stdout_on", "serial_stdout_off",
                "subtest", "retry", "polling_condition", "driver", "log"}  # fmt: skip
    assert declared <= names, sorted(declared - names)


def test_python_literals_from_nix() -> None:
    rendered = nix_eval(
        """(import ./nixos/tests/lib.nix).pythonLiteral
           { a = null; b = [ true false 3 ]; c = "q\\"x\\n"; d = { e = 1; }; }"""
    )
    assert eval(rendered) == {"a": None, "b": [True, False, 3], "c": 'q"x\n', "d": {"e": 1}}


# -- package ----------------------------------------------------------------------


def _normalise(requirement: str) -> str:
    name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_nix_dependencies_match_pyproject() -> None:
    """overlays/python-deps.nix groups the requirements as pyproject.toml does:
    the run-time dependencies, then each extra the package can include."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = nix_eval("import ./overlays/python-deps.nix")
    programs = {name: p["extra"] for name, p in deps["programs"].items()}
    groups = {
        "dependencies": (project["dependencies"], set(deps["python"])),
        **{
            extra: (
                project["optional-dependencies"][extra],
                set(deps["extras"][extra]) | {n for n, e in programs.items() if e == extra},
            )
            for extra in ("trace", "csi")
        },
    }
    for group, (requirements, listed) in groups.items():
        wanted = {_normalise(r) for r in requirements}
        assert listed == wanted, (
            f"overlays/python-deps.nix: {group} is missing {sorted(wanted - listed)} "
            f"and has extra {sorted(listed - wanted)}"
        )
    assert set(deps["extras"]) == {"trace", "csi"}


def test_slatedb_pin_matches_pyproject() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'"slatedb==([\d.]+)"', pyproject)
    nix = re.search(r'version = "([\d.]+)";', (ROOT / "overlays" / "slatedb.nix").read_text())
    assert pinned and nix and pinned.group(1) == nix.group(1)


# -- systemd template unit ------------------------------------------------------------


def test_template_unit_verifies(tmp_path: Path) -> None:
    daemon = shutil.which("portalbd") or str(Path(sys.executable).parent / "portalbd")
    text = TEMPLATE_UNIT.read_text().replace("/usr/local/bin/portalbd", daemon)
    (tmp_path / "portalbd@.service").write_text(text)
    (tmp_path / "portalbd@main.service").symlink_to("portalbd@.service")
    p = subprocess.run(
        [_need("systemd-analyze"), "verify", "--man=no", str(tmp_path / "portalbd@main.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stderr.strip() == "", p.stderr


def test_template_unit_verify_reports_mistakes(tmp_path: Path) -> None:
    text = TEMPLATE_UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=bogus")
    (tmp_path / "portalbd@.service").write_text(text)
    (tmp_path / "portalbd@main.service").symlink_to("portalbd@.service")
    p = subprocess.run(
        [_need("systemd-analyze"), "verify", "--man=no", str(tmp_path / "portalbd@main.service")],
        capture_output=True,
        text=True,
    )
    assert "Failed to parse protect system value, ignoring: bogus" in p.stderr, p.stderr


def test_template_unit_has_the_module_hardening() -> None:
    module = MODULE.read_text()
    block = re.search(r"hardening = \{(.*?)\n      \};", module, re.S)
    assert block is not None
    module_keys = set(re.findall(r"^\s+([A-Z]\w+) =", block.group(1), re.M))
    unit_keys = set(re.findall(r"^([A-Z]\w+)=", TEMPLATE_UNIT.read_text(), re.M))
    assert module_keys <= unit_keys, sorted(module_keys - unit_keys)
    for key in ("Type", "NotifyAccess", "KillMode", "TimeoutStopSec", "Restart"):
        assert re.search(rf'\b{key} = "?([\w-]+)', module)
        ours = re.search(rf'\b{key} = "?([\w-]+)', module)
        theirs = re.search(rf"^{key}=([\w-]+)", TEMPLATE_UNIT.read_text(), re.M)
        assert ours and theirs and ours.group(1) == theirs.group(1), key


# -- sd_notify ------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(60)
    yield sock
    sock.close()


def _daemon(tmp_path: Path, port: int, notify: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*portalbd_command(), "--instance", "notifytest", "--storage-url", "memory://",
         "--disk-size-gb", "1", "--nbd-address", f"127.0.0.1:{port}",
         "--socket", str(tmp_path / "control.sock")],
        env={**os.environ, "NOTIFY_SOCKET": notify},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def _messages(sock: socket.socket) -> dict[str, str]:
    datagram = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in datagram.splitlines() if "=" in line)


def test_daemon_notifies_ready_then_stopping(tmp_path: Path, notify_socket: socket.socket) -> None:
    port = free_port()
    proc = _daemon(tmp_path, port, str(tmp_path / "notify"))
    try:
        ready = _messages(notify_socket)
        assert ready.get("READY") == "1", ready
        # Ready means listening: the port must accept a connection right now.
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
        assert (tmp_path / "control.sock").exists()
        proc.send_signal(signal.SIGTERM)
        stopping = _messages(notify_socket)
        assert stopping.get("STOPPING") == "1", stopping
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_daemon_notifies_abstract_socket(tmp_path: Path) -> None:
    name = f"portalbd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(60)
        proc = _daemon(tmp_path, free_port(), "@" + name)
        try:
            assert _messages(sock).get("READY") == "1"
            proc.send_signal(signal.SIGTERM)
            assert _messages(sock).get("STOPPING") == "1"
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()


def test_failed_start_never_reports_ready(tmp_path: Path, notify_socket: socket.socket) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _daemon(tmp_path, port, str(tmp_path / "notify"))
        _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "startup failed" in err.decode(), err.decode()
    notify_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify_socket.recv(4096)


# -- the NixOS module, evaluated (needs nixpkgs' lib/) -----------------------------------------


def nixpkgs_lib() -> Path | None:
    candidates = [os.environ.get("PORTALBD_NIXPKGS_LIB"), "/var/cache/portalbd-nix/lib"]
    for c in candidates:
        if c and (Path(c) / "default.nix").is_file():
            return Path(c)
    return None


needs_lib = pytest.mark.skipif(
    nixpkgs_lib() is None,
    reason="no copy of nixpkgs' lib/ (set PORTALBD_NIXPKGS_LIB to evaluate the module)",
)


def _dev_nixpkgs_lib(
    tmp_path: Path, tarball_members: dict[str, str] | None
) -> subprocess.CompletedProcess[str]:
    """Run `./dev nixpkgs-lib` from a copy of the repository's dev script, with
    a ../shared/nixpkgs-lib.tar.gz made of `tarball_members` (None: no tarball)."""
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    shutil.copy(ROOT / "dev", repo / "dev")
    if tarball_members is not None:
        src = tmp_path / "src"
        for name, text in tarball_members.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_text(text)
        (tmp_path / "shared").mkdir(exist_ok=True)
        subprocess.run(
            ["tar", "-czf", str(tmp_path / "shared" / "nixpkgs-lib.tar.gz"), "-C", str(src), "."],
            check=True,
        )
    env = {k: v for k, v in os.environ.items() if k != "PORTALBD_NIXPKGS_LIB"}
    return subprocess.run(
        [str(repo / "dev"), "nixpkgs-lib"], capture_output=True, text=True, env=env, timeout=60
    )


def test_dev_unpacks_the_shared_lib_once(tmp_path: Path) -> None:
    first = _dev_nixpkgs_lib(tmp_path, {"lib/default.nix": "{ }"})
    assert first.returncode == 0, first.stderr
    lib = Path(first.stdout.strip())
    assert lib == tmp_path / "repo" / ".venv" / "nixpkgs-lib" / "lib"
    assert (lib / "default.nix").read_text() == "{ }"
    (lib / "marker").write_text("kept")
    again = _dev_nixpkgs_lib(tmp_path, None)  # same tarball, not newer: no unpacking
    assert again.stdout == first.stdout and (lib / "marker").exists()


def test_dev_without_the_shared_lib_says_the_module_tests_skip(tmp_path: Path) -> None:
    p = _dev_nixpkgs_lib(tmp_path, None)
    assert p.returncode == 1
    assert "dev: no ../shared/nixpkgs-lib.tar.gz; the NixOS module tests will skip" in p.stderr


def test_dev_rejects_a_tarball_without_lib(tmp_path: Path) -> None:
    p = _dev_nixpkgs_lib(tmp_path, {"nixpkgs.lib-main/lib/default.nix": "{ }"})
    assert p.returncode == 1
    assert "dev: ../shared/nixpkgs-lib.tar.gz has no lib/default.nix" in p.stderr


def evaluate_module(tmp_path: Path, configuration: str) -> dict[str, Any]:
    cfg = tmp_path / "configuration.nix"
    cfg.write_text(configuration)
    args = f"{{ nixpkgsLib = {nixpkgs_lib()}; configuration = {cfg}; }}"
    result: dict[str, Any] = nix_eval(f"import ./tests/system/nix/eval-module.nix {args}")
    return result


# A configuration written for the original module, unchanged.
ORIGINAL_STYLE = """{ pkgs, ... }: {
  services.portalbd.instances.test = {
    enable = true;
    settings = {
      device.disk_size_gb = 1;
      nbd.address = "127.0.0.1:10809";
      socket = "/run/portalbd-test/portalbd.sock";
      storage.url = "s3://portalbd-test/data";
      lsm = { flush_interval_ms = 100; l0_max_ssts = 64; };
      record = { path = "/var/lib/portalbd-test/mkfs.trace.json"; workload = "mkfs.ext4"; };
    };
    environmentFile = "/run/secrets/portalbd.env";
  };
}
"""


@needs_lib
def test_original_configuration_evaluates(tmp_path: Path) -> None:
    result = evaluate_module(tmp_path, ORIGINAL_STYLE)
    assert result["failed"] == [] and result["warnings"] == []
    service = result["services"]["portalbd-test"]["serviceConfig"]
    assert service["Type"] == "notify"
    assert service["EnvironmentFile"] == "/run/secrets/portalbd.env"
    # Its socket and trace directories become systemd-managed directories.
    assert "portalbd-test" in service["RuntimeDirectory"]
    assert "portalbd-test" in service["StateDirectory"]
    assert service["CacheDirectory"] == "portalbd/test"  # an S3 disk's object cache
    assert service["RestrictAddressFamilies"] == ["AF_UNIX", "AF_INET", "AF_INET6"]
    rendered = service["ExecStart"][2]["config"]
    assert rendered["lsm"] == {"flush_interval_ms": 100, "l0_max_ssts": 64}
    # The rendered file is one the daemon accepts.
    loaded = portalbd_config.parse(tomlkit.dumps(rendered), "rendered")
    assert loaded.instance.name == "test"
    assert loaded.socket == "/run/portalbd-test/portalbd.sock"
    assert loaded.storage.url == "s3://portalbd-test/data"
    assert loaded.record is not None


@needs_lib
def test_defaults_follow_the_instance_name(tmp_path: Path) -> None:
    result = evaluate_module(
        tmp_path,
        """{ services.portalbd.instances.db = { enable = true; settings.nbd.address = "";
             settings.nbd.socket = "/run/portalbd/db/nbd.sock"; attach.enable = true; }; }""",
    )
    assert result["failed"] == []
    service = result["services"]["portalbd-db"]["serviceConfig"]
    rendered = service["ExecStart"][2]["config"]
    assert rendered["socket"] == "/run/portalbd/db/control.sock"
    assert rendered["storage"]["url"] == "file:///var/lib/portalbd/db/store"
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert service["DynamicUser"] is True
    attach = result["services"]["portalbd-db-attach"]["serviceConfig"]["ExecStart"]
    assert attach[1:] == ["-unix", "/run/portalbd/db/nbd.sock", "/dev/nbd0", "-N", "portalbd"]
    assert result["kernelModules"] == ["nbd"]
    portalbd_config.parse(tomlkit.dumps(rendered), "rendered")


@needs_lib
def test_assertion_messages(tmp_path: Path) -> None:
    result = evaluate_module(
        tmp_path,
        """{
          services.portalbd.instances = {
            a = { enable = true; settings.storage.url = null; environmentFile = "secrets.env"; };
            b = { enable = true; settings.socket = "/run/portalbd/a/control.sock";
                  settings.nbd.address = "127.0.0.1:10809"; };
            c = { enable = true; settings.nbd.address = ""; };
          };
        }""",
    )
    failed = result["failed"]
    assert (
        'services.portalbd.instances.a.settings.storage.url must be set (use "memory://" for a '
        "disk that lives in RAM)." in failed
    )
    assert (
        "services.portalbd.instances.a.environmentFile must be an absolute path, got secrets.env."
        in failed
    )
    assert (
        "services.portalbd: TCP ports must differ between instances: port 10809 is used by a, b."
        in failed
    )
    assert (
        "services.portalbd: sockets must differ between instances: "
        "socket /run/portalbd/a/control.sock is used by a, b." in failed
    )
    assert (
        "services.portalbd.instances.c has no NBD listener: "
        "set settings.nbd.address or settings.nbd.socket." in failed
    )
    assert len(failed) == 5, failed


@needs_lib
def test_static_user_and_firewall(tmp_path: Path) -> None:
    result = evaluate_module(
        tmp_path,
        """{ services.portalbd.instances.x = { enable = true; user = "portalbd-x";
             openFirewall = true; settings.nbd.address = "[::]:10900"; }; }""",
    )
    assert result["failed"] == []
    service = result["services"]["portalbd-x"]["serviceConfig"]
    assert service["User"] == service["Group"] == "portalbd-x"
    assert "DynamicUser" not in service
    assert result["users"] == ["portalbd-x"] and result["groups"] == ["portalbd-x"]
    assert result["firewall"] == [10900]


@needs_lib
def test_tls_files_are_credentials_not_store_paths(tmp_path: Path) -> None:
    result = evaluate_module(
        tmp_path,
        """{ services.portalbd.instances.t = { enable = true; settings.storage.url = "memory://";
             tls = { certificateFile = "/run/secrets/cert.pem"; keyFile = "/run/secrets/key.pem";
                     caFile = "/etc/portalbd/ca.pem"; }; };
           services.portalbd.instances.u = { enable = true; settings.storage.url = "memory://";
             settings.nbd.address = "127.0.0.1:10810"; attach.enable = true;
             tls = { certificateFile = "relative.pem"; }; }; }""",
    )
    service = result["services"]["portalbd-t"]["serviceConfig"]
    assert service["LoadCredential"] == [
        "tls-ca:/etc/portalbd/ca.pem",
        "tls-certificate:/run/secrets/cert.pem",
        "tls-key:/run/secrets/key.pem",
    ]
    credentials = "/run/credentials/portalbd-t.service"
    assert service["ExecStart"][3:] == [
        "--tls-ca", f"{credentials}/tls-ca",
        "--tls-certificate", f"{credentials}/tls-certificate",
        "--tls-key", f"{credentials}/tls-key",
    ]  # fmt: skip
    opt = "services.portalbd.instances.u"
    assert result["failed"] == [
        f"{opt}.tls: certificateFile, keyFile and caFile must be absolute paths.",
        f"{opt}.tls: certificateFile and keyFile go together.",
        f'{opt}.attach does not speak TLS yet: set {opt}.tls.mode = "allow" (the local attach '
        "stays on plain text) or turn attach off.",
    ]


@needs_lib
def test_module_refuses_bad_names_and_unwritable_stores(tmp_path: Path) -> None:
    result = evaluate_module(
        tmp_path,
        """{
          services.portalbd.instances = {
            "../etc" = { enable = true; settings.nbd.address = "127.0.0.1:10801"; };
            srv = { enable = true; settings.storage.url = "file:///srv/portalbd";
                    settings.nbd.address = "127.0.0.1:10802"; };
            owned = { enable = true; user = "portalbd-owned"; settings.storage.url = "file:///srv/owned";
                      settings.nbd.address = "127.0.0.1:10803"; };
            "ok-1.x" = { enable = true; settings.nbd.address = "127.0.0.1:10804"; };
          };
        }""",
    )
    assert result["failed"] == [
        'services.portalbd.instances."../etc": the name becomes unit names and paths '
        "(portalbd-../etc.service, /run/portalbd/../etc), so it must be letters, digits, "
        "'-', '_' or '.' (not leading).",
        "services.portalbd.instances.srv.settings.storage.url is file:///srv/portalbd, outside "
        "/var/lib: the transient user (DynamicUser) cannot write there. Keep the store under "
        "/var/lib (the default is file:///var/lib/portalbd/srv/store), or set "
        "services.portalbd.instances.srv.user and create the directory owned by that user "
        "(systemd.tmpfiles.rules).",
    ], result["failed"]
    # A named user may own a store elsewhere: it is opened up, not refused.
    assert result["services"]["portalbd-owned"]["serviceConfig"]["ReadWritePaths"] == [
        "-/srv/owned"
    ]


def _expected_memory_max(rendered: dict[str, Any], extra: int = 0) -> int:
    loaded = portalbd_config.parse(tomlkit.dumps(rendered), "rendered")
    return sum(memory_budgets(loaded).values()) + 256 * 2**20 + extra


@needs_lib
def test_units_follow_storage_budgets_and_devices(tmp_path: Path) -> None:
    result = evaluate_module(
        tmp_path,
        """{
          services.portalbd.instances = {
            local = { enable = true; attach = { enable = true; device = "/dev/nbd20"; }; };
            ram = { enable = true; settings = { storage.url = "memory://"; device.disk_size_gb = 2;
                    device.cache_bytes = 268435456; lsm.block_cache_size_bytes = 67108864;
                    nbd.address = "127.0.0.1:10810"; }; };
            bucket = { enable = true; settings.storage.url = "s3://b/p";
                       settings.nbd.address = "127.0.0.1:10811"; memoryMax = null; };
            public = { enable = true; settings.nbd.address = "192.0.2.7:10812"; };
          };
        }""",
    )
    assert result["failed"] == []
    services = result["services"]
    online = {n: "network-online.target" in s.get("wants", []) for n, s in services.items()}
    assert online == {
        "portalbd-local": False,
        "portalbd-local-attach": False,
        "portalbd-ram": False,
        "portalbd-bucket": True,  # S3
        "portalbd-public": True,  # binds an address the network has to bring up
    }
    assert services["portalbd-local"]["after"] == ["network.target"]
    assert "network-online.target" in services["portalbd-bucket"]["after"]
    # nbd20 exists only with nbds_max of at least 21.
    assert result["modprobe"] == "options nbd nbds_max=21"

    def memory_max(name: str) -> int:
        return int(services[f"portalbd-{name}"]["serviceConfig"]["MemoryMax"])

    def rendered(name: str) -> dict[str, Any]:
        config: dict[str, Any] = services[f"portalbd-{name}"]["serviceConfig"]["ExecStart"][2][
            "config"
        ]
        return config

    assert memory_max("local") == _expected_memory_max(rendered("local")) == 736 * 2**20
    # memory:// holds the disk itself on top of the budgets.
    assert memory_max("ram") == _expected_memory_max(rendered("ram"), extra=2 * 2**30)
    assert "MemoryMax" not in services["portalbd-bucket"]["serviceConfig"]


@needs_lib
def test_devices_up_to_nbd15_leave_the_module_options_alone(tmp_path: Path) -> None:
    result = evaluate_module(
        tmp_path,
        """{ services.portalbd.instances.a = { enable = true;
             attach = { enable = true; device = "/dev/nbd15"; }; }; }""",
    )
    assert result["failed"] == [] and result["modprobe"] == ""


def test_flake_uses_no_deprecated_nixfmt_alias() -> None:
    """nixfmt-rfc-style is a deprecated alias of nixfmt in nixpkgs 25.05 and later."""
    assert "nixfmt-rfc-style" not in (ROOT / "flake.nix").read_text()


def _package(**flags: bool) -> dict[str, Any]:
    args = " ".join(f"{k} = {str(v).lower()};" for k, v in flags.items())
    result: dict[str, Any] = nix_eval(
        f"import ./tests/system/nix/eval-package.nix {{ nixpkgsLib = {nixpkgs_lib()}; {args} }}"
    )
    return result


@needs_lib
def test_package_leaves_out_the_heavy_extras_on_request() -> None:
    full = _package()
    assert {"grpcio", "protobuf", "matplotlib", "numpy", "slatedb"} <= set(full["dependencies"])
    assert any("py-spy" in arg for arg in full["makeWrapperArgs"])
    assert full["pythonRemoveDeps"] == ["py-spy"]
    lean = _package(withTrace=False, withCsi=False)
    deps = nix_eval("import ./overlays/python-deps.nix")
    assert sorted(lean["dependencies"]) == sorted(deps["python"].values())
    assert not any("py-spy" in arg for arg in lean["makeWrapperArgs"])
    csi_only = _package(withTrace=False)
    assert set(csi_only["dependencies"]) - set(lean["dependencies"]) == {"grpcio", "protobuf"}


def test_only_platforms_with_image_hashes_run_csi_k3s() -> None:
    runs = nix_eval(
        """let l = import ./nixos/tests/lib.nix; in map (s: [ (l.runsOn s ./nixos/tests/csi-k3s.nix)
           (l.runsOn s ./nixos/tests/basic.nix) ]) [ "x86_64-linux" "aarch64-linux" ]"""
    )
    assert runs == [[True, True], [False, True]]


def _containers(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container spec in a List, DaemonSet or Pod document."""
    for item in document.get("items", [document]):
        spec = item.get("spec", {})
        spec = spec.get("template", {}).get("spec", spec)
        yield from spec.get("containers", [])


def test_csi_k3s_starts_pods_from_the_store_alone() -> None:
    """Every image a pod runs, the sandbox included, is one k3s imports from
    services.k3s.images; nothing may be pulled; the sidecars are amd64's."""
    node = nix_eval('import ./tests/system/nix/eval-csi-k3s.nix { system = "x86_64-linux"; }')
    provided = {f"{i['name']}:{i['tag']}": i for i in node["images"]}
    pause = next(f.split()[1] for f in node["extraFlags"] if f.startswith("--pause-image "))
    assert pause in provided and provided[pause]["kind"] == "layered"
    containers = [
        *_containers(json.loads(node["manifests"])),
        *_containers(json.loads(node["pod"])),
    ]
    assert {c["image"] for c in containers} | {pause} == set(provided)
    assert {c["imagePullPolicy"] for c in containers} == {"Never"}
    pulled = [i for i in node["images"] if i["kind"] == "pull"]
    assert len(pulled) == 2 and all(i["arch"] == "amd64" and i["hash"] for i in pulled)
    assert node["platforms"] == ["x86_64-linux"]


def test_csi_k3s_names_the_missing_hashes_on_other_platforms() -> None:
    p = subprocess.run(
        [_need("nix-instantiate"), "--eval", "--strict", "--json", "-E",
         'import ./tests/system/nix/eval-csi-k3s.nix { system = "aarch64-linux"; }'],
        capture_output=True, text=True, cwd=ROOT, env=NIX_ENV, timeout=60,
    )  # fmt: skip
    assert p.returncode != 0
    assert (
        "csi-k3s: no sidecar image hashes for aarch64-linux "
        "(nixos/tests/csi-k3s.nix, sidecarHashes)" in p.stderr
    ), p.stderr


def test_flake_lock_pins_nixpkgs_or_the_docs_say_it_is_missing() -> None:
    """A checked-in lock pins one nixpkgs commit from 2026 on with its NAR hash;
    without one, docs/nixos.md says so and how to make it."""
    lock = ROOT / "flake.lock"
    docs = (ROOT / "docs" / "nixos.md").read_text()
    if not lock.exists():
        assert "**no `flake.lock` is checked in**" in docs
        assert "nix flake lock --override-input nixpkgs github:NixOS/nixpkgs/<commit>" in docs
        return
    locked = json.loads(lock.read_text())["nodes"]["nixpkgs"]["locked"]
    assert locked["type"] == "github" and locked["repo"] == "nixpkgs"
    assert re.fullmatch(r"[0-9a-f]{40}", locked["rev"]), locked
    assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked["narHash"]), locked
    assert locked["lastModified"] >= 1767225600, "nixpkgs pinned before 2026"  # 2026-01-01


@needs_lib
def test_every_vm_test_configures_portalbd_the_module_and_daemon_accept() -> None:
    """The portalbd instances of every VM test node pass the module's
    assertions without warnings, and the daemon accepts each rendered config."""
    evaluated = nix_eval(
        f"import ./tests/system/nix/eval-vm-nodes.nix {{ nixpkgsLib = {nixpkgs_lib()}; }}"
    )
    daemons = 0
    for test, nodes in evaluated.items():
        for node, result in nodes.items():
            assert result["failed"] == [] and result["warnings"] == [], (test, node, result)
            for unit, service in result["services"].items():
                exec_start = service["serviceConfig"]["ExecStart"]
                if unit.endswith("-attach"):
                    continue
                rendered = exec_start[2]["config"]
                portalbd_config.parse(tomlkit.dumps(rendered), f"{test}/{node}/{unit}")
                daemons += 1
    assert {"basic", "resource-exhaustion", "pjdfstest"} <= set(evaluated)
    assert daemons >= 10, daemons


@needs_lib
def test_snapshot_schedule_is_rendered_and_checked(tmp_path: Path) -> None:
    result = evaluate_module(
        tmp_path,
        """{ services.portalbd.instances = {
             s = { enable = true; snapshots = { every = "15m"; keep = 96; keep_daily = 7; }; };
             n = { enable = true; settings.nbd.address = "127.0.0.1:10811"; };
             k = { enable = true; settings.nbd.address = "127.0.0.1:10812";
                   snapshots.every = "1h"; };
             w = { enable = true; settings.nbd.address = "127.0.0.1:10813";
                   snapshots.keep_weekly = 4; };
             b = { enable = true; settings.nbd.address = "127.0.0.1:10814";
                   snapshots = { every = "1d"; keep = 3; }; settings.snapshots.every = "1h"; };
           }; }""",
    )
    rendered = result["services"]["portalbd-s"]["serviceConfig"]["ExecStart"][2]["config"]
    assert rendered["snapshots"] == {"every": "15m", "keep": 96, "keep_daily": 7}
    loaded = portalbd_config.parse(tomlkit.dumps(rendered), "rendered")
    assert (loaded.snapshots.every_seconds(), loaded.snapshots.keep) == (900, 96)
    no_schedule = result["services"]["portalbd-n"]["serviceConfig"]["ExecStart"][2]["config"]
    assert "snapshots" not in no_schedule
    opt = "services.portalbd.instances"
    assert sorted(result["failed"]) == [
        f"{opt}.b: set the schedule in {opt}.b.snapshots or in settings.snapshots, not both.",
        f"{opt}.k.snapshots.keep must be set with snapshots.every: "
        "how many scheduled snapshots to keep.",
        f"{opt}.w.snapshots: keep, keep_daily and keep_weekly do nothing without "
        'snapshots.every (how often to take one, e.g. "15m").',
    ]


@needs_lib
def test_snapshot_interval_type_refuses_a_bad_duration(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match=r"snapshots\.every' is not of type"):
        evaluate_module(
            tmp_path,
            "{ services.portalbd.instances.s = { enable = true; "
            'snapshots = { every = "15 min"; keep = 1; }; }; }',
        )
