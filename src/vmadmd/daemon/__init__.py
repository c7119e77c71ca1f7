"""vmadmd, the daemon."""
