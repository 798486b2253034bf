"""Read what an offline W&B run wrote to disk (no mock, no server)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Decode a `run-*.wandb` transaction log (what offline runs write).

    The file is a 7-byte header (b":W&B", magic 0xBEE1, version) followed by LevelDB-log
    framing: 32 KiB blocks of chunks with a 7-byte header (crc32c, uint16 length, type:
    1 full, 2 first, 3 middle, 4 last). Each reassembled payload is a protobuf `Record`.
    wandb 0.31 ships the protobuf classes but no Python reader of the framing.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:  # zero-filled rest of a block
            pos += left - 7
            continue
        if pos + length > len(data):  # a record still being written
            break
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def read_finished_wandb_log(path: Path, timeout: float = 20.0) -> list:
    """Read the transaction log once it holds the run's `exit` record.

    `run.finish()` returns before wandb-core has necessarily written the offline log: now
    and then the file still holds only its 7-byte header, so wait for the final record.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} never got an exit record"
        time.sleep(0.05)


def history_by_step(records: list[wandb_internal_pb2.Record]) -> dict[int, dict[str, object]]:
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows[record.history.step.num] = {
                (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items
            }
    return rows
