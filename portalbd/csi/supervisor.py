"""Keep one portalbd daemon running per staged volume.

The daemon is started with the volume's storage URL and size, serves NBD on
a Unix socket in the volume's state directory, and is restarted with the
same arguments if it dies. One that died without its final flush has its
volume's device cut off first (attach.cut_off), until the volume is
unstaged. It runs in its own session, so restarting the CSI driver does not
take staged volumes down; a new driver adopts the daemon it finds answering
on the volume's control socket.
"""

# Local file, /proc and socket-path checks take microseconds; the node's I/O
# that can block (tools, daemons) runs as subprocesses.
# ruff: noqa: ASYNC109, ASYNC240

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from portalbd.control.async_client import request_once
from portalbd.control.errors import ControlError
from portalbd.csi import attach
from portalbd.csi.errors import internal, precondition
from portalbd.launch import (
    LaunchError,
    pid_alive,
    portalbd_command,
    spawn_async,
    stop_async,
    wait_until_async,
)

log = logging.getLogger("portalbd.csi")

RESTART_DELAY_S = 1.0
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL


async def daemon_pid(control_socket: Path) -> int | None:
    """The pid of the daemon answering on this socket, if one does."""
    if not control_socket.exists():
        return None
    try:
        status = await request_once(control_socket, "Status", timeout=5)
    except ControlError:
        return None
    pid = status.get("Status", {}).get("pid") if isinstance(status, dict) else None
    return int(pid) if pid else None


CONDITION_FILE = "condition.json"  # NodeGetVolumeStats' volume_condition, until unstaged


def lost_writes(code: int | None) -> str | None:
    """What an unexpected exit with this code cost, or None when nothing.

    A daemon answers writes before they are durable and makes them so at
    each flush (like a disk's volatile cache). One that exits cleanly has
    flushed; one that was killed or crashed could not, and the mounted
    filesystem does not know that writes it was told were done are gone."""
    if code == 0:
        return None
    if code is None:
        return "ended (exit status unknown): writes since the last flush may be lost"
    if code < 0:
        return f"was killed by signal {-code}: writes since the last flush are lost"
    return f"exited with code {code}: writes since the last flush may be lost"


# What the operator does about it: the device is dead until then (attach.cut_off).
CUT_OFF = "the device is cut off (its I/O fails): unstage and stage the volume again"


def condition_message(code: int | None) -> str | None:
    """The volume's condition after its daemon exited with ``code``, or None
    when that lost nothing (and the device may reconnect to a new daemon)."""
    lost = lost_writes(code)
    return None if lost is None else f"the volume's daemon {lost}; {CUT_OFF}"


def record_condition(state_dir: Path, message: str) -> None:
    """Abnormal, and cut off: since cutting off, the one condition there is."""
    path = state_dir / CONDITION_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"abnormal": True, "message": message, "cut_off": True}))
    tmp.replace(path)


def _condition(state_dir: Path) -> dict[str, object]:
    try:
        doc = json.loads((state_dir / CONDITION_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def read_condition(state_dir: Path) -> tuple[bool, str]:
    doc = _condition(state_dir)
    return bool(doc.get("abnormal")), str(doc.get("message", ""))


def cut_off_reason(state_dir: Path) -> str | None:
    """Why the volume's device is cut off, or None while it serves."""
    doc = _condition(state_dir)
    return str(doc.get("message", "")) if doc.get("abnormal") and doc.get("cut_off") else None


def refuse_cut_off(volume_id: str, state_dir: Path) -> None:
    """FAILED_PRECONDITION while the volume's device is cut off: publishing,
    growing or snapshotting a dead mount helps no pod (a freeze would fail
    with EIO), and only unstaging revives it."""
    reason = cut_off_reason(state_dir)
    if reason is not None:
        raise precondition(f"volume {volume_id}: {reason}")


@dataclass(frozen=True, slots=True)
class DaemonSpec:
    volume_id: str
    storage_url: str
    size_bytes: int
    block_size: int
    state_dir: Path
    key_file: Path | None = None  # an encrypted volume's key (csi/keys.py)

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def nbd_socket(self) -> Path:
        return self.state_dir / "nbd.sock"

    def argv(self) -> list[str]:
        return [
            *portalbd_command(),
            "--instance",
            self.volume_id,
            "--storage-url",
            self.storage_url,
            "--size-bytes",
            str(self.size_bytes),
            "--block-size",
            str(self.block_size),
            "--nbd-address",
            "",
            "--nbd-socket",
            str(self.nbd_socket),
            "--socket",
            str(self.control_socket),
            *(["--encryption-key-file", str(self.key_file)] if self.key_file else []),
        ]


class SupervisedDaemon:
    def __init__(self, spec: DaemonSpec) -> None:
        self.spec = spec
        self.pid: int | None = None
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Start (or adopt) the daemon and wait until it answers.

        A driver that starts after another one learns only what the volume's
        state directory says. No daemon answering while the proxy still
        runs means it died with nobody watching, its exit status unknown:
        the device is cut off before a new daemon could be reconnected to.
        An abnormal condition already recorded is cut off again (the driver
        that recorded it may have died before it could, or predates
        cutting off)."""
        state_dir = self.spec.state_dir
        pid = await daemon_pid(self.spec.control_socket)
        abnormal, message = read_condition(state_dir)
        if abnormal:
            await self._cut_off(message if cut_off_reason(state_dir) else f"{message}; {CUT_OFF}")
        elif pid is None and attach.has_proxy(state_dir):
            log.error("daemon for volume %s is gone (died unwatched)", self.spec.volume_id)
            await self._cut_off(condition_message(None) or "")
        if pid is not None:
            log.info("adopting running daemon volume=%s pid=%d", self.spec.volume_id, pid)
            self.pid = pid
        else:
            await self._spawn()
        self._monitor = asyncio.create_task(self._watch())

    async def _cut_off(self, message: str) -> None:
        """Record why, then cut the device off (in that order: a driver that
        dies in between finds the condition at its start and cuts again).
        The first reason stays: a later one says less about what was lost."""
        state_dir = self.spec.state_dir
        if cut_off_reason(state_dir) is None:
            record_condition(state_dir, message)
        await attach.cut_off(state_dir)
        log.error("cut off volume %s: %s", self.spec.volume_id, cut_off_reason(state_dir))

    async def _spawn(self) -> None:
        spec = self.spec
        longest = max(len(str(spec.control_socket)), len(str(spec.nbd_socket)))
        if longest > MAX_SOCKET_PATH:
            raise internal(
                f"socket paths under {spec.state_dir} are {longest} bytes, more than a Unix "
                f"socket allows ({MAX_SOCKET_PATH}): use a shorter --state-dir"
            )
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        for stale in (spec.control_socket, spec.nbd_socket):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        log_path = spec.state_dir / "portalbd.log"
        process = self._process = await spawn_async(spec.argv(), log_path, new_session=True)
        self.pid = process.pid

        async def answering() -> bool:
            return spec.nbd_socket.exists() and bool(await daemon_pid(spec.control_socket))

        try:
            await wait_until_async(answering, lambda: process.returncode, 60, "portalbd")
        except LaunchError:
            if process.returncode is None:
                process.kill()
                await process.wait()
            tail = log_path.read_text(errors="replace")[-1500:].strip()
            raise internal(f"portalbd for volume {spec.volume_id} did not start: {tail}") from None
        log.info("daemon started volume=%s pid=%d", spec.volume_id, self.pid)

    async def _wait_exit(self) -> None:
        if self._process is not None:
            await self._process.wait()
            return
        pid = self.pid
        if pid is not None:
            # An adopted daemon is not our child: all we can do is watch for it to go.
            await wait_until_async(lambda: not pid_alive(pid), None, float("inf"), "", 1.0)

    async def _watch(self) -> None:
        while not self._stopping:
            await self._wait_exit()
            if self._stopping:
                return
            self.restarts += 1
            # An adopted daemon is not our child: its status is unknown (None),
            # so it counts as unclean.
            code = self._process.returncode if self._process is not None else None
            log.error(
                "daemon for volume %s exited unexpectedly; restarting (restart %d, %s)",
                self.spec.volume_id,
                self.restarts,
                lost_writes(code) or "exit code 0: it flushed everything",
            )
            message = condition_message(code)
            if message:
                # Before the new daemon starts: the proxy must not reach it. It
                # still starts: its control socket answers (status, a block
                # volume's snapshot) and unstaging stops it like any other.
                await self._cut_off(message)
            await asyncio.sleep(RESTART_DELAY_S)
            if self._stopping:
                return
            try:
                await self._spawn()
            except Exception as exc:
                log.error("restarting daemon for volume %s failed: %s", self.spec.volume_id, exc)

    async def restart(self, spec: DaemonSpec) -> None:
        """Stop the daemon (its final flush) and start it again from ``spec``.

        How a served volume grows: the daemon grows its device to
        ``--size-bytes`` when it opens. Attached clients on the nbdfuse path
        wait in the proxy meanwhile (csi/attach.py)."""
        await self.stop()
        self.spec = spec
        self._stopping = False
        await self._spawn()
        self._monitor = asyncio.create_task(self._watch())

    async def stop(self, timeout: float = 120) -> None:
        """SIGTERM: the daemon flushes everything to storage before it exits."""
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        pid = self.pid
        if pid is None:
            return
        process = self._process

        def gone() -> bool:
            return process.returncode is not None if process else not pid_alive(pid)

        try:
            await stop_async(pid, gone, timeout, f"daemon for volume {self.spec.volume_id}")
        except LaunchError:
            log.error("daemon for volume %s ignored SIGTERM; killing it", self.spec.volume_id)
        if process is not None:
            code = await process.wait()
            if code != 0:
                log.error("daemon for volume %s exited %d on stop", self.spec.volume_id, code)
        self.pid = None
