"""BM25 retrieval over a list of passages (``bm25s``).

    retriever = BM25Retriever(passages)
    retriever.search("Bet365 founder", k=3)   # -> [Passage(title=..., text=...), ...]

The index is built once and only read afterwards, so one retriever serves
many threads at once (Evaluate runs a program from many threads). Programs
hold the retriever as an attribute; it is marked ``_tandem_share`` so that
``Module.deepcopy`` (every optimizer candidate) shares it instead of copying
the index.

``bm25s`` is imported when the first retriever is built, so that
``import tandem`` stays light.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from tandem.quiet import quiet_library

if TYPE_CHECKING:
    import numpy as np

__all__ = ["BM25Retriever", "Passage", "tokenize"]


@dataclass(frozen=True)
class Passage:
    """One retrievable paragraph. ``text`` is what a program shows the model."""

    title: str
    text: str

    def __str__(self) -> str:
        return self.text


_TOKEN = re.compile(r"\w\w+")  # bm25s's default: words of two characters or more
_STOPWORDS: frozenset[str] | None = None
_stopwords_lock = threading.Lock()


def _stopwords() -> frozenset[str]:
    global _STOPWORDS
    with _stopwords_lock:
        if _STOPWORDS is None:
            from bm25s.stopwords import STOPWORDS_EN

            _STOPWORDS = frozenset(STOPWORDS_EN)
    return _STOPWORDS


def tokenize(text: str) -> list[str]:
    """Lowercased words without English stopwords or accents ("Beyoncé" matches "beyonce").

    One function for documents and queries: a query word must be spelled the
    way the index spelled it. Pure, so concurrent searches need no lock.
    """
    folded = text.lower()
    if not folded.isascii():
        folded = unicodedata.normalize("NFKD", folded)
        folded = "".join(c for c in folded if not unicodedata.combining(c))
    stop = _stopwords()
    return [t for t in _TOKEN.findall(folded) if t not in stop]


class BM25Retriever:
    """BM25 (Lucene variant, k1=1.5, b=0.75: bm25s's defaults) over ``passages``."""

    _tandem_share = True  # Module.deepcopy shares this object instead of copying the index

    def __init__(self, passages: Iterable[Passage], *, k1: float = 1.5, b: float = 0.75) -> None:
        try:
            import bm25s
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                "BM25 retrieval needs bm25s: pip install 'tandem[tasks]' (or pip install bm25s)"
            ) from exc
        import numpy as np

        quiet_library("bm25s")  # bm25s sets its logger to DEBUG when imported

        self._np = np
        self.passages: list[Passage] = list(passages)
        if not self.passages:
            raise ValueError("BM25Retriever needs at least one passage")
        tokens = [tokenize(p.text) for p in self.passages]
        # bm25s indexes an empty document fine, but an empty corpus vocabulary is an error.
        if not any(tokens):
            raise ValueError("no passage has any indexable word")
        self._index = bm25s.BM25(k1=k1, b=b, backend="numpy")
        self._index.index(tokens, show_progress=False)

    def __len__(self) -> int:
        return len(self.passages)

    def scores(self, query: str) -> "np.ndarray":
        """BM25 score of every passage for ``query`` (a new array; zeros if no word matches)."""
        ids = self._index.get_tokens_ids(tokenize(query))
        if not ids:
            return self._np.zeros(len(self.passages), dtype=self._np.float32)
        # get_scores_from_ids only reads the index and returns a fresh array:
        # safe to call from many threads without a lock.
        return self._index.get_scores_from_ids(ids)

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The ``k`` best passages for ``query``, best first (ties: corpus order).

        Returns ``min(k, len(self))`` passages; when no query word is in the
        corpus every score is zero and the first passages come back.
        """
        if k <= 0:
            return []
        scores = self.scores(query)
        k = min(k, len(scores))
        # Sorting by (-score, index) makes ties deterministic across runs and threads.
        if k < len(scores):
            top = self._np.argpartition(-scores, k - 1)[:k]
            # argpartition may pick any of the passages tied at the k-th score;
            # take all of them and let the stable sort keep corpus order.
            cutoff = scores[top].min()
            top = self._np.flatnonzero(scores >= cutoff)
        else:
            top = self._np.arange(len(scores))
        order = sorted(top.tolist(), key=lambda i: (-float(scores[i]), i))[:k]
        return [self.passages[i] for i in order]

    def search_many(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        return [self.search(q, k) for q in queries]

    def __repr__(self) -> str:
        return f"BM25Retriever({len(self.passages)} passages)"

    # Copies share the index: it is large and never changes after construction.
    def __deepcopy__(self, memo: dict) -> "BM25Retriever":
        return self

    def __copy__(self) -> "BM25Retriever":
        return self
