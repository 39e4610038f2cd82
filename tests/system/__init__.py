"""System tests: the qemu guest and kernel client, Nix and NixOS VM scripts, CSI deploy.

What a machine, a NixOS host or a k3s cluster would run.
"""
