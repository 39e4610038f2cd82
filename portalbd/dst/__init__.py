"""Deterministic simulation testing: seeded workloads, crashes and an oracle.

``portalbd-dst --seed N --steps M`` runs one simulation. The operation
sequence depends only on the seed; SlateDB's own threads are not under our
control, so the oracle accepts every outcome the durability contract allows
and nothing else.
"""
