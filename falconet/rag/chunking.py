"""Document text -> overlapping passages of at most `max_tokens` embedder tokens.

A chunk is a span `[start, end)` of `Document.text`, so citations can point back into the
source. Cuts are made at boundaries ranked by strength:

    heading > paragraph (blank line) > sentence > line > word > character

The text is first cut into pieces at every line, sentence, paragraph and heading boundary
(a piece over the limits is cut further at words, then characters), each piece's tokens
are counted once, and chunks are packed greedily from those counts: among the ends that
fill at least half the budget (a quarter for a heading), the strongest boundary wins, the
furthest among equals. Every chunk's tokens are then counted for real, so a tokenizer that
does not add up across pieces can never produce an oversized chunk. The next chunk starts
`overlap_tokens` back, at a sentence boundary when one fits, else at a line, else at a
word; never back across a heading, so a chunk's section is the section its text is about.

Boundaries sit where the next non-space text begins: the whitespace between two passages
ends the earlier chunk. The result depends only on the text and the arguments.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

from falconet.documents import Document

# Boundary strengths.
CHAR, WORD, LINE, SENTENCE, PARAGRAPH, HEADING, END = range(7)

# A chunk's characters are capped too: a WordPiece tokenizer maps any word over 100
# characters to one [UNK] token, so a token budget alone would let a 2 MB line of base64
# through as a single "short" chunk. Real prose runs at 4-6 characters a token.
MAX_CHARS_PER_TOKEN = 16
# Below this share of the budget a chunk is not ended early for a stronger boundary.
MIN_FILL = {HEADING: 0.25}
DEFAULT_MIN_FILL = 0.5
# Oversized pieces are first regrouped into runs of whole words about this many
# characters long (one token count each), and only those still too big go word by word.
WORD_RUN_CHARS = 200

_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n\s*")
_LINE_RE = re.compile(r"\n\s*")
# A sentence ends with . ! ? or an ellipsis, maybe closed by quotes or brackets, then
# whitespace; CJK full stops need no space after them.
_SENTENCE_RE = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f]\s*")
_WORD_RE = re.compile(r"\s+")
# The title's closing #s and spaces are stripped in Python (`_atx_title`): a lazy title
# followed by optional trailing groups backtracks over every run of spaces, quadratic in
# a long line of them.
_ATX_HEADING_RE = re.compile(r"^ {0,3}(#{1,6})[ \t]+([^ \t\n][^\n]*)$", re.M)
# Setext: a one-line paragraph underlined with === or ---.
_SETEXT_HEADING_RE = re.compile(r"^ {0,3}([^\s#>|-][^\n]*)\n {0,3}(?:=+|-+)[ \t]*$", re.M)
_FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})([^\n]*)$", re.M)  # fence, info string
_FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\n.*?\n---[ \t]*\n", re.S)  # YAML metadata


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int  # char offsets of the chunk in Document.text: text == doc.text[start:end]
    end: int
    section: str | None  # the nearest preceding Markdown heading / HTML h1-h6 text, if any
    page: int | None  # PDFs: 1-based page of `start`


# budget(chunks made, tokens counted): called as chunking goes; it raises to stop it.
Budget = Callable[[int, int], None]


def chunk_document(
    doc: Document,
    count_tokens: Callable[[str], int],
    max_tokens: int = 200,
    overlap_tokens: int = 40,
    budget: Budget | None = None,
) -> list[Chunk]:
    """Cut `doc.text` into chunks covering every character (see the module docstring).

    A whitespace-only document has no chunks. `budget` is called with the tokens counted
    so far while the text is cut into pieces, then with the chunks made so far; whatever
    it raises stops the chunking (ingestion's per-document limits)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"overlap_tokens must be in [0, max_tokens), got {overlap_tokens}")
    text = doc.text
    if not text.strip():
        return []
    headings = sorted(markdown_headings(text) if doc.headings is None else doc.headings)
    chunker = _Chunker(text, count_tokens, max_tokens, overlap_tokens, headings, budget)
    spans = chunker.spans()
    heading_starts = [offset for offset, _ in headings]
    chunks = []
    for start, end in spans:
        h = bisect.bisect_right(heading_starts, start) - 1
        page = bisect.bisect_right(doc.pages, start) if doc.pages else None
        section = headings[h][1] if h >= 0 else None
        chunks.append(Chunk(text[start:end], start, end, section, page))
    return chunks


def markdown_headings(text: str) -> tuple[tuple[int, str], ...]:
    """ATX ('## Title') and setext ('Title' over '=====') headings outside fenced code
    blocks and YAML front matter, as (offset, title) in text order."""
    front = _FRONT_MATTER_RE.match(text)
    fences = [(0, front.end())] if front else []  # [start, end) of each skipped block
    opened = None
    for m in _FENCE_RE.finditer(text, front.end() if front else 0):
        if opened is None:
            opened = m
        elif (
            m.group(1)[0] == opened.group(1)[0]
            and len(m.group(1)) >= len(opened.group(1))
            and not m.group(2).strip()  # a closing fence has no info string
        ):
            fences.append((opened.start(), m.end()))
            opened = None
    if opened is not None:  # an unclosed fence runs to the end, as in CommonMark
        fences.append((opened.start(), len(text)))
    fence_starts = [s for s, _ in fences]

    def in_fence(offset: int) -> bool:
        i = bisect.bisect_right(fence_starts, offset) - 1
        return i >= 0 and offset < fences[i][1]

    found = {m.start(): _atx_title(m.group(2)) for m in _ATX_HEADING_RE.finditer(text)}
    for m in _SETEXT_HEADING_RE.finditer(text):
        if m.start() == 0 or text.endswith("\n\n", 0, m.start()):  # a one-line paragraph
            found.setdefault(m.start(), m.group(1).strip())
    return tuple((o, title) for o, title in sorted(found.items()) if not in_fence(o))


def _atx_title(line: str) -> str:
    """An ATX heading's text without its optional closing sequence (" ##")."""
    title = line.rstrip(" \t")
    opened = title.rstrip("#")
    if opened != title and opened[-1:] in (" ", "\t"):
        title = opened
    return title.strip()


class _Chunker:
    def __init__(self, text, count_tokens, max_tokens, overlap_tokens, headings, budget):
        self.text = text
        self.budget = budget
        self.total_tokens = 0
        self.count = count_tokens
        self.max_tokens = max_tokens
        self.max_chars = max_tokens * MAX_CHARS_PER_TOKEN
        self.overlap = overlap_tokens
        self.heading_offsets = sorted(o for o, _ in headings if 0 < o < len(text))
        self.heading_set = set(self.heading_offsets)
        self._build_pieces()

    # ------------------------------------------------------------------ pieces

    def _build_pieces(self) -> None:
        """bounds[k]..bounds[k+1] is piece k, with tokens[k]; levels[k] is the strength of
        the boundary at bounds[k] (bounds[0] == 0, bounds[-1] == len(text))."""
        text, n = self.text, len(self.text)
        strength: dict[int, int] = {}

        def mark(offset: int, level: int) -> None:
            if 0 < offset < n and strength.get(offset, -1) < level:
                strength[offset] = level

        for m in _LINE_RE.finditer(text):
            mark(m.end(), LINE)
        for m in _SENTENCE_RE.finditer(text):
            mark(m.end(), SENTENCE)
        for m in _PARAGRAPH_RE.finditer(text):
            mark(m.end(), PARAGRAPH)
        for offset in self.heading_offsets:
            mark(offset, HEADING)
        coarse = sorted(strength)
        self.bounds, self.levels, self.tokens = [0], [END], []
        for a, b in itertools.pairwise([0, *coarse, n]):
            self._add_piece(a, b, strength.get(b, END))

    def _fits(self, a: int, b: int) -> tuple[bool, int]:
        if b - a > self.max_chars:
            return False, 0
        tokens = self.count(self.text[a:b])
        return tokens <= self.max_tokens, tokens

    def _push(self, b: int, level: int, tokens: int) -> None:
        self.tokens.append(tokens)
        self.bounds.append(b)
        self.levels.append(level)
        self.total_tokens += tokens
        if self.budget is not None:
            self.budget(0, self.total_tokens)

    def _add_piece(self, a: int, b: int, end_level: int) -> None:
        """Add text[a:b] as one piece, or cut at words (then characters) if it is too big."""
        ok, tokens = self._fits(a, b)
        if ok:
            self._push(b, end_level, tokens)
            return
        words = [m.end() for m in _WORD_RE.finditer(self.text, a, b) if a < m.end() < b]
        runs, run_start = [], a  # whole words regrouped into runs of ~WORD_RUN_CHARS
        for w in words:
            if w - run_start >= WORD_RUN_CHARS:
                runs.append(w)
                run_start = w
        for ra, rb in itertools.pairwise([a, *runs, b]):
            level = end_level if rb == b else WORD
            ok, tokens = self._fits(ra, rb)
            if ok:
                self._push(rb, level, tokens)
                continue
            inner = words[bisect.bisect_right(words, ra) : bisect.bisect_left(words, rb)]
            for wa, wb in itertools.pairwise([ra, *inner, rb]):
                ok, tokens = self._fits(wa, wb)
                if ok:
                    self._push(wb, end_level if wb == b else WORD, tokens)
                else:
                    self._split_word(wa, wb, end_level if wb == b else WORD)

    def _split_word(self, a: int, b: int, end_level: int) -> None:
        """A single word over the limits: the longest prefixes that fit. Each cut is first
        guessed from the word's characters per token (one count of the whole word), then
        moved to the exact place by galloping and bisection: a few counts of about one
        piece each, where bisecting down from max_chars counted ~35 times the text."""
        chars_per_token = (b - a) / max(1, self.count(self.text[a:b]))
        while a < b:
            hi = min(b, a + self.max_chars)
            guess = min(hi, a + max(1, int(chars_per_token * self.max_tokens)))
            end, tokens = self._longest_fit(a, guess, hi)
            self._push(end, end_level if end == b else CHAR, tokens)
            a = end

    def _longest_fit(self, a: int, guess: int, hi: int) -> tuple[int, int]:
        """The largest end in (a, hi] such that text[a:end] fits, searched from `guess`,
        and its tokens (one character always "fits": nothing smaller exists)."""
        ok, tokens = self._fits(a, guess)
        step = 1
        if ok:  # gallop up to the first end that does not fit (or hi)
            lo, lo_tokens, top = guess, tokens, None
            while lo < hi:
                probe = min(hi, lo + step)
                ok, tokens = self._fits(a, probe)
                if not ok:
                    top = probe
                    break
                lo, lo_tokens = probe, tokens
                step *= 2
            if top is None:
                return lo, lo_tokens
        else:  # gallop down to the last end that fits
            top, lo = guess, None
            while lo is None:
                probe = max(a + 1, top - step)
                ok, tokens = self._fits(a, probe)
                if ok or probe == a + 1:
                    lo, lo_tokens = probe, tokens if ok else self.count(self.text[a:probe])
                else:
                    top = probe
                    step *= 2
        while top - lo > 1:  # text[a:lo] fits, text[a:top] does not
            mid = (lo + top) // 2
            ok, tokens = self._fits(a, mid)
            if ok:
                lo, lo_tokens = mid, tokens
            else:
                top = mid
        return lo, lo_tokens

    # ------------------------------------------------------------------ chunks

    def spans(self) -> list[tuple[int, int]]:
        n = len(self.text)
        prefix = [0]
        for t in self.tokens:
            prefix.append(prefix[-1] + t)
        self.prefix = prefix
        spans: list[tuple[int, int]] = []
        start, done = 0, 0
        while done < n:
            end = self._choose_end(start, done)
            if end is None:  # the overlap leaves no room for new text: start afresh
                start = done
                end = self._choose_end(start, done)
            spans.append((start, end))
            if self.budget is not None:
                self.budget(len(spans), self.total_tokens)
            done = end
            if end < n:
                start = self._overlap_start(start, end)
        return spans

    def _choose_end(self, start: int, done: int) -> int | None:
        """The best end > done for a chunk from `start`, checked with a real count."""
        bounds, prefix = self.bounds, self.prefix
        k = bisect.bisect_right(bounds, start)  # first piece boundary after start
        if bounds[k - 1] == start:
            head = 0
            base = prefix[k - 1]
        else:  # start inside piece k-1 (an overlap cut at a word)
            head = self.count(self.text[start : bounds[k]])
            base = prefix[k]
        candidates = []  # (estimated tokens, offset, level)
        for j in range(k, len(bounds)):
            b = bounds[j]
            est = head + prefix[j] - base
            if est > self.max_tokens or b - start > self.max_chars:
                break
            if b > done:
                candidates.append((est, b, self.levels[j]))
        if not candidates:
            return None

        def preference(c: tuple[int, int, int]) -> tuple[int, int]:
            est, b, level = c
            fill = MIN_FILL.get(level, DEFAULT_MIN_FILL) * self.max_tokens
            return (level if est >= fill else -1, b)

        for _, b, _ in sorted(candidates, key=preference, reverse=True):
            if self.count(self.text[start:b]) <= self.max_tokens:
                return b
        return None

    def _overlap_start(self, start: int, end: int) -> int:
        """Where the chunk after [start, end) begins: `overlap` tokens back, not crossing
        a heading, preferring a sentence boundary, else a word boundary."""
        if self.overlap == 0:
            return end
        h = bisect.bisect_right(self.heading_offsets, end) - 1
        floor = max(start + 1, self.heading_offsets[h] if h >= 0 else 0)
        if floor >= end:
            return end
        # Sentence-or-stronger piece boundaries, then line starts (list items), earliest
        # (longest overlap) first.
        lo = bisect.bisect_left(self.bounds, floor)
        hi = bisect.bisect_left(self.bounds, end)
        for min_level in (SENTENCE, LINE):
            for j in range(lo, hi):
                if self.levels[j] >= min_level and self.prefix[hi] - self.prefix[j] <= self.overlap:
                    b = self.bounds[j]
                    if self.count(self.text[b:end]) <= self.overlap:
                        return b
        # Else the longest word-aligned suffix that fits (suffix counts shrink as the
        # cut moves right, so bisect over the word starts).
        window = max(floor, end - self.overlap * MAX_CHARS_PER_TOKEN)
        words = [m.end() for m in _WORD_RE.finditer(self.text, window, end) if m.end() < end]
        if window in self.heading_set or (
            self.text[window - 1].isspace() and not self.text[window].isspace()
        ):
            words.insert(0, window)  # the window itself starts a word
        lo_i, hi_i = 0, len(words)
        while lo_i < hi_i:
            mid = (lo_i + hi_i) // 2
            if self.count(self.text[words[mid] : end]) <= self.overlap:
                hi_i = mid
            else:
                lo_i = mid + 1
        return words[lo_i] if lo_i < len(words) else end
