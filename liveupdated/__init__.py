"""liveupdated: carries VMM file descriptors across a kernel live update (kexec)."""

__version__ = "0.4.0"
