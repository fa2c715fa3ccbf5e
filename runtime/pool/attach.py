"""Attaching to a daemon pool: check that it is this user's, alive and serving the unchanged image, then claim
a row of its client table (under the pool's lock). The run then maps the ring read-only as that client
(runtime/pool/client.py) and plans within what the pool holds (runtime/engine/source.py). Torch-free; runs
in the client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from model.errors import ConfigError, UserError
from runtime.format.image import Image
from runtime.ipc.records import coordinator_alive, handle_of, pool_lock, read_record
from runtime.ipc.shm import CLIENT_ATTACHED, CLIENT_FREE, MAGIC, POOL_FAILED, VERSION, PoolHandle, PoolResources


def image_identity(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


@dataclass
class Attachment:
    record: dict
    handle: PoolHandle
    index: int  # this client's row of the pool's client table
    image: Image


def check_image_unchanged(rec: dict, image: Image) -> None:
    """Refuse a pool whose image changed after it started: identity (size, mtime, inode), header uuid,
    and every group's extent and checksum."""
    path = rec["image"]["path"]
    name = rec["name"]
    try:
        now = image_identity(path)
    except OSError as e:
        raise UserError(f"pool {name!r}: its image {path} is gone ({e.strerror}); restart the pool") from None
    then = {k: rec["image"][k] for k in now}
    if now != then:
        diff = ", ".join(f"{k} {then[k]} -> {now[k]}" for k in now if now[k] != then[k])
        raise UserError(f"pool {name!r}: image {path} changed since the pool started ({diff}); attach refused, "
                        f"restart the pool (launch.py pool stop {name}; pool start ...)")
    if image.uuid != rec["image"]["uuid"]:
        raise UserError(f"pool {name!r}: image {path} header uuid {image.uuid}, the pool serves "
                        f"{rec['image']['uuid']}; attach refused")
    if image.manifest_crcs() != rec["image"]["groups"]:
        raise UserError(f"pool {name!r}: the manifest of {path} lists other extents or checksums than the pool "
                        f"serves; attach refused")


def attach(name: str, image_path: str | None = None) -> Attachment:
    """Check pool ``name`` (this user's, alive, serving the unchanged image) and claim a client row."""
    rec = read_record(name)
    if not coordinator_alive(rec):
        raise UserError(f"pool {name!r} is not running (coordinator pid {rec.get('pid')} is gone); "
                        f"launch.py pool cleanup {name}, then pool start")
    if image_path is not None and os.path.realpath(image_path) != os.path.realpath(rec["image"]["path"]):
        raise ConfigError(f"--image {image_path}: pool {name!r} serves {rec['image']['path']} (leave out --image "
                          f"with --attach, or attach to a pool of that image)")
    image = Image.open(rec["image"]["path"], rec["image"]["manifest"])
    check_image_unchanged(rec, image)
    handle = handle_of(rec)
    with pool_lock(name):
        res = PoolResources.attach(handle, ring=False)
        try:
            if int(res.header["magic"]) != MAGIC or int(res.header["version"]) != VERSION or \
                    int(res.header["coord_pid"]) != int(rec["pid"]):
                raise UserError(f"pool {name!r}: its control block does not belong to coordinator pid {rec['pid']} "
                                f"(stale); launch.py pool cleanup {name}")
            if int(res.header["state"]) == POOL_FAILED:
                raise UserError(f"pool {name!r} failed: {res.get_error()}")
            free = [j for j in range(handle.n_clients) if int(res.clients[j]["state"]) == CLIENT_FREE]
            if not free:
                pids = [int(p) for p in res.clients["pid"]]
                raise UserError(f"pool {name!r}: all {handle.n_clients} client slots are attached (pids {pids}); "
                                f"start the pool with more --clients")
            j = free[0]
            res.clients[j]["pid"], res.clients[j]["state"] = os.getpid(), CLIENT_ATTACHED
        finally:
            res.close()
    return Attachment(rec, handle, j, image)


def release_row(att: Attachment) -> None:
    """Give back a claimed client row that no PoolClient took over (planning failed)."""
    res = PoolResources.attach(att.handle, ring=False)
    try:
        if int(res.clients[att.index]["pid"]) == os.getpid():
            res.clients[att.index]["state"] = CLIENT_FREE
    finally:
        res.close()
