"""virtio-scsi: a SCSI target whose logical units are image files (VIRTIO 1.4 §5.6).

- :mod:`~pyvirtio.devices.scsi.cdb`: typed CDBs and their decoder;
- :mod:`~pyvirtio.devices.scsi.sense`: status codes and sense data;
- :mod:`~pyvirtio.devices.scsi.target`: the target, sans I/O (SPC-5, SBC-4 subset), with
  :mod:`~pyvirtio.devices.scsi.mmc` for the CD-ROM (MMC-6) and
  :mod:`~pyvirtio.devices.scsi.answers` (units, replies, the medium I/O they need);
- :mod:`~pyvirtio.devices.scsi.lun`: disk and CD-ROM units over image files;
- :mod:`~pyvirtio.devices.scsi.device`: the virtio device (:class:`ScsiDevice`), writing
  its responses with :mod:`~pyvirtio.devices.scsi.responses` and keeping its requests in
  flight and task management in :mod:`~pyvirtio.devices.scsi.tasks`;
- :mod:`~pyvirtio.devices.scsi.entry`: ``pyvirtio serve scsi`` and ``pyvirtio scsi``.
"""

from pyvirtio.devices.scsi.device import ScsiDevice, ScsiOptions

__all__ = ["ScsiDevice", "ScsiOptions"]
