# The CSI driver in a single-node k3s cluster: a PVC of the portalbd storage
# class is provisioned, mounted into a pod, keeps its data across pods and
# is deleted with the claim.
#
# Offline: every image k3s runs is in the Nix store and imported by k3s at
# start (services.k3s.images), the pod sandbox included (--pause-image), so
# nothing is pulled. The sidecars come from registry.k8s.io pinned by digest
# and architecture; portalbd-csi runs from an image built from this flake's
# package.
{ pkgs, lib, ... }:
let
  params = {
    DRIVER = "portalbd.csi.kyro.dev";
    NAMESPACE = "kube-system";
    MANIFESTS = "/etc/portalbd-csi/manifests.json";
    CLAIM = "/etc/portalbd-csi/claim.json";
    POD = "/etc/portalbd-csi/pod.json";
    PAUSE_IMAGE = "test.local/pause:local";
    # in what containerd lists once k3s has imported services.k3s.images
    IMAGES = [
      "test.local/pause:local"
      "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.12.0"
      "registry.k8s.io/sig-storage/csi-provisioner:v5.1.0"
      "portalbd-csi:test" # docker.io/library/ in front, as containerd names it
      "test.local/busybox:test"
    ];
  };

  # pullImage takes one architecture's image out of the multi-arch digest,
  # so each platform has its own hash. Only x86_64-linux's are known: for
  # another platform, add its entry with the hashes `nix-prefetch-docker
  # --image-name ... --image-digest ... --arch arm64` prints (the flake
  # offers the test on the platforms listed here, see meta.platforms).
  sidecarHashes = {
    x86_64-linux = {
      arch = "amd64";
      registrar = "sha256-+6Tu0QA+Yp6I9M2FuHqEYKa0S3sfx5NGcJ0lvU4D6LE=";
      provisioner = "sha256-YbYFgVf2EAniSFVa9jlocva5k2wYQfflBOtdAc80vQ0=";
    };
  };
  system = pkgs.stdenv.hostPlatform.system;
  sidecars =
    sidecarHashes.${system}
      or (throw "csi-k3s: no sidecar image hashes for ${system} (nixos/tests/csi-k3s.nix, sidecarHashes)");

  registrar = pkgs.dockerTools.pullImage {
    imageName = "registry.k8s.io/sig-storage/csi-node-driver-registrar";
    imageDigest = "sha256:0d23a6fd60c421054deec5e6d0405dc3498095a5a597e175236c0692f4adee0f";
    hash = sidecars.registrar;
    inherit (sidecars) arch;
    os = "linux";
    finalImageTag = "v2.12.0";
  };
  provisioner = pkgs.dockerTools.pullImage {
    imageName = "registry.k8s.io/sig-storage/csi-provisioner";
    imageDigest = "sha256:672e45d6a55678abc1d102de665b5cbd63848e75dc7896f238c8eaaf3c7d322f";
    hash = sidecars.provisioner;
    inherit (sidecars) arch;
    os = "linux";
    finalImageTag = "v5.1.0";
  };
  # The pod sandbox: k3s would pull rancher/mirrored-pause otherwise. tini
  # reaps what the pod's containers leave behind, sleep holds the namespaces.
  pause = pkgs.dockerTools.buildLayeredImage {
    name = "test.local/pause";
    tag = "local";
    contents = with pkgs; [
      tini
      coreutils
    ];
    config.Entrypoint = [
      "/bin/tini"
      "--"
      "/bin/sleep"
      "infinity"
    ];
  };
  csiImage = pkgs.dockerTools.buildLayeredImage {
    name = "portalbd-csi";
    tag = "test";
    contents = with pkgs; [
      portalbd
      bashInteractive
      coreutils
      e2fsprogs
      nbd
      util-linux
    ];
    config.Entrypoint = [ "/bin/portalbd-csi" ];
  };
  busybox = pkgs.dockerTools.buildLayeredImage {
    name = "test.local/busybox";
    tag = "test";
    contents = [ pkgs.busybox ];
  };

  pluginDir = "/var/lib/kubelet/plugins/${params.DRIVER}";
  hostPath = name: path: {
    inherit name;
    hostPath = {
      inherit path;
      type = "DirectoryOrCreate";
    };
  };
  mount = name: mountPath: { inherit name mountPath; };

  manifests = {
    apiVersion = "v1";
    kind = "List";
    items = [
      {
        apiVersion = "storage.k8s.io/v1";
        kind = "CSIDriver";
        metadata.name = params.DRIVER;
        spec = {
          attachRequired = false;
          podInfoOnMount = false;
          volumeLifecycleModes = [ "Persistent" ];
        };
      }
      {
        apiVersion = "storage.k8s.io/v1";
        kind = "StorageClass";
        metadata.name = "portalbd";
        provisioner = params.DRIVER;
        parameters.fsType = "ext4";
        reclaimPolicy = "Delete";
        volumeBindingMode = "Immediate";
      }
      {
        apiVersion = "v1";
        kind = "ServiceAccount";
        metadata = {
          name = "portalbd-csi";
          namespace = params.NAMESPACE;
        };
      }
      {
        apiVersion = "rbac.authorization.k8s.io/v1";
        kind = "ClusterRoleBinding";
        metadata.name = "portalbd-csi";
        # Test cluster only: the provisioner gets cluster-admin.
        roleRef = {
          apiGroup = "rbac.authorization.k8s.io";
          kind = "ClusterRole";
          name = "cluster-admin";
        };
        subjects = [
          {
            kind = "ServiceAccount";
            name = "portalbd-csi";
            namespace = params.NAMESPACE;
          }
        ];
      }
      {
        apiVersion = "apps/v1";
        kind = "DaemonSet";
        metadata = {
          name = "portalbd-csi";
          namespace = params.NAMESPACE;
        };
        spec = {
          selector.matchLabels.app = "portalbd-csi";
          template = {
            metadata.labels.app = "portalbd-csi";
            spec = {
              serviceAccountName = "portalbd-csi";
              hostNetwork = true;
              containers = [
                {
                  name = "portalbd-csi";
                  image = "portalbd-csi:test";
                  imagePullPolicy = "Never";
                  args = [
                    "--endpoint=unix:///csi/csi.sock"
                    "--root=file:///var/lib/portalbd-csi"
                    "--node-id=$(NODE_ID)"
                    "--mode=all"
                  ];
                  env = [
                    {
                      name = "NODE_ID";
                      valueFrom.fieldRef.fieldPath = "spec.nodeName";
                    }
                  ];
                  securityContext.privileged = true;
                  volumeMounts = [
                    (mount "plugin" "/csi")
                    (mount "data" "/var/lib/portalbd-csi")
                    (mount "dev" "/dev")
                    (mount "run" "/run/portalbd")
                    ((mount "pods" "/var/lib/kubelet") // { mountPropagation = "Bidirectional"; })
                  ];
                }
                {
                  name = "registrar";
                  image = "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.12.0";
                  imagePullPolicy = "Never";
                  args = [
                    "--csi-address=/csi/csi.sock"
                    "--kubelet-registration-path=${pluginDir}/csi.sock"
                  ];
                  volumeMounts = [
                    (mount "plugin" "/csi")
                    (mount "registration" "/registration")
                  ];
                }
                {
                  name = "provisioner";
                  image = "registry.k8s.io/sig-storage/csi-provisioner:v5.1.0";
                  imagePullPolicy = "Never";
                  args = [ "--csi-address=/csi/csi.sock" ];
                  volumeMounts = [ (mount "plugin" "/csi") ];
                }
              ];
              volumes = [
                (hostPath "plugin" pluginDir)
                (hostPath "registration" "/var/lib/kubelet/plugins_registry")
                (hostPath "pods" "/var/lib/kubelet")
                (hostPath "data" "/var/lib/portalbd-csi")
                (hostPath "run" "/run/portalbd")
                (hostPath "dev" "/dev")
              ];
            };
          };
        };
      }
    ];
  };

  claim = {
    apiVersion = "v1";
    kind = "PersistentVolumeClaim";
    metadata.name = "data";
    spec = {
      accessModes = [ "ReadWriteOnce" ];
      storageClassName = "portalbd";
      resources.requests.storage = "1Gi";
    };
  };

  pod = {
    apiVersion = "v1";
    kind = "Pod";
    metadata.name = "writer";
    spec = {
      containers = [
        {
          name = "writer";
          image = "test.local/busybox:test";
          imagePullPolicy = "Never";
          command = [
            "sleep"
            "3600"
          ];
          volumeMounts = [ (mount "data" "/data") ];
        }
      ];
      volumes = [
        {
          name = "data";
          persistentVolumeClaim.claimName = "data";
        }
      ];
    };
  };
in
{
  name = "portalbd-csi-k3s";
  meta.platforms = builtins.attrNames sidecarHashes;

  nodes.machine = {
    virtualisation = {
      memorySize = 4096;
      diskSize = 8192;
      cores = 2;
    };
    boot.kernelModules = [ "nbd" ];

    services.k3s = {
      enable = true;
      role = "server";
      images = [
        pause
        registrar
        provisioner
        csiImage
        busybox
      ];
      # Components whose images would come from a registry stay off; the
      # provisioner reaches the API server by its service IP, without DNS.
      extraFlags = [
        "--pause-image ${params.PAUSE_IMAGE}"
        "--disable coredns"
        "--disable local-storage"
        "--disable metrics-server"
        "--disable servicelb"
        "--disable traefik"
      ];
    };

    environment.etc = {
      "portalbd-csi/manifests.json".text = builtins.toJSON manifests;
      "portalbd-csi/claim.json".text = builtins.toJSON claim;
      "portalbd-csi/pod.json".text = builtins.toJSON pod;
    };

    environment.systemPackages = [ pkgs.k3s ];
  };

  testScript = (import ./lib.nix).testScript params ./csi-k3s.py;
}
