"""The CSV path of batches, for people who do not write JSONL: a `prompt` column becomes request lines.

Columns: `prompt` (required), and optionally `custom_id` (else `row-N`), `model` (else the
model chosen on the form), `system` and `max_tokens`. Each data row becomes one JSONL line, row N
(the first after the header being 1) is line N of the batch's input file, so the batch's errors
name rows. The conversion streams: rows are read from the upload's spooled part and written to a
spooled file, which is then stored like any JSONL upload (`services/files.store_upload`).
Whatever a row holds is passed on as it is: the intake judges it (an empty prompt or a bad
max_tokens is that row's error, not the file's).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from typing import BinaryIO

from ..errors import ValidationError

COLUMNS = ("prompt", "custom_id", "model", "system", "max_tokens")
SPOOL_BYTES = 1024 * 1024
# A cell may be as long as a line may (the line limit is checked when the lines are stored).
csv.field_size_limit(2 * 1024 * 1024)


def is_csv(filename: str | None, content_type: str | None) -> bool:
    name = (filename or "").lower()
    return name.endswith(".csv") or (content_type or "").split(";")[0].strip() in ("text/csv", "application/csv")


def to_jsonl(stream: BinaryIO) -> BinaryIO:
    """Return a spooled file of JSONL request lines made from a CSV upload; raise ValidationError."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (returned, read by the caller)
    try:
        header = next(reader, None)
        if header is None:
            raise ValidationError("The CSV file is empty.", {"file": "empty"})
        names = [name.strip().lower() for name in header]
        if "prompt" not in names:
            raise ValidationError(
                "The CSV file needs a header row with a 'prompt' column "
                "(optional columns: custom_id, model, system, max_tokens).",
                {"file": "no prompt column"},
            )
        index = {name: names.index(name) for name in COLUMNS if name in names}
        for number, row in enumerate(reader, start=1):
            if not any(cell.strip() for cell in row):
                out.write(b"\n")  # kept as a blank line: line N stays row N
                continue
            out.write(json.dumps(_line(number, row, index), ensure_ascii=False).encode() + b"\n")
    except UnicodeDecodeError:
        raise ValidationError("The CSV file is not UTF-8 text: save it as CSV UTF-8.", {"file": "not UTF-8"}) from None
    except csv.Error as exc:
        raise ValidationError(f"The CSV file cannot be read ({exc}).", {"file": "not CSV"}) from None
    finally:
        text.detach()
    out.seek(0)
    return out


def _cell(row: list[str], index: dict, name: str) -> str | None:
    position = index.get(name)
    if position is None or position >= len(row):
        return None
    return row[position]


def _line(number: int, row: list[str], index: dict) -> dict:
    messages = []
    system = _cell(row, index, "system")
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": _cell(row, index, "prompt") or ""})
    body: dict = {"messages": messages}
    model = (_cell(row, index, "model") or "").strip()
    if model:
        body["model"] = model
    max_tokens = (_cell(row, index, "max_tokens") or "").strip()
    if max_tokens:
        body["max_tokens"] = int(max_tokens) if max_tokens.isdecimal() and max_tokens.isascii() else max_tokens
    custom_id = (_cell(row, index, "custom_id") or "").strip() or f"row-{number}"
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
