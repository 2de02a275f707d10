"""Read an offline W&B run file back (tests only): a LevelDB-style log, a 7-byte file header, then 32 KiB blocks of
records with 7-byte headers ``<crc:u32><len:u16><type:u8>`` (1 full, 2 first, 3 middle, 4 last fragment), each whole
record a ``wandb_internal_pb2.Record``."""

import json
import struct
import time
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - (pos % BLOCK)
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind in (1, 2):
            pending = payload
        else:
            pending += payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def finished_run(folder: Path, timeout: float = 120.0) -> Path:
    """The one ``run-*.wandb`` under ``folder`` once its ``exit`` record is on disk. ``run.finish()`` can return
    before wandb's service has flushed the file (seen on a loaded CI machine: the file held no history yet), so wait
    for the record that the service writes last, and fail naming what was there if it never comes."""
    deadline, seen = time.monotonic() + timeout, []
    while True:
        files = sorted(Path(folder).rglob("run-*.wandb"))
        if len(files) > 1:
            raise AssertionError(f"more than one W&B run under {folder}: {files}")
        if files:
            try:
                seen = [r.WhichOneof("record_type") for r in records(files[0])]
            except Exception:  # a record still being written (a torn protobuf): read again
                pass
            if "exit" in seen:
                return files[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no W&B run with an exit record under {folder} after {timeout:.0f} s "
                                 f"(files {files}, records {seen[-10:]})")
        time.sleep(0.2)


def history(path: Path) -> list[dict]:
    """Every logged history row as ``{key: value}``."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def config(path: Path) -> dict:
    out = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def artifacts(path: Path) -> list:
    return [r.artifact for r in records(path) if r.WhichOneof("record_type") == "artifact"]
