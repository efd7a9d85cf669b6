"""Token ids in, text out, cut at the request's stop strings (OpenAI's `stop`).

    TextStream(tokenizer, stop)   add(token) -> the text it adds (maybe ""), flush() -> what is left
                                  .stopped: a stop string was reached

The stop string and everything after it are never sent. Text that could be the beginning of a stop string
is held back until the next token settles it (sent if the stop string does not follow), so a client never
sees half a stop string. Without stop strings this is the detokenizer alone.
"""

from __future__ import annotations

from router.tokenizer import Detokenizer, TextTokenizer


class TextStream:
    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...] = ()) -> None:
        self._detok = Detokenizer(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def add(self, token: int) -> str:
        delta = self._detok.add(token)
        if self.stopped:
            return ""
        return self._cut(self._held + delta) if self._stop else delta

    def flush(self) -> str:
        if self.stopped:
            return ""
        tail = self._detok.flush()
        if not self._stop:
            return tail
        out = self._cut(self._held + tail)
        if not self.stopped:  # the end of the text: nothing can complete a held prefix any more
            out, self._held = out + self._held, ""
        return out

    def _cut(self, text: str) -> str:
        hits = [i for s in self._stop if (i := text.find(s)) >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)]
        keep = self._longest_partial(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def _longest_partial(self, text: str) -> int:
        """The length of the longest end of `text` that a stop string begins with (0: none)."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
