"""Caption output files (.jsonl or .csv) that make `blip-jax caption --output` resumable."""
from __future__ import annotations

import csv
import json
import os


class CaptionWriter:
    """Appends (image, caption) records to .jsonl or .csv and knows which images are already done."""

    def __init__(self, path: str):
        self.path = path
        extension = os.path.splitext(path)[1].lower()
        if extension not in (".jsonl", ".csv"):
            raise ValueError(f"--output {path} must end in .jsonl or .csv")
        self.format = extension[1:]
        self._handle = None
        self._writer = None

    def done(self) -> set[str]:
        """Absolute paths of the images already in the file (an unfinished last line is ignored)."""
        if not os.path.exists(self.path):
            return set()
        done = set()
        with open(self.path, newline="", encoding="utf-8") as handle:
            if self.format == "jsonl":
                for line in handle:
                    try:
                        done.add(os.path.abspath(json.loads(line)["image"]))
                    except (ValueError, KeyError, TypeError):
                        continue
            else:
                for row in csv.DictReader(handle):
                    if row.get("image") and row.get("caption") is not None:
                        done.add(os.path.abspath(row["image"]))
        return done

    def open(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if os.path.exists(self.path):
            # An interrupted run may have left half a record: cut the file back to its last full line.
            with open(self.path, "rb+") as handle:
                end = handle.seek(0, os.SEEK_END)
                position = end
                while position > 0:  # scan back, 64 KiB at a time, for the last newline
                    start = max(0, position - 65536)
                    handle.seek(start)
                    newline = handle.read(position - start).rfind(b"\n")
                    if newline >= 0:
                        position = start + newline + 1
                        break
                    position = start
                if position != end:
                    handle.truncate(position)
        exists = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        self._handle = open(self.path, "a", newline="", encoding="utf-8")
        if self.format == "csv":
            self._writer = csv.writer(self._handle)
            if not exists:
                self._writer.writerow(["image", "caption"])
        return self

    def write(self, image: str, caption: str) -> None:
        if self.format == "jsonl":
            self._handle.write(json.dumps({"image": image, "caption": caption}, ensure_ascii=False) + "\n")
        else:
            self._writer.writerow([image, caption])

    def flush(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
