"""An attached volume: the kernel's FUSE channel (``fusedev``), the frontend that translates its
requests (``frontend``), the engine that fans them out to replicas (``engine``), online
``rebuild`` and ``scrub``, the control socket (``control``) and the process that holds them
all (``daemon``)."""
