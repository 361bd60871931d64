"""virtio-gpu definitions, 2D subset (VIRTIO 1.4 §5.7 GPU Device), and the
vhost-user-gpu side protocol (QEMU's docs/interop/vhost-user-gpu.rst).

Queues (§5.7.2): ``controlq`` 0 and ``cursorq`` 1.  Every request and response
starts with ``struct virtio_gpu_ctrl_hdr`` (§5.7.6.7); the command-specific
fields follow.  All virtio structures are little-endian; the vhost-user-gpu
messages are in the host's byte order (the two ends share a machine).
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "BYTES_PER_PIXEL",
    "CONFIG",
    "CONTROLQ",
    "CTRL_HDR",
    "CURSORQ",
    "CURSOR_SIZE",
    "DISPLAY_ONE",
    "EDID_BLOB_SIZE",
    "FLAG_FENCE",
    "FLAG_INFO_RING_IDX",
    "GET_EDID",
    "MAX_SCANOUTS",
    "MEM_ENTRY",
    "RECT",
    "RESOURCE_ATTACH_BACKING",
    "RESOURCE_CREATE_2D",
    "RESOURCE_FLUSH",
    "RESOURCE_ID",
    "RESP_DISPLAY_INFO_SIZE",
    "RESP_EDID",
    "SET_SCANOUT",
    "TRANSFER_TO_HOST_2D",
    "UPDATE_CURSOR",
    "VU_CURSOR_POS",
    "VU_EDID_REQUEST",
    "VU_FLAG_REPLY",
    "VU_HEADER",
    "VU_SCANOUT",
    "VU_UPDATE",
    "CtrlType",
    "GpuFeature",
    "GpuFormat",
    "VuGpuRequest",
]

#: Queue indexes (§5.7.2).
CONTROLQ = 0
CURSORQ = 1

#: At most this many scanouts (§5.7.6.8, ``VIRTIO_GPU_MAX_SCANOUTS``).
MAX_SCANOUTS = 16
#: Every 2D format of §5.7.6.8 has four bytes per pixel.
BYTES_PER_PIXEL = 4
#: Cursor images are 64x64 (§5.7.6.6).
CURSOR_SIZE = 64
#: ``edid[1024]`` of ``struct virtio_gpu_resp_edid``.
EDID_BLOB_SIZE = 1024

#: ``flags`` of the header (§5.7.6.7).
FLAG_FENCE = 1 << 0
FLAG_INFO_RING_IDX = 1 << 1


class GpuFeature(enum.IntEnum):
    """Device-specific feature bits (§5.7.3)."""

    VIRGL = 0
    EDID = 1
    RESOURCE_UUID = 2
    RESOURCE_BLOB = 3
    CONTEXT_INIT = 4
    BLOB_ALIGNMENT = 5


class CtrlType(enum.IntEnum):
    """``enum virtio_gpu_ctrl_type`` (§5.7.6.7): commands and responses."""

    CMD_GET_DISPLAY_INFO = 0x0100
    CMD_RESOURCE_CREATE_2D = 0x0101
    CMD_RESOURCE_UNREF = 0x0102
    CMD_SET_SCANOUT = 0x0103
    CMD_RESOURCE_FLUSH = 0x0104
    CMD_TRANSFER_TO_HOST_2D = 0x0105
    CMD_RESOURCE_ATTACH_BACKING = 0x0106
    CMD_RESOURCE_DETACH_BACKING = 0x0107
    CMD_GET_CAPSET_INFO = 0x0108
    CMD_GET_CAPSET = 0x0109
    CMD_GET_EDID = 0x010A
    CMD_RESOURCE_ASSIGN_UUID = 0x010B
    CMD_RESOURCE_CREATE_BLOB = 0x010C
    CMD_SET_SCANOUT_BLOB = 0x010D

    CMD_UPDATE_CURSOR = 0x0300
    CMD_MOVE_CURSOR = 0x0301

    RESP_OK_NODATA = 0x1100
    RESP_OK_DISPLAY_INFO = 0x1101
    RESP_OK_CAPSET_INFO = 0x1102
    RESP_OK_CAPSET = 0x1103
    RESP_OK_EDID = 0x1104

    RESP_ERR_UNSPEC = 0x1200
    RESP_ERR_OUT_OF_MEMORY = 0x1201
    RESP_ERR_INVALID_SCANOUT_ID = 0x1202
    RESP_ERR_INVALID_RESOURCE_ID = 0x1203
    RESP_ERR_INVALID_CONTEXT_ID = 0x1204
    RESP_ERR_INVALID_PARAMETER = 0x1205


class GpuFormat(enum.IntEnum):
    """``enum virtio_gpu_formats`` (§5.7.6.8): the byte order in memory of each pixel.

    ``B8G8R8X8`` is blue, green, red, unused, in that order in memory: what Linux
    uses on a little-endian guest, and what QEMU's ``PIXMAN_x8r8g8b8`` is.
    """

    B8G8R8A8_UNORM = 1
    B8G8R8X8_UNORM = 2
    A8R8G8B8_UNORM = 3
    X8R8G8B8_UNORM = 4
    R8G8B8A8_UNORM = 67
    X8B8G8R8_UNORM = 68
    A8B8G8R8_UNORM = 121
    R8G8B8X8_UNORM = 134


#: ``struct virtio_gpu_config`` (§5.7.4) without ``blob_alignment`` (only valid with
#: BLOB_ALIGNMENT): events_read, events_clear, num_scanouts, num_capsets.
CONFIG = struct.Struct("<IIII")
#: ``struct virtio_gpu_ctrl_hdr``: type, flags, fence_id, ctx_id, ring_idx, padding[3].
CTRL_HDR = struct.Struct("<IIQIB3x")
#: ``struct virtio_gpu_rect``: x, y, width, height.
RECT = struct.Struct("<IIII")
#: ``struct virtio_gpu_display_one``: the rect, enabled, flags.
DISPLAY_ONE = struct.Struct("<IIIIII")
#: ``struct virtio_gpu_resp_display_info``: the header and 16 ``display_one``.
RESP_DISPLAY_INFO_SIZE = CTRL_HDR.size + MAX_SCANOUTS * DISPLAY_ONE.size
#: ``struct virtio_gpu_get_edid`` after the header: scanout, padding.
GET_EDID = struct.Struct("<I4x")
#: ``struct virtio_gpu_resp_edid`` after the header: size, padding (then ``edid[1024]``).
RESP_EDID = struct.Struct("<I4x")
#: ``struct virtio_gpu_resource_create_2d`` after the header: resource_id, format,
#: width, height.
RESOURCE_CREATE_2D = struct.Struct("<IIII")
#: ``resource_unref`` and ``resource_detach_backing`` after the header: resource_id,
#: padding.
RESOURCE_ID = struct.Struct("<I4x")
#: ``struct virtio_gpu_set_scanout`` after the header: rect, scanout_id, resource_id.
SET_SCANOUT = struct.Struct("<IIIIII")
#: ``struct virtio_gpu_resource_flush`` after the header: rect, resource_id, padding.
RESOURCE_FLUSH = struct.Struct("<IIIII4x")
#: ``struct virtio_gpu_transfer_to_host_2d`` after the header: rect, offset,
#: resource_id, padding.
TRANSFER_TO_HOST_2D = struct.Struct("<IIIIQI4x")
#: ``struct virtio_gpu_resource_attach_backing`` after the header: resource_id,
#: nr_entries (then that many ``mem_entry``).
RESOURCE_ATTACH_BACKING = struct.Struct("<II")
#: ``struct virtio_gpu_mem_entry``: addr, length, padding.
MEM_ENTRY = struct.Struct("<QI4x")
#: ``struct virtio_gpu_update_cursor`` after the header: pos (scanout_id, x, y,
#: padding), resource_id, hot_x, hot_y, padding.
UPDATE_CURSOR = struct.Struct("<III4xIII4x")


# -- vhost-user-gpu (QEMU docs/interop/vhost-user-gpu.rst) ----------------------------------


class VuGpuRequest(enum.IntEnum):
    """vhost-user-gpu message types, sent by the back-end on the socket that
    VHOST_USER_GPU_SET_SOCKET gives it (the front-end replies to some)."""

    GET_PROTOCOL_FEATURES = 1
    SET_PROTOCOL_FEATURES = 2
    GET_DISPLAY_INFO = 3
    CURSOR_POS = 4
    CURSOR_POS_HIDE = 5
    CURSOR_UPDATE = 6
    SCANOUT = 7
    UPDATE = 8
    DMABUF_SCANOUT = 9
    DMABUF_UPDATE = 10
    GET_EDID = 11
    DMABUF_SCANOUT2 = 12


#: The message header, native byte order: request, flags, size (of the payload).
VU_HEADER = struct.Struct("=III")
#: ``flags`` bit 2: the message is a reply.
VU_FLAG_REPLY = 1 << 2
#: ``VhostUserGpuCursorPos``: scanout_id, x, y.
VU_CURSOR_POS = struct.Struct("=III")
#: ``VhostUserGpuScanout``: scanout_id, width, height.
VU_SCANOUT = struct.Struct("=III")
#: ``VhostUserGpuUpdate`` before its pixels: scanout_id, x, y, width, height.
VU_UPDATE = struct.Struct("=IIIII")
#: ``VhostUserGpuEdidRequest``: scanout_id.
VU_EDID_REQUEST = struct.Struct("=I")
