"""vmadmd for Linux: a QEMU virtual machine management daemon and its vmadm CLI."""

__version__ = "0.1.0"
