"""Metadata: what an asset's page shows about a run, in the words and units of the person reading it.

- sizes and durations in human units (``1.15 MB``, ``12.3 ms``); the numbers worth plotting stay numbers;
- a frame's statistics: rows (``dagster/row_count``), columns and types (``dagster/column_schema``), nulls per column,
  numeric summaries and the balance of each class-like column;
- metrics a model reported (``metric/<name>``), as floats Dagster plots across materialisations;
- a frame's data version (the sha256 of its Arrow stream), so a re-materialised input that did not change leaves
  what depends on it in sync;
- a model version's commit as a link to its code where the repository has a web remote.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from dagster import (
    BetaWarning,
    CodeReferencesMetadataValue,
    DataVersion,
    LocalFileCodeReference,
    MetadataValue,
    TableColumn,
    TableRecord,
    TableSchema,
    UrlCodeReference,
)

from orchestrator.versions import WebRemote

__all__ = [
    "code_references",
    "commit_link",
    "frame_metadata",
    "frame_version",
    "human_duration",
    "human_size",
    "metric_metadata",
    "preview",
    "quiet_beta",
]

PREVIEW_ROWS = 5
MAX_COLUMNS = 100  # columns summarised; a wider frame shows the first ones
MAX_PLOTTED = 20  # float columns (scores, not ids) whose mean becomes a plottable entry
MAX_CLASSES = 20  # distinct values up to which a string or boolean column is shown as classes


def human_size(size: int) -> str:
    """Bytes in decimal units, as the README and pex report them: ``850 B``, ``12.3 KB``, ``1.15 MB``."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``850 µs``, ``12.3 ms``, ``1.62 s``, ``2 min 05 s``, ``1 h 02 min``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def metric_metadata(metrics: Mapping[str, float]) -> dict[str, MetadataValue]:
    return {f"metric/{name}": MetadataValue.float(value) for name, value in metrics.items()}


def preview(table: pa.Table, rows: int = PREVIEW_ROWS) -> MetadataValue:
    """The first rows as a Markdown table."""
    head = table.slice(0, rows)
    columns = [_values(head.column(index)) for index in range(head.num_columns)]
    lines = ["| " + " | ".join(table.column_names) + " |", "|" + " --- |" * table.num_columns]
    lines += [
        "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in zip(*columns, strict=True)
    ]
    return MetadataValue.md("\n".join(lines))


class _Sha256Sink:
    """A write-only file that hashes what it is given: a frame's Arrow stream is digested without a copy."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # N.B. Each column's stream closes its writer; the digest goes on.


def frame_version(table: pa.Table) -> DataVersion:
    """The sha256 of the frame as Arrow IPC, a column at a time: equal frames, equal versions, however chunked.

    N.B. Column by column, each in one chunk: the same values split into other record batches would hash
    differently, and only one column is copied at a time.
    """
    sink = _Sha256Sink()
    sink.write(table.schema.serialize())
    for name, column in zip(table.column_names, table.columns, strict=True):
        batch = pa.record_batch([column.combine_chunks()], names=[name])
        with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), batch.schema) as writer:
            writer.write_batch(batch)
    return DataVersion(sink.digest.hexdigest())


def frame_metadata(table: pa.Table) -> dict[str, Any]:
    """Rows, schema, per-column nulls and summaries, class balance, plottable means, and a preview."""
    columns = table.column_names[:MAX_COLUMNS]
    summaries = [_summary(name, table[name]) for name in columns]
    metadata: dict[str, Any] = {
        "dagster/row_count": MetadataValue.int(table.num_rows),
        "dagster/column_schema": MetadataValue.table_schema(
            TableSchema(columns=[TableColumn(name, str(table.schema.field(name).type)) for name in columns])
        ),
        "nulls": MetadataValue.int(sum(table[name].null_count for name in table.column_names)),
        "columns": MetadataValue.table(
            records=[TableRecord(s) for s in summaries],
            schema=TableSchema(
                columns=[
                    TableColumn("column", "string"),
                    TableColumn("type", "string"),
                    TableColumn("nulls", "int"),
                    TableColumn("min", "string"),
                    TableColumn("mean", "float"),
                    TableColumn("max", "string"),
                ]
            ),
        ),
    }
    balance = [record for name in columns for record in _classes(name, table[name], table.num_rows)]
    if balance:
        metadata["class_balance"] = MetadataValue.table(
            records=[TableRecord(r) for r in balance],
            schema=TableSchema(
                columns=[
                    TableColumn("column", "string"),
                    TableColumn("value", "string"),
                    TableColumn("rows", "int"),
                    TableColumn("share", "float"),
                ]
            ),
        )
    floats = {name for name in columns if pa.types.is_floating(table.schema.field(name).type)}
    plotted = [s for s in summaries if s["column"] in floats and s["mean"] is not None][:MAX_PLOTTED]
    metadata |= {f"mean/{s['column']}": MetadataValue.float(s["mean"]) for s in plotted}
    metadata["preview"] = preview(table)
    return metadata


def _summary(name: str, column: pa.ChunkedArray) -> dict[str, Any]:
    """Type, nulls, and for numbers and dates their min, mean (numbers only) and max."""
    kind = column.type
    summary: dict[str, Any] = {"column": name, "type": str(kind), "nulls": column.null_count}
    summary |= {"min": None, "mean": None, "max": None}
    try:
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_temporal(kind):
            bounds = _bounds(pc.min_max(column))
            summary["min"] = None if bounds["min"] is None else _short(bounds["min"])
            summary["max"] = None if bounds["max"] is None else _short(bounds["max"])
        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            mean = pc.mean(column).as_py()
            summary["mean"] = None if mean is None else round(float(mean), 6)
    except pa.ArrowNotImplementedError:  # N.B. Types Arrow has no kernel for (float16): no summary, not a failure.
        pass
    return summary


def _values(column: pa.ChunkedArray) -> list[Any]:
    """A column's values in Python; dates and times Python cannot hold (a model's year 300,000) as raw numbers."""
    try:
        return column.to_pylist()
    except (OverflowError, ValueError):
        return column.cast(_raw(column.type)).to_pylist()


def _bounds(scalar: pa.StructScalar) -> dict[str, Any]:
    """Min and max as Python values; a date or time Python cannot hold (a model's year 300,000) as its raw number."""
    try:
        return scalar.as_py()
    except (OverflowError, ValueError):
        return {
            key: None if not value.is_valid else value.cast(_raw(value.type)).as_py() for key, value in scalar.items()
        }


def _raw(kind: pa.DataType) -> pa.DataType:
    return pa.int32() if kind.bit_width == 32 else pa.int64()


def _short(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _classes(name: str, column: pa.ChunkedArray, rows: int) -> list[dict[str, Any]]:
    """Rows per value of a string, boolean or dictionary column with few distinct values; [] otherwise."""
    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_boolean(kind)) and not (
        pa.types.is_dictionary(kind)
    ):
        return []
    counts = pc.value_counts(column).to_pylist()
    if len(counts) > MAX_CLASSES:
        return []
    counts.sort(key=lambda c: -c["counts"])
    return [
        {"column": name, "value": str(c["values"]), "rows": c["counts"], "share": round(c["counts"] / rows, 4)}
        for c in counts
    ]


def commit_link(commit: str | None, web: WebRemote | None) -> MetadataValue:
    """The commit a pex was built from: a link to it on the remote, or the text (``+dirty``: no commit holds it)."""
    if commit and web and not commit.endswith("+dirty"):
        return MetadataValue.url(web.commit_url(commit))
    return MetadataValue.text(commit or "not built from git")


def code_references(local_file: str, url: str | None, label: str) -> CodeReferencesMetadataValue:
    """Where a model version's code is: its page on the remote when there is one, else the local file."""
    with quiet_beta():
        if url:
            reference: UrlCodeReference | LocalFileCodeReference = UrlCodeReference(url=url, label=label)
        else:
            reference = LocalFileCodeReference(file_path=local_file, label=label)
        return CodeReferencesMetadataValue(code_references=[reference])


@contextmanager
def quiet_beta() -> Iterator[None]:
    """Dagster's beta APIs we use on purpose (code references, data versions) without a warning per asset or step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)
        yield
