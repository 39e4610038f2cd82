"""Textual terminal UI for watching and operating portalbd instances."""
