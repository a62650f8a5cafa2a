"""Token windows: long passages are cut into windows of the encoder tokenizer's tokens, with overlap.

A window holds at most ``max_tokens`` tokens *including* the special tokens the encoder adds ([CLS]/[SEP] for
MiniLM), so it is never truncated at encoding time; ``n_tokens`` counts the window's text tokens (without them).
Window text is a slice of the original text at token boundaries (offsets from the fast tokenizer), so no text is
re-normalised. Consecutive windows share ``overlap`` tokens.

Gold marking (:func:`gold_windows`): of a gold passage cut into windows, the windows containing an answer span
(compared case-insensitively with whitespace collapsed) stay gold; if no window contains one (free-form answers,
yes/no, a span across a boundary wider than the overlap), every window of the passage stays gold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from uae_ray.data.loaders.common import normalize_ws


def fast_tokenizer(name: str) -> Tokenizer:
    """A private ``tokenizers.Tokenizer`` for ``name`` without truncation or padding.

    A model folder with ``tokenizer.json`` (the embedded MiniLM) is read directly, which skips importing
    transformers (~7 s); anything else goes through the registry's ``AutoTokenizer`` and must be a fast tokenizer.
    """
    from uae_ray.models.registry import load_tokenizer, resolve

    ref = resolve(name)
    path = Path(ref.path) / "tokenizer.json"
    if ref.source != "hub" and ref.gguf_file is None and path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        backend = getattr(load_tokenizer(name), "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{name}: windowing needs a fast tokenizer (one with offsets)")
        tok = Tokenizer.from_str(backend.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


@dataclass(frozen=True)
class Window:
    """One window of a passage: its text (a slice of the passage) and its number of text tokens."""

    text: str
    n_tokens: int


class Windower:
    """Cut texts into windows of at most ``max_tokens`` tokens (special tokens included) with ``overlap``.

    Args:
        tokenizer_name: registry name / path of the encoder whose tokenizer counts tokens.
        max_tokens: window size in tokens, including the encoder's special tokens.
        overlap: tokens shared by consecutive windows; must leave a stride of at least 1.
    """

    def __init__(self, tokenizer_name: str, max_tokens: int, overlap: int) -> None:
        self.tokenizer = fast_tokenizer(tokenizer_name)
        post = self.tokenizer.post_processor
        self.size = max_tokens - (post.num_special_tokens_to_add(False) if post is not None else 0)
        self.overlap = overlap
        if self.size - overlap < 1:
            raise ValueError(f"window_overlap {overlap} leaves no stride in windows of {self.size} text tokens")

    def split(self, texts: list[str]) -> list[list[Window]]:
        """Windows of each text (one batch call to the fast tokenizer).

        Args:
            texts: n passages.

        Returns:
            n lists of windows; a text of at most ``size`` tokens is one window with the whole (unchanged) text.
        """
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        out: list[list[Window]] = []
        stride = self.size - self.overlap
        for text, enc in zip(texts, encodings, strict=True):
            offsets = enc.offsets
            n = len(offsets)
            if n <= self.size:
                out.append([Window(text, n)])
                continue
            windows = []
            start = 0
            while True:
                end = min(start + self.size, n)
                windows.append(Window(text[offsets[start][0] : offsets[end - 1][1]], end - start))
                if end == n:
                    break
                start += stride
            out.append(windows)
        return out


def _norm(text: str) -> str:
    return normalize_ws(text).casefold()


def gold_windows(windows: list[str], match_texts: tuple[str, ...] | list[str]) -> tuple[list[int], bool]:
    """Indices of the windows that stay gold, and whether that was the all-windows fallback.

    Args:
        windows: texts of the windows of one gold passage.
        match_texts: answer spans to look for.
    """
    if len(windows) == 1:
        return [0], False
    needles = [_norm(t) for t in match_texts if t.strip()]
    hits = [i for i, w in enumerate(windows) if any(n in _norm(w) for n in needles)] if needles else []
    if hits:
        return hits, False
    return list(range(len(windows))), True
