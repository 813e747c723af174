"""TextBlob's pattern sentiment, the same scores with less work per caption (issue 16).

TextBlob's analyzer tokenizes the whole caption with regular expressions, then walks the tokens building a dict
per assessment and looking each word up in its lexicon several times. Here:
- a caption is tokenized a whitespace-separated chunk at a time, each distinct chunk once (cached): captions
  share most of their words;
- each distinct word is looked up once (cached): known or not, its (polarity, subjectivity, intensity), whether
  it modifies the next word, is a negation, an emoticon;
- the walk over the tokens is TextBlob's own rules (textblob/_text.py Sentiment.assessments), on tuples.

Chunk-wise tokenizing equals TextBlob's whole-caption tokenizing unless something crosses chunks: a paragraph
break (it becomes an end-of-sentence token), the literal end-of-sentence marker, or an emoticon or sarcasm mark
"( ! )" that TextBlob's tokenizer joins across spaces. Such a caption is scored by TextBlob's analyzer itself;
tests/test_enrich.py checks both against TextBlob on many captions.

A caption with none of the characters an emoticon, a sarcasm mark or the end-of-sentence marker needs (most
captions: _ANCHORS) cannot contain any of them, so the search for them is skipped and each distinct chunk's
word facts are cached whole (its tokens are not joined, lowercased and looked up again caption by caption).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_CACHE_LIMIT = 50_000  # distinct chunks / words kept (each: about 200 bytes); cleared when full (memory stays flat)
# Every emoticon of TextBlob's holds one of these characters, or an 8 before ")" or "-" (checked in __init__); the
# sarcasm mark holds "(", the end-of-sentence marker "D" and "O".
_ANCHORS = re.compile(r"[:;=<>*\u2665\u00b0(OD\n]|8\s*[)\-]")


class FastSentiment:
    """(polarity, subjectivity) of a cleaned caption, exactly as TextBlob's English analyzer gives them."""

    def __init__(self, analyzer: Any, text_module: Any):
        self.analyzer = analyzer  # etl.enrich.english_sentiment(): the lexicon, and the fallback
        self.find_tokens: Callable[[str], list[str]] = analyzer.tokenizer
        self.emoticons = text_module.RE_EMOTICONS
        self.sarcasm = text_module.RE_SARCASM
        self.eos = text_module.EOS
        self.punctuation = text_module.PUNCTUATION
        self.emoticon_table = [(p, {e.lower() for e in e_set}) for (_, p), e_set in text_module.EMOTICONS.items()]
        self.negations = analyzer.negations
        self.modifiers = analyzer.modifiers
        self._chunks: dict[str, tuple[str, ...]] = {}
        self._words: dict[str, tuple] = {}
        self._plain: dict[str, tuple[tuple, ...]] = {}  # chunk -> the facts of its words (captions without anchors)
        if not dict.__len__(analyzer):
            analyzer.load()
        faces = [face for e_set in text_module.EMOTICONS.values() for face in e_set]
        # The shortcut holds only while every mark it skips needs an anchor (a later TextBlob could add others).
        self.anchors = _ANCHORS if all(_ANCHORS.search(face) for face in (*faces, self.eos, "(!)")) else None
        # A number's facts depend only on its length, unless the lexicon knows numbers.
        self._numbers = None
        if not any(word.isdigit() for word in dict.keys(analyzer)) and not any(w.isdigit() for w in self.negations):
            self._numbers = ((self._word("0"),), (self._word("00"),), (self._word("000"),))

    def _chunk_tokens(self, chunk: str) -> tuple[str, ...]:
        tokens = self._chunks.get(chunk)
        if tokens is None:
            if chunk.isascii() and chunk.isalnum():
                # Letters and digits only: TextBlob's tokenizer has nothing to split (no punctuation, quote or
                # contraction). Not cached: such chunks are often one-offs (numbers, ids) that would fill it.
                return (chunk,)
            tokens = tuple(" ".join(self.find_tokens(chunk)).split())
            if len(self._chunks) >= _CACHE_LIMIT:
                self._chunks.clear()
            self._chunks[chunk] = tokens
        return tokens

    def _word(self, w: str) -> tuple:
        """What the walk needs of a (lowercased) word: (inert, known, p, s, i, modifies, negation, len>2, strip>1,
        emoticon polarity or None, ends in "ly", is "!", is "(!)"); inert: unknown and acting on nothing (such a
        word matters only after a modifier or a negation)."""
        info = self._words.get(w)
        if info is None:
            entry = dict.get(self.analyzer, w)
            if entry is not None and None in entry:
                p, s, i = entry[None]
                modifies = any(m in entry for m in self.modifiers)
            else:
                entry, p, s, i, modifies = None, 0.0, 0.0, 1.0, False
            emoticon = None
            if w.isalpha() is False and len(w) <= 5 and w not in self.punctuation:
                for polarity, faces in self.emoticon_table:
                    if w in faces:
                        emoticon = polarity
                        break
            negation, bang, sarcasm = w in self.negations, w == "!", w == "(!)"
            inert = entry is None and not (negation or bang or sarcasm) and emoticon is None
            info = (
                inert, entry is not None, p, s, i, modifies, negation, len(w) > 2, len(w.strip("'")) > 1, emoticon,
                w.endswith("ly"), bang, sarcasm,
            )  # fmt: skip
            if w.isdigit():
                return info  # numbers are mostly one-offs: not kept
            if len(self._words) >= _CACHE_LIMIT:
                self._words.clear()
            self._words[w] = info
        return info

    def tokens(self, text: str) -> list[str] | None:
        """TextBlob's lowercased tokens of the caption, or None when only its own tokenizer gives them."""
        if "\n" in text:
            if "\n\n" in text.replace("\r\n", "\n"):
                return None
        if self.eos in text:
            return None
        tokens: list[str] = []
        cached = self._chunks.get  # _chunk_tokens() inlined for the usual chunks: a call per chunk costs more
        for chunk in text.split():
            found = cached(chunk)
            if found is not None:
                tokens.extend(found)
            elif chunk.isascii() and chunk.isalnum():
                tokens.append(chunk)
            else:
                tokens.extend(self._chunk_tokens(chunk))
        joined = " ".join(tokens)
        # A match anywhere in the joined tokens is the only way TextBlob's per-sentence substitutions can differ.
        if ("(" in joined and self.sarcasm.search(joined)) or self.emoticons.search(joined):
            return None
        return [t.lower() for t in tokens]

    def _facts(self, text: str) -> list[tuple] | None:
        """The facts (_word) of the caption's words in order, or None when it needs tokens() (an anchor in it)."""
        if self.anchors is None or self.anchors.search(text):
            return None
        facts: list[tuple] = []
        cached = self._plain.get
        for chunk in text.split():
            found = cached(chunk)
            facts.extend(found if found is not None else self._chunk_facts(chunk))
        return facts

    def _chunk_facts(self, chunk: str) -> tuple[tuple, ...]:
        if self._numbers is not None and chunk.isdigit() and chunk.isascii():
            return self._numbers[min(len(chunk), 3) - 1]  # one-offs (counts, ids): not kept
        facts = tuple(self._word(w.lower()) for w in self._chunk_tokens(chunk))
        if len(self._plain) >= _CACHE_LIMIT:
            self._plain.clear()
        self._plain[chunk] = facts
        return facts

    def __call__(self, text: str) -> tuple[float, float]:
        facts = self._facts(text)
        if facts is None:
            tokens = self.tokens(text)
            if tokens is None:
                score = self.analyzer(text)
                return score[0], score[1]
            words = self._words.get
            facts = [words(w) or self._word(w) for w in tokens]
        # TextBlob's Sentiment.assessments with pos=None and negation=True: [polarity, subjectivity, intensity, n]
        a: list[list] = []
        m = False  # a preceding modifier
        n = False  # a preceding negation
        m_ly = False  # the preceding modifier ends in "ly"
        for fact in facts:
            if fact[0] and not (m or n):
                continue  # an inert word with no modifier or negation before it: nothing to do
            _, known, p, s, i, modifies, negation, longer2, stripped1, emoticon, ly, bang, sarcasm = fact
            if known:
                if not m:
                    a.append([p, s, i, 1])
                else:
                    last = a[-1]
                    last[0] = max(-1.0, min(p * last[2], +1.0))
                    last[1] = max(-1.0, min(s * last[2], +1.0))
                    last[2] = i
                if n:
                    last = a[-1]
                    last[2] = 1.0 / last[2]
                    last[3] = -1
                m = n = False
                if modifies:
                    m, m_ly = True, ly
                if negation:
                    n = True
            else:
                if negation:
                    n = True
                elif n and stripped1:
                    n = False
                if n and m and m_ly:
                    a[-1][3] = -1
                    n = False
                elif m and longer2:
                    m = False
                if bang and len(a) > 0:
                    a[-1][0] = max(-1.0, min(a[-1][0] * 1.25, +1.0))
                if sarcasm:
                    a.append([0.0, 1.0, 1.0, 1])
                if emoticon is not None:
                    a.append([emoticon, 1.0, 1.0, 1])
        if not a:
            return 0.0, 0.0
        ps = 0
        ss = 0
        for p, s, _, neg in a:
            ps += p * -0.5 if neg < 0 else p
            ss += s
        return ps / float(len(a)), ss / float(len(a))
