NAMES = sorted(INSTANCES)


def unit(name: str) -> str:
    return f"portalbd-{name}.service"


def attach_unit(name: str) -> str:
    return f"portalbd-{name}-attach.service"


start_all()

with subtest("every instance runs its own daemon and device"):
    for name in NAMES:
        machine.wait_for_unit(unit(name))
        wait_attached(attach_unit(name), INSTANCES[name]["device"])
        machine.succeed(f"test -S /run/portalbd/{name}/control.sock")
    pids = {machine.get_unit_property(unit(name), "MainPID") for name in NAMES}
    assert len(pids) == len(NAMES), pids

with subtest("status tells the instances apart"):
    for name in NAMES:
        st = status(name)
        assert st["instance"] == name, st
        assert st["control_socket"] == f"/run/portalbd/{name}/control.sock", st
        expected = INSTANCES[name]["address"] or None
        assert st["nbd_address"] == expected, (name, st["nbd_address"])
        assert st.get("nbd_socket") == INSTANCES[name].get("socket"), st
        machine.succeed(f"portalctl --instance {name} status")

with subtest("each unit is confined to what it listens on"):
    families = machine.get_unit_property(unit("bravo"), "RestrictAddressFamilies")
    assert families == "AF_UNIX", families
    families = machine.get_unit_property(unit("alpha"), "RestrictAddressFamilies")
    assert "AF_INET" in families, families
    pid = machine.get_unit_property(unit("charlie"), "MainPID")
    owner = machine.succeed(f"ps -o user= -p {pid}").strip()
    assert owner == INSTANCES["charlie"]["user"], owner

with subtest("the disks are independent"):
    for name in NAMES:
        device = INSTANCES[name]["device"]
        machine.succeed(
            f"printf '%-4096s' {name}"
            f" | dd of={device} bs=4096 iflag=fullblock oflag=direct,sync status=none"
        )
    for name in NAMES:
        device = INSTANCES[name]["device"]
        first = machine.succeed(f"dd if={device} bs=4096 count=1 iflag=direct status=none")
        assert first.strip() == name, (name, first.strip())

with subtest("the TUI discovers every instance"):
    machine.succeed(
        "tmux new-session -d -s tui -x 200 -y 50 'TERM=xterm-256color portalbd-tui --refresh 0.5'"
    )
    for name in NAMES:
        machine.wait_until_succeeds(f"tmux capture-pane -p -t tui | grep -q {name}", timeout=60)
    machine.succeed("tmux kill-session -t tui")

with subtest("stopping one instance leaves the others serving"):
    machine.succeed(f"systemctl stop {unit('alpha')}")
    wait_detached(INSTANCES["alpha"]["device"])
    machine.fail("test -e /run/portalbd/alpha/control.sock")
    for name in ["bravo", "charlie"]:
        machine.require_unit_state(unit(name))
        status(name)
        device = INSTANCES[name]["device"]
        first = machine.succeed(f"dd if={device} bs=4096 count=1 iflag=direct status=none")
        assert first.strip() == name
