"""Reads the records of an offline W&B run file (run-*.wandb: a LevelDB-style log of protobuf records)."""
import struct
import time
from pathlib import Path

BLOCK = 32768
HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, chunk, records = HEADER, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if pos + length > len(data):  # a record still being written
            break
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def read_finished_run(run_dir: Path, timeout_s: float = 60.0) -> list:
    """Records of the run in `run_dir` once its exit record is on disk.

    `Run.finish()` can return before W&B's service process has flushed the run file, so this polls."""
    path = next(Path(run_dir).glob("run-*.wandb"))
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history_keys(records) -> set[str]:
    return {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item}


def config_keys(records) -> set[str]:
    return {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "config" for i in r.config.update}


def config_value(records, key: str) -> str:
    values = [i.value_json for r in records if r.WhichOneof("record_type") == "config" for i in r.config.update if i.key == key]
    return values[-1] if values else ""
