"""Build the shipped `servegen_clients.csv.gz` from ServeGen's per-client window files.

Usage: python scripts/ship_servegen_clients.py SERVEGEN_DATA_DIR OUT_FILE

SERVEGEN_DATA_DIR is ServeGen's `data/` folder: it holds
`language/<model>/chunk-<client>-trace.csv`, rows `window_start_s,rate,cv,pattern,p1,p2` without
a header. Only windows in which a client is
active (rate > 0) are kept; floats keep 6 significant digits.
"""

from __future__ import annotations

import csv
import gzip
import re
import sys
from pathlib import Path

MODELS = ("m-large", "m-mid", "m-small")
HEADER = ("model", "client", "window_start_s", "rate", "cv", "pattern", "p1", "p2")


def main(data_dir: Path, out: Path) -> None:
    rows = 0
    with gzip.open(out, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for model in MODELS:
            files = sorted((data_dir / "language" / model).glob("chunk-*-trace.csv"),
                           key=lambda p: int(re.findall(r"\d+", p.name)[0]))
            for path in files:
                client = int(re.findall(r"\d+", path.name)[0])
                with open(path, newline="") as src:
                    for line, row in enumerate(csv.reader(src), 1):
                        if len(row) != 6:
                            raise SystemExit(f"{path}:{line}: expected 6 fields, got {len(row)}")
                        start, rate, cv, pattern, p1, p2 = row
                        if float(rate) <= 0:
                            continue
                        writer.writerow((model, client, int(float(start)), f"{float(rate):.6g}",
                                         f"{float(cv):.6g}", pattern or "Exponential",
                                         f"{float(p1):.6g}", f"{float(p2):.6g}"))
                        rows += 1
    print(f"{out}: {rows} active client windows")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
