"""Guest fleets: image, spec, QEMU and libvirt backends, accelerator probe, agent and Fleet.

Importing the package is cheap; libvirt is imported only by the libvirt backend.
"""
