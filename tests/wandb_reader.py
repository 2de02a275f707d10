"""Read an offline W&B run file back (tests only): a LevelDB-style log, a 7-byte file header, then 32 KiB blocks of
records with 7-byte headers ``<crc:u32><len:u16><type:u8>`` (1 full, 2 first, 3 middle, 4 last fragment), each whole
record a ``wandb_internal_pb2.Record``."""

import json
import struct
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
