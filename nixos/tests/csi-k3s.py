KUBECTL = "k3s kubectl"


def wait_for(resource: str, jsonpath: str, value: str, timeout: int = 300) -> None:
    machine.wait_until_succeeds(
        f"test \"$({KUBECTL} get {resource} -o jsonpath='{{{jsonpath}}}')\" = {shlex.quote(value)}",
        timeout=timeout,
    )


start_all()
machine.wait_for_unit("k3s.service")

with subtest("k3s imported every image from the Nix store"):
    # Nothing can be pulled here: the sandbox image and all containers'
    # images come from services.k3s.images.
    for image in IMAGES:
        machine.wait_until_succeeds(
            f"k3s ctr -n k8s.io images ls -q | grep -qF {shlex.quote(image)}", timeout=300
        )

with subtest("the driver registers with the kubelet"):
    machine.wait_until_succeeds(f"{KUBECTL} get nodes | grep -w Ready", timeout=300)
    machine.wait_until_succeeds(f"{KUBECTL} get serviceaccount default", timeout=120)
    machine.succeed(f"{KUBECTL} apply -f {MANIFESTS}")
    machine.wait_until_succeeds(
        f"{KUBECTL} -n {NAMESPACE} rollout status daemonset/portalbd-csi --timeout=10s",
        timeout=300,
    )
    machine.wait_until_succeeds(
        f"{KUBECTL} get csinode -o jsonpath='{{.items[0].spec.drivers[*].name}}'"
        f" | grep -w {DRIVER}",
        timeout=120,
    )

with subtest("a claim is provisioned and mounted"):
    machine.succeed(f"{KUBECTL} apply -f {CLAIM}")
    wait_for("pvc data", ".status.phase", "Bound")
    machine.succeed(f"{KUBECTL} apply -f {POD}")
    machine.wait_until_succeeds(
        f"{KUBECTL} wait --for=condition=Ready pod/writer --timeout=10s", timeout=300
    )
    machine.succeed(f"{KUBECTL} exec writer -- sh -c 'echo persisted > /data/file && sync'")
    machine.succeed(f"{KUBECTL} exec writer -- grep -q ext4 /proc/mounts")

with subtest("the volume keeps its data for the next pod"):
    machine.succeed(f"{KUBECTL} delete pod writer --wait=true")
    machine.succeed(f"{KUBECTL} apply -f {POD}")
    machine.wait_until_succeeds(
        f"{KUBECTL} wait --for=condition=Ready pod/writer --timeout=10s", timeout=300
    )
    assert machine.succeed(f"{KUBECTL} exec writer -- cat /data/file").strip() == "persisted"

with subtest("deleting the claim deletes the volume"):
    volume = machine.succeed(f"{KUBECTL} get pvc data -o jsonpath='{{.spec.volumeName}}'").strip()
    machine.succeed(
        f"{KUBECTL} delete pod writer --wait=true", f"{KUBECTL} delete pvc data --wait=true"
    )
    machine.wait_until_fails(f"{KUBECTL} get pv {volume}", timeout=120)
