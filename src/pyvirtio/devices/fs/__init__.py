"""virtio-fs (VIRTIO 1.4 §5.11): a FUSE 7.38 file server sharing a host directory.

- :mod:`.device`: the virtio device, its queues, the worker pool and the lock waiter;
- :mod:`.server`: configuration, requests, replies' helpers;
- :mod:`.inodes`: inodes by ``O_PATH`` fd and file handles, both bounded;
- :mod:`.safe`: name checks, ``openat2`` and the syscalls ``os`` lacks;
- :mod:`.ops_entry`, :mod:`.ops_file`: the FUSE operations;
- :mod:`.entry`: the registry entry (``pyvirtio serve fs``).
"""
