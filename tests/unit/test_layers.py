"""The layers of pyvirtio (docs/layout.md): a module imports only from its own layer or
lower ones, so each layer can be used, tested and read without those above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pyvirtio

#: Module (or package prefix) -> layer, lowest first.  The longest matching prefix wins.
LAYERS: dict[str, int] = {
    # wire structs, constants, errors
    "pyvirtio": 0,
    "pyvirtio.errors": 0,
    "pyvirtio.closing": 0,
    "pyvirtio.client": 0,  # the commands' side of the control socket (stdlib only)
    "pyvirtio.timers": 0,
    "pyvirtio.spec": 0,
    # guest memory, then the rings in it
    "pyvirtio.memory": 1,
    "pyvirtio.virtqueue": 2,
    # the vhost-user wire format and the back-end request channel (sans I/O)
    "pyvirtio.vhost_user": 3,
    # the device API and the catalog of device types; the driver side's front-end
    "pyvirtio.devices": 4,
    "pyvirtio.frontend": 4,
    # device models and their back ends (files, taps, switches)
    "pyvirtio.devices.blk": 5,
    "pyvirtio.devices.blk_type": 5,
    "pyvirtio.devices.rng": 5,
    "pyvirtio.devices.balloon": 5,
    "pyvirtio.devices.balloon_type": 5,
    "pyvirtio.devices.net": 5,  # the package: device, rx, tx, ctrl, back ends, entry
    "pyvirtio.devices.console": 5,  # the package: device, control queues, ports, entry
    "pyvirtio.devices.scsi": 5,  # the package: cdb, sense, target, lun, device, entry
    "pyvirtio.devices.fs": 5,  # the package: device, server, inodes, ops, entry
    "pyvirtio.devices.gpu": 5,  # the package: device, resources, display link, entry
    "pyvirtio.devices.vsock": 5,  # the package: packets, connections, far side, device, entry
    "pyvirtio.devices.input": 5,  # the package: device, caps, keymap, client, entry
    # the vhost-user back-end: protocol state, rings, queue engine
    "pyvirtio.vhost_user.backend": 6,
    "pyvirtio.vhost_user.engine": 6,
    "pyvirtio.vhost_user.memtable": 6,
    "pyvirtio.vhost_user.rings": 6,
    "pyvirtio.vhost_user.state": 6,
    # I/O: the daemon's runtime, the in-process test harness, tools on the front-end
    "pyvirtio.runtime": 7,
    "pyvirtio.control": 7,
    "pyvirtio.testing": 7,
    "pyvirtio.frontend.probe": 7,
    "pyvirtio.frontend.bench": 7,
    "pyvirtio.frontend.netbench": 7,
    "pyvirtio.frontend.fsbench": 7,
    # guests, commands
    "pyvirtio.guestkit": 8,
    "pyvirtio.cli": 8,
    "pyvirtio.demo": 8,
    "pyvirtio.vmcmd": 8,
    "pyvirtio.benchcmd": 8,
}


def layer(module: str) -> int:
    """The layer of ``module``: its longest prefix in :data:`LAYERS`."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer: add it to LAYERS (and docs/layout.md)")


def _modules() -> dict[str, Path]:
    root = Path(pyvirtio.__file__).parent
    found = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "pyvirtio" or n.startswith("pyvirtio.")}


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        layer(module)


def test_no_module_imports_from_a_higher_layer() -> None:
    violations = []
    for module, path in sorted(_modules().items()):
        own = layer(module)
        for imported in sorted(_imports(path)):
            if layer(imported) > own:
                violations.append(f"{module} (layer {own}) imports {imported} "
                                  f"(layer {layer(imported)})")
    assert violations == []
