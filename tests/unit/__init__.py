"""Unit tests: pure logic and in-process objects only (SlateDB on memory at most).

No daemon process and no external tool: these run anywhere, fast.
"""
