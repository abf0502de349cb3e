"""Loaders for the real traces, one function per source, the generic request file, and the
live controller's history of windows.

Every loader names the file and line of a malformed row. Rows that are well-formed but unusable
(negative token counts, say) are skipped and counted in the result's `skipped`, never silently.
"""

from __future__ import annotations

import csv
import functools
import gzip
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

AZURE_LLM_FILES = {
    "conv": "AzureLLMInferenceTrace_conv.csv",
    "code": "AzureLLMInferenceTrace_code.csv",
}
SERVEGEN_FILE = "servegen_aggregate_rate_per_model.csv"
SERVEGEN_CLIENTS_FILE = "servegen_clients.csv.gz"
SERVEGEN_WINDOWS = 2016  # 14 days of 10-minute windows
SERVEGEN_PATTERNS = ("Exponential", "Gamma", "Weibull")
FUNCTIONS_FILE = "azure_functions_2019_1000_inv.csv"
SERVEGEN_WINDOW_S = 600.0


class TraceError(ValueError):
    """A trace file is missing, truncated or malformed; the message names file and line."""


@dataclass(frozen=True)
class LLMTrace:
    """Arrivals (seconds from the first) and token lengths of an LLM request trace."""

    arrival_s: np.ndarray  # [N] float64, sorted
    input_tokens: np.ndarray  # [N] int64
    output_tokens: np.ndarray  # [N] int64
    source: str
    skipped: int = 0

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self.arrival_s) else 0.0


@dataclass(frozen=True)
class RequestFile:
    """A generic request file: `arrival_s,model,input_tokens,output_tokens` (extra columns ok)."""

    arrival_s: np.ndarray
    model: list[str]
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    skipped: int = 0


def shipped(name: str) -> Path:
    return Path(str(resources.files("warmserve.workload").joinpath("data", name)))


def load_azure_llm(kind_or_path: str | Path) -> LLMTrace:
    """The Azure LLM inference trace 2023 (`conv`, `code`, or a path to a file like them)."""
    path = shipped(AZURE_LLM_FILES[kind_or_path]) if kind_or_path in AZURE_LLM_FILES else Path(
        kind_or_path)
    times, inputs, outputs, skips = [], [], [], _Skips(path)
    for line, row in _rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        try:
            stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])
        except (TypeError, ValueError):
            raise TraceError(f"{path}:{line}: TIMESTAMP {row['TIMESTAMP']!r} is not an ISO "
                             f"date and time") from None
        n_in = _number(path, line, row, "ContextTokens", int)
        n_out = _number(path, line, row, "GeneratedTokens", int)
        if n_in <= 0 or n_out <= 0:
            skips.add(line, f"token counts {n_in}, {n_out} (both must be > 0)")
            continue
        times.append(stamp.timestamp())
        inputs.append(n_in)
        outputs.append(n_out)
    skips.report(usable=len(times))
    order = np.argsort(times, kind="stable")
    t = np.asarray(times)[order]
    return LLMTrace(t - t[0], np.asarray(inputs)[order], np.asarray(outputs)[order], str(path),
                    skips.count)


def load_servegen_rates(path: Path | None = None) -> dict[str, np.ndarray]:
    """ServeGen per-model aggregate rate (requests/s) per 10-minute window, by model name."""
    path = path or shipped(SERVEGEN_FILE)
    series: dict[str, list[tuple[float, float]]] = {}
    for line, row in _rows(path, ("model", "window_start_s", "total_rate_rps")):
        start = _number(path, line, row, "window_start_s", float)
        rate = _number(path, line, row, "total_rate_rps", float)
        series.setdefault(row["model"], []).append((start, max(rate, 0.0)))
    out = {}
    for model, points in series.items():
        points.sort()
        starts = np.array([p[0] for p in points])
        if np.any(np.diff(starts) != SERVEGEN_WINDOW_S):
            raise TraceError(f"{path}: model {model!r} has missing or repeated windows")
        out[model] = np.array([p[1] for p in points])
    return out


@dataclass(frozen=True)
class ClientWindows:
    """ServeGen's per-client arrival processes of one model: one row per (client, window) in
    which the client is active. The inter-arrival times of a row follow `pattern` (an index into
    SERVEGEN_PATTERNS) with shape parameter `shape`; its mean is 1 / rate."""

    client: np.ndarray  # [R] int32
    window: np.ndarray  # [R] int32, sorted; 10-minute window index (0 .. SERVEGEN_WINDOWS-1)
    rate: np.ndarray  # [R] float64, requests/s (ServeGen's relative weights)
    pattern: np.ndarray  # [R] int8
    shape: np.ndarray  # [R] float64 (Gamma: k; Weibull: k; Exponential: 1)

    @property
    def mean_rate(self) -> float:
        """The model's aggregate rate averaged over all windows."""
        return float(self.rate.sum()) / SERVEGEN_WINDOWS

    def rows_in(self, first: int, last: int) -> slice:
        """Rows of windows first..last-1 (no wrap-around)."""
        lo, hi = np.searchsorted(self.window, [first, last])
        return slice(int(lo), int(hi))


def load_servegen_clients(path: Path | None = None) -> dict[str, ClientWindows]:
    """ServeGen's per-client windows (`model,client,window_start_s,rate,cv,pattern,p1,p2`).
    The shipped file (no `path`) is parsed once per process (~2 s); treat it as read-only."""
    if path is None:
        return _shipped_servegen_clients()
    cols: dict[str, list[list]] = {}
    required = ("model", "client", "window_start_s", "rate", "pattern", "p1")
    for line, row in _rows(path, required):
        name = row["pattern"] or "Exponential"
        if name not in SERVEGEN_PATTERNS:
            raise TraceError(f"{path}:{line}: pattern {name!r} is not one of "
                             f"{', '.join(SERVEGEN_PATTERNS)}")
        pattern = SERVEGEN_PATTERNS.index(name)
        window = int(_number(path, line, row, "window_start_s", float) // SERVEGEN_WINDOW_S)
        rate = _number(path, line, row, "rate", float)
        shape = _number(path, line, row, "p1", float)
        client = _number(path, line, row, "client", int)
        if not 0 <= window < SERVEGEN_WINDOWS:
            raise TraceError(f"{path}:{line}: window_start_s {row['window_start_s']} is outside "
                             f"the trace's {SERVEGEN_WINDOWS} windows")
        if rate <= 0:
            continue  # an idle client-window carries no arrivals
        if pattern and not shape > 0:
            raise TraceError(f"{path}:{line}: {row['pattern']} shape p1={row['p1']} must be > 0")
        cols.setdefault(row["model"], []).append([client, window, rate, pattern,
                                                  shape if pattern else 1.0])
    if not cols:
        raise TraceError(f"{path}: no active client windows")
    out = {}
    for model, rows in cols.items():
        table = np.asarray(rows, dtype=np.float64)
        table = table[np.argsort(table[:, 1], kind="stable")]
        out[model] = ClientWindows(table[:, 0].astype(np.int32), table[:, 1].astype(np.int32),
                                   table[:, 2], table[:, 3].astype(np.int8), table[:, 4])
    return out


@functools.cache
def _shipped_servegen_clients() -> dict[str, ClientWindows]:
    return load_servegen_clients(shipped(SERVEGEN_CLIENTS_FILE))


def load_azure_functions(path: Path | None = None, top: int | None = None) -> np.ndarray:
    """Per-minute invocation counts `[functions, 1440]`, busiest function first."""
    path = path or shipped(FUNCTIONS_FILE)
    rows = []
    for line, row in _rows(path, ("HashFunction", "minute_1", "minute_1440")):
        try:
            rows.append([int(row[f"minute_{m}"]) for m in range(1, 1441)])
        except (TypeError, ValueError, KeyError):  # find the field, for the error
            for m in range(1, 1441):
                _number(path, line, row, f"minute_{m}", int)
    counts = np.asarray(rows, dtype=np.int64)
    counts = counts[np.argsort(-counts.sum(axis=1), kind="stable")]
    return counts[:top] if top else counts


def load_request_file(path: Path) -> RequestFile:
    """A CSV with header `arrival_s,model,input_tokens,output_tokens`."""
    times, models, inputs, outputs, skips = [], [], [], [], _Skips(path)
    for line, row in _rows(path, ("arrival_s", "model", "input_tokens", "output_tokens")):
        t = _number(path, line, row, "arrival_s", float)
        n_in = _number(path, line, row, "input_tokens", int)
        n_out = _number(path, line, row, "output_tokens", int)
        if not row["model"]:
            skips.add(line, "no model")
        elif t < 0:
            skips.add(line, f"arrival_s {t} is negative")
        elif n_in <= 0 or n_out <= 0:
            skips.add(line, f"token counts {n_in}, {n_out} (both must be > 0)")
        else:
            times.append(t)
            models.append(row["model"])
            inputs.append(n_in)
            outputs.append(n_out)
    skips.report(usable=len(times))
    order = np.argsort(times, kind="stable")
    return RequestFile(np.asarray(times)[order], [models[i] for i in order],
                       np.asarray(inputs)[order], np.asarray(outputs)[order], skips.count)


def load_history(path: Path, models: set[str]) -> dict[str, list[tuple[float, float, float]]]:
    """Rows of a history CSV (`model,avg_concurrency,peak_concurrency,rate_rps`, one row per
    window, oldest first) by model, for the live controller's forecasters; errors name the
    file and line."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for line, row in _rows(path, ("model", "avg_concurrency", "peak_concurrency", "rate_rps")):
        if row["model"] not in models:
            raise TraceError(f"{path}:{line}: model {row['model']!r} is not served "
                             f"({', '.join(sorted(models))})")
        values = tuple(_number(path, line, row, k, float)  # finite, or the error names it
                       for k in ("avg_concurrency", "peak_concurrency", "rate_rps"))
        if min(values) < 0:
            raise TraceError(f"{path}:{line}: negative value {min(values)}")
        out.setdefault(row["model"], []).append(values)
    return out


def _number(path: Path, line: int, row: dict, column: str, kind: type[int] | type[float]):
    """A row's numeric field; an error names the file, line, column and text."""
    if column not in row:
        raise TraceError(f"{path}:{line}: no {column} column")
    text = row[column]
    what = "an integer" if kind is int else "a finite number"
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise TraceError(f"{path}:{line}: {column} {text!r} is not {what}") from None
    if not math.isfinite(value):
        raise TraceError(f"{path}:{line}: {column} {text!r} is not {what}")
    return value


def _rows(path: Path, required: tuple[str, ...]):
    """Yield (line number, row dict); errors name the file and line."""
    try:
        handle = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    except OSError as exc:  # closed below, when the generator ends
        raise TraceError(f"{path}: cannot open: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(_text_lines(handle, path))
        try:
            fieldnames = reader.fieldnames
        except (OSError, EOFError, csv.Error) as exc:
            raise TraceError(f"{path}:1: unreadable: {exc}") from None
        missing = [c for c in required if c not in (fieldnames or [])]
        if missing:
            raise TraceError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
        width = len(reader.fieldnames or [])
        for row in _checked(reader, path):
            if None in row or len(row) != width or any(v is None for v in row.values()):
                raise TraceError(f"{path}:{reader.line_num}: expected {width} fields "
                                 f"(truncated or malformed row)")
            yield reader.line_num, row


def _checked(reader: csv.DictReader, path: Path):
    """The reader's rows; a corrupt or truncated (compressed) file names its line."""
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (OSError, EOFError, csv.Error) as exc:
            raise TraceError(f"{path}:{reader.line_num + 1}: unreadable: {exc}") from None
        yield row


def _text_lines(handle, path: Path):
    """The file's lines as text, decoded one by one so that bad bytes name their line (a
    byte-order mark before the header, as spreadsheets write, is dropped)."""
    for number, raw in enumerate(handle, 1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise TraceError(f"{path}:{number}: not UTF-8 text (byte {raw[exc.start]:#04x} at "
                             f"column {exc.start + 1})") from None


class _Skips:
    """The rows of a file left out, counted, with the first one's line and reason."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.first = ""

    def add(self, line: int, why: str) -> None:
        self.count += 1
        if not self.first:
            self.first = f"the first, line {line}: {why}"

    def report(self, usable: int) -> None:
        """Warn of the skipped rows; with no usable row left, raise an error saying why."""
        if not usable:
            why = f"{self.count} rows skipped; {self.first}" if self.count else "no data rows"
            raise TraceError(f"{self.path}: no usable requests ({why})")
        if self.count:
            log.warning("%s: skipped %d unusable rows (%s)", self.path, self.count, self.first)
