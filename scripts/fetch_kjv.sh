#!/usr/bin/env bash
# Fetches the corpus of the embedded default model: the King James Bible (public domain),
# from Debian's bible-kjv-text (data) and bible-kjv (its reader), without installing them.
# Writes one UTF-8 text file per book into DEST (default data/kjv), verse numbers removed.
set -euo pipefail
DEST=${1:-data/kjv}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download bible-kjv-text bible-kjv >"$work/apt.log" 2>&1); then
  echo "fetch_kjv: apt-get download bible-kjv-text bible-kjv failed (run apt-get update first?):" >&2
  tail -n 3 "$work/apt.log" >&2
  exit 1
fi
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/root"; done
"$work/root/usr/bin/bible" -f -p "$work/root/usr/lib" "gen1:1-rev22:21" > "$work/kjv.txt"
# Written beside DEST and renamed into place, so a failed fetch leaves no partial corpus.
mkdir -p "$(dirname "$DEST")"
staging=$(mktemp -d "$(dirname "$DEST")/.kjv.XXXXXX")
python3 - "$work/kjv.txt" "$staging" <<'PY'
import re, sys
from pathlib import Path
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
books: dict[str, list[str]] = {}
chapter = {}
for line in src.read_text(encoding="utf-8").splitlines():
    m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
    if not m:
        continue
    book, ch, text = m.group(1), m.group(2), m.group(4)
    verses = books.setdefault(book, [])
    if chapter.get(book) != ch and verses:
        verses.append("")  # a blank line between chapters
    chapter[book] = ch
    verses.append(text)
for i, (book, verses) in enumerate(books.items(), 1):
    (dest / f"{i:02d}-{book}.txt").write_text("\n".join(verses) + "\n", encoding="utf-8")
if len(books) != 66:
    sys.exit(f"fetch_kjv: expected 66 books, got {len(books)}")
print(f"{len(books)} books, {sum(len(v) for v in books.values())} lines")
PY
rm -rf "$DEST"
mv "$staging" "$DEST"
echo "-> $DEST"
