"""I/O traces: record what clients send, replay it, benchmark configurations."""
