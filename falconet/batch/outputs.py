"""The job's output files, written only from rows the ledger has committed.

Rows go out in seq (admission) order: a done row as a line of the results file, a
rejected one as a line of the rejects file, each line the exact text the ledger holds.
After each append both files are fsynced and the ledger records how far they reach
(`Emitted`: the last seq out, each file's size). A process killed between the append
and that record leaves lines the ledger does not count yet; on the next start
`OutputFiles` reads each file past its recorded size and matches what is there against
the lines the next rows would add: whole lines that match are kept (and not written
again), a torn last line is cut off. Anything else there is not falconet's: a BatchError,
and nothing is cut.
"""

from __future__ import annotations

import os
from pathlib import Path

from falconet.batch.ledger import Emitted, Ledger
from falconet.durable import fsync_dir
from falconet.errors import BatchError

FLUSH_ROWS = 1024  # rows per append; a killed append leaves at most this many per file


class OutputFiles:
    """The results and rejects files of one job (sink names "results" and "rejects")."""

    def __init__(self, ledger: Ledger, results: Path, rejects: Path) -> None:
        self.ledger = ledger
        self.paths = {"results": Path(results), "rejects": Path(rejects)}
        for path in self.paths.values():  # a PostgreSQL ledger makes no folder beside them
            path.parent.mkdir(parents=True, exist_ok=True)
        self._state = ledger.emitted()
        # Lines of the next rows that an interrupted append had already written, per sink.
        self._present = {name: self._recover(name) for name in self.paths}
        self.paths["results"].touch()  # an empty results file from the start

    def _recover(self, name: str) -> int:
        path = self.paths[name]
        recorded = self._state.sizes.get(name, 0)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < recorded:
            raise BatchError(
                f"{path} holds {size} bytes but the ledger recorded {recorded} written: "
                "it was changed outside falconet; restore it, or start the job afresh with "
                "a new --out"
            )
        if size == recorded:
            return 0
        with path.open("rb") as f:
            f.seek(recorded)
            tail = f.read()
        expected = [
            row.line.encode("utf-8") + b"\n"
            for row in self.ledger.finished(self._state.seq, FLUSH_ROWS)
            if _sink(row.state) == name
        ]
        kept = matched = 0
        pieces = tail.split(b"\n")  # only newlines: a JSON line holds no raw newline
        for i, piece in enumerate(pieces):
            line = piece + b"\n" if i < len(pieces) - 1 else piece
            want = expected[matched] if matched < len(expected) else b""
            if line and line == want:
                kept += len(line)
                matched += 1
            elif line and not (i == len(pieces) - 1 and want.startswith(line)):
                raise BatchError(
                    f"{path} has a line at byte {recorded + kept} that this job did not "
                    "write; restore the file, or start the job afresh with a new --out"
                )
        if kept < len(tail):  # a torn last line: the append it came from is redone
            with path.open("rb+") as f:
                f.truncate(recorded + kept)
                os.fsync(f.fileno())
        return matched

    def flush(self) -> int:
        """Append the finished rows not yet out; returns how many rows went out."""
        total = 0
        while rows := self.ledger.finished(self._state.seq, FLUSH_ROWS):
            lines: dict[str, list[bytes]] = {name: [] for name in self.paths}
            for row in rows:
                lines[_sink(row.state)].append(row.line.encode("utf-8") + b"\n")
            sizes = dict(self._state.sizes)
            for name, chunk in lines.items():
                chunk = chunk[self._present[name] :]
                if chunk:
                    sizes[name] = self._append(self.paths[name], b"".join(chunk))
                elif self._present[name]:  # all its lines were there already
                    sizes[name] = self.paths[name].stat().st_size
            self._present = dict.fromkeys(self.paths, 0)
            self._state = Emitted(rows[-1].seq, sizes)
            self.ledger.mark_emitted(self._state)
            total += len(rows)
        return total

    @staticmethod
    def _append(path: Path, data: bytes) -> int:
        """Append `data` durably; returns the file's new size."""
        new = not path.exists()
        with path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        if new:
            fsync_dir(path.parent.resolve())
        return size


def _sink(state: str) -> str:
    return "results" if state == "done" else "rejects"
