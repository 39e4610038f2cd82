"""Integration tests: a real daemon and/or real clients and servers.

libnbd, fio, nbdfuse, nbdkit, moto, the TUI against a live daemon.
"""
