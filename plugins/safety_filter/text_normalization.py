"""Undo the usual ways of disguising words before a safety filter matches them.

`normalize(text)` gives one canonical ASCII-lowercase string (the form terms and exemplars are
compared in); `normalized_tokens(text)` gives the same words with what the matcher needs to
know about each (its alternative leetspeak readings, whether it was reassembled from letters
split by spaces or punctuation). The steps, in order:

    1. remove_invisible   zero-width characters, soft hyphens, bidi controls, variation selectors
    2. NFKC + casefold    fullwidth, mathematical alphanumerics, ligatures, circled letters
    3. fold_confusables   Cyrillic/Greek/small-capital look-alikes to Latin, per word; a word
                          that cannot be a look-alike (real Cyrillic or Greek) is transliterated
    4. to_ascii           accents stripped, ß→ss, æ→ae, ø→o, ł→l, ...
    5. unleet             0→o 1→i 3→e 4→a 5→s 7→t @→a $→s ... inside words (not in "4k", "mp4")
    6. join_split_letters "k i l l", "k.i.l.l", "k-i-l-l" → "kill"
    7. squeeze_repeats    "kiiiill" → "kiill" (runs of three or more letters kept at two;
                          the matcher also compares fully squeezed forms)

Every step maps its own output to itself, so normalize(normalize(x)) == normalize(x).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# --- 1. invisible characters ----------------------------------------------------------------

# Format characters (Cf: zero-width space/joiners, soft hyphen, bidi controls, word joiner,
# BOM, tag characters) are dropped by category; these are invisible but in other categories.
_INVISIBLE_EXTRA = {
    0x034F,  # combining grapheme joiner
    0x115F, 0x1160, 0x3164, 0xFFA0,  # Hangul fillers (render blank)
    0x17B4, 0x17B5,  # Khmer inherent vowels (render blank)
    0x180B, 0x180C, 0x180D, 0x180E, 0x180F,  # Mongolian variation selectors / vowel separator
    0x2800,  # braille blank
}


def _is_invisible(ch: str) -> bool:
    cp = ord(ch)
    if cp in _INVISIBLE_EXTRA:
        return True
    if 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:  # variation selectors
        return True
    return unicodedata.category(ch) == "Cf"


def remove_invisible(text: str) -> str:
    """Drop characters that render as nothing, so "k\\u200bill" reads "kill"."""
    return "".join(ch for ch in text if not _is_invisible(ch))


# --- 2. compatibility forms and case ----------------------------------------------------------


def fold_case_and_width(text: str) -> str:
    """NFKC and casefold, repeated to a fixed point (casefold can leave non-NFKC text)."""
    for _ in range(4):
        folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
        if folded == text:
            break
        text = folded
    return text


# --- 3. confusables -----------------------------------------------------------------------------

# Lower-case look-alikes (the text is casefolded first, so upper-case forms arrive lower-cased).
_CONFUSABLE_CYRILLIC = {
    "а": "a", "в": "b", "ԁ": "d", "е": "e", "ё": "e", "һ": "h", "н": "h", "і": "i", "ї": "i",
    "ј": "j", "к": "k", "ӏ": "l", "м": "m", "п": "n", "о": "o", "р": "p", "ԛ": "q", "г": "r",
    "ѕ": "s", "т": "t", "у": "y", "ү": "y", "х": "x", "ԝ": "w", "ѡ": "w", "ь": "b", "с": "c",
    "ѵ": "v", "з": "3", "ә": "e", "ɡ": "g",
}
_CONFUSABLE_GREEK = {
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j", "ζ": "z", "μ": "u",
    "ς": "c", "ϱ": "p", "ϵ": "e", "ɩ": "i",
}
_CONFUSABLE_OTHER = {
    # small capitals and IPA letters that NFKC leaves alone
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j",
    "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s", "ᴛ": "t",
    "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z", "ɑ": "a", "ı": "i", "ȷ": "j", "ɵ": "o",
    "ʋ": "v", "ɒ": "a", "ꞵ": "b", "ɸ": "o", "ǀ": "l", "ⅼ": "l",
    # Armenian / Cherokee letters that pass for Latin
    "օ": "o", "ս": "u", "ց": "g", "հ": "h", "ո": "n", "ք": "p", "ᴦ": "r",
}
# Enclosed letters without a compatibility decomposition: negative circled/squared, regional
# indicator symbols (casefold leaves them alone).
_ENCLOSED = {}
for _start in (0x1F150, 0x1F170, 0x1F1E6):
    for _i in range(26):
        _ENCLOSED[chr(_start + _i)] = chr(ord("a") + _i)

CONFUSABLES: dict[str, str] = {**_CONFUSABLE_CYRILLIC, **_CONFUSABLE_GREEK, **_CONFUSABLE_OTHER, **_ENCLOSED}

# Transliteration of words that really are Cyrillic or Greek (e.g. a name written in Russian).
_TRANSLIT_CYRILLIC = {
    "а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "e", "ж": "zh", "з": "z",
    "и": "i", "й": "y", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r",
    "с": "s", "т": "t", "у": "u", "ф": "f", "х": "kh", "ц": "ts", "ч": "ch", "ш": "sh",
    "щ": "shch", "ъ": "", "ы": "y", "ь": "", "э": "e", "ю": "yu", "я": "ya", "і": "i", "ї": "yi",
    "є": "ye", "ґ": "g", "ў": "u", "ј": "j", "ѕ": "dz", "љ": "lj", "њ": "nj", "ћ": "c", "џ": "dz",
    "ђ": "dj", "һ": "h", "ү": "u", "ө": "o", "ә": "a", "ӏ": "l",
}
_TRANSLIT_GREEK = {
    "α": "a", "β": "v", "γ": "g", "δ": "d", "ε": "e", "ζ": "z", "η": "i", "θ": "th", "ι": "i",
    "κ": "k", "λ": "l", "μ": "m", "ν": "n", "ξ": "x", "ο": "o", "π": "p", "ρ": "r", "σ": "s",
    "ς": "s", "τ": "t", "υ": "y", "φ": "f", "χ": "ch", "ψ": "ps", "ω": "o",
}


def _script(ch: str) -> str:
    if "\u0400" <= ch <= "\u052f" or "\u1c80" <= ch <= "\u1c8f" or "\ua640" <= ch <= "\ua69f":
        return "cyrillic"
    if "\u0370" <= ch <= "\u03ff" or "\u1f00" <= ch <= "\u1fff":
        return "greek"
    if ch.isascii() and ch.isalpha():
        return "latin"
    return "other"


def _strip_marks(ch: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", ch) if not unicodedata.combining(c))


_WORD = re.compile(r"\S+")


def _fold_word(word: str) -> str:
    scripts = {_script(ch) for ch in word if ch.isalpha()}
    foreign = scripts & {"cyrillic", "greek"}
    if not foreign:
        return "".join(CONFUSABLES.get(ch, ch) for ch in word)
    bases = [_strip_marks(ch) for ch in word]  # "ά" -> "α", "й" stays (NFD keeps it apart)
    # A word mixing Latin with Cyrillic/Greek, or spelt only with look-alikes, is disguised Latin.
    if "latin" in scripts or all(
        b in CONFUSABLES or not b.isalpha() or _script(b) not in ("cyrillic", "greek") for b in bases
    ):
        return "".join(CONFUSABLES.get(b, b) if _script(b) in ("cyrillic", "greek") else CONFUSABLES.get(ch, ch)
                       for ch, b in zip(word, bases))
    out = []
    for ch, b in zip(word, bases):
        s = _script(b)
        if s == "cyrillic":
            out.append(_TRANSLIT_CYRILLIC.get(ch, _TRANSLIT_CYRILLIC.get(b, b)))
        elif s == "greek":
            out.append(_TRANSLIT_GREEK.get(b, b))
        else:
            out.append(CONFUSABLES.get(ch, ch))
    return "".join(out)


def fold_confusables(text: str) -> str:
    """Map look-alike letters to the Latin letters they imitate, word by word.

    "kіll" (Cyrillic і) → "kill"; a word that is genuinely Cyrillic or Greek ("путин") is
    transliterated instead ("putin"). Expects casefolded text.
    """
    return _WORD.sub(lambda m: _fold_word(m.group()), text)


# --- 4. transliteration to ASCII --------------------------------------------------------------

_ASCII_SPECIAL = {
    "ß": "ss", "ẞ": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d", "þ": "th",
    "ħ": "h", "ŧ": "t", "ŀ": "l", "ĸ": "k", "ŋ": "n", "ƒ": "f", "ɨ": "i", "ʉ": "u", "ǝ": "e",
    "ə": "e", "ɛ": "e", "ɔ": "o", "ƀ": "b", "ɓ": "b", "ɗ": "d", "ƙ": "k", "ƴ": "y", "ȥ": "z",
}


def _ascii_char(ch: str) -> str:
    if ch.isascii():
        return ch
    if ch in _ASCII_SPECIAL:
        return _ASCII_SPECIAL[ch]
    if unicodedata.category(ch) in ("Mn", "Me"):  # stray combining marks ("zalgo" text)
        return ""
    if ch.isdigit() and unicodedata.decimal(ch, None) is not None:
        return str(unicodedata.decimal(ch))
    stripped = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    if stripped and stripped.isascii():
        return stripped.lower()
    return ch  # a letter of another script (CJK, Arabic, ...) stays as it is


def to_ascii(text: str) -> str:
    """Strip accents and transliterate Latin letters to ASCII ("tötén" → "toten", "ß" → "ss").

    Letters of scripts with no Latin reading are kept unchanged.
    """
    return "".join(_ascii_char(ch) for ch in text)


# --- 5. leetspeak ----------------------------------------------------------------------------

# First reading is the canonical one; "1" and "|" also stand for "l" (kept as an alternative).
LEET = {
    "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "6": "g",
    "@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e", "¢": "c", "£": "l",
}
LEET_ALTERNATIVE = {"1": "l", "|": "l", "!": "l"}
_LEET_SYMBOLS = set(LEET) - set("0123456789")
# Tokens that mix letters and digits for a technical reason, not to disguise a word.
_TECHNICAL = re.compile(
    r"^(\d+(k|d|p|i|fps|px|x|s|ms|m|h|hz|khz|gb|mb|kb|am|pm|th|st|nd|rd|mm|cm|km|kg|yo|yr|yrs|f|c|v|w|mp)"
    r"|(mp|h|x|av|vp|iso|ps|gpt|v)\d+)$"
)


def _leet_word(word: str, table: dict[str, str], *, keep_technical: bool = True) -> str:
    letters = sum(ch.isalpha() for ch in word)
    if letters == 0 or (keep_technical and _TECHNICAL.match(word)):
        return word
    out = []
    for i, ch in enumerate(word):
        if ch in table and (ch.isdigit() or _symbol_inside_word(word, i)):
            out.append(table[ch])
        else:
            out.append(ch)
    return "".join(out)


def _symbol_inside_word(word: str, i: int) -> bool:
    """A leet symbol counts only when a letter or digit follows it ("$hoot", "k!ll", not "stop!")."""
    return i + 1 < len(word) and word[i + 1].isalnum()


def unleet(text: str) -> str:
    """Read leetspeak inside words: "k1ll" → "kill", "$h00t" → "shoot"; "4k", "mp4" stay."""
    return _PIECE.sub(lambda m: _leet_word(m.group(), LEET), text)


def _leet_alternatives(word: str) -> tuple[str, str]:
    """Other readings the matcher also tries: "1" as "l", and technical-looking tokens
    ("53x") read as leetspeak anyway."""
    return (
        _leet_word(word, LEET, keep_technical=False),
        _leet_word(word, {**LEET, **LEET_ALTERNATIVE}, keep_technical=False),
    )


# --- 6. letters split by spaces or punctuation ------------------------------------------------

_SEPARATORS = re.compile(r"[^\w]+|_+")
# A piece is a run of letters, digits and leet symbols: "12-year-old" is three pieces, so the
# digits of "12" are not read as letters; "$h00t" and "k!ll" are one piece each.
_PIECE = re.compile(r"(?:[^\W_]|[" + re.escape("".join(sorted(_LEET_SYMBOLS))) + r"])+")


def _is_single_unit(token: str) -> bool:
    return len(token) == 1 and (token.isalpha() or token in LEET)


def _join_runs(tokens: list[str]) -> list[tuple[str, bool]]:
    """Join runs of 3+ one-character tokens with 2+ letters; returns (token, was_joined)."""
    out: list[tuple[str, bool]] = []
    i = 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and _is_single_unit(tokens[j]):
            j += 1
        run = tokens[i:j]
        if len(run) >= 3 and sum(t.isalpha() for t in run) >= 2:
            out.append(("".join(LEET.get(t, t) for t in run), True))
            i = j
        elif run:
            out.extend((t, False) for t in run)
            i = j
        else:
            out.append((tokens[i], False))
            i += 1
    return out


def join_split_letters(text: str) -> str:
    """Reassemble a word spelt with separators between its letters: "k.i.l.l" → "kill"."""
    return " ".join(t for t, _ in _join_runs(_SEPARATORS.split(text)) if t)


# --- 7. repeated letters ----------------------------------------------------------------------

_RUN3 = re.compile(r"([^\W\d_])\1{2,}")
_RUN2 = re.compile(r"([^\W\d_])\1+")


def squeeze_repeats(text: str) -> str:
    """Cut runs of three or more of one letter to two ("kiiiill" → "kiill"); digits stay."""
    return _RUN3.sub(r"\1\1", text)


def squeeze_all(text: str) -> str:
    """Every run of one letter to a single letter ("kiill" → "kil"): the matcher's skeleton."""
    return _RUN2.sub(r"\1", text)


# --- all together -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    text: str  # canonical form, as in normalize()
    alternatives: tuple[str, ...] = ()  # other leetspeak readings ("1" as "l", "53x" as "sex")
    joined: bool = False  # reassembled from letters split by spaces or punctuation

    @property
    def forms(self) -> tuple[str, ...]:
        """The canonical form first, then the alternative readings."""
        return (self.text, *(a for a in self.alternatives if a != self.text))


def _prepare(text: str) -> str:
    text = remove_invisible(text)
    text = fold_case_and_width(text)
    text = fold_confusables(text)
    return to_ascii(text)


def normalized_tokens(text: str) -> list[Token]:
    """The words of `text` after every normalisation step, with matching hints."""
    prepared = _prepare(text)
    flat: list[tuple[str, tuple[str, ...]]] = []  # (canonical piece, its alternative readings)
    for match in _PIECE.finditer(prepared):
        word = match.group()
        canonical = _SEPARATORS.split(_leet_word(word, LEET))
        readings = [_SEPARATORS.split(a) for a in _leet_alternatives(word)]
        for i, piece in enumerate(canonical):
            alts = tuple(r[i] for r in readings if len(r) == len(canonical))  # same split only
            if piece:
                flat.append((piece, alts))
    # Joining works on the canonical pieces; alternatives survive only for tokens left whole.
    joined = _join_runs([p for p, _ in flat])
    tokens: list[Token] = []
    k = 0
    for tok, was_joined in joined:
        if was_joined:
            k += len(tok)  # a run of len(tok) one-character tokens was consumed
            alternatives: tuple[str, ...] = ()
        else:
            alternatives = flat[k][1]
            k += 1
        squeezed = squeeze_repeats(tok)
        alternatives = tuple(dict.fromkeys(squeeze_repeats(a) for a in alternatives if a and squeeze_repeats(a) != squeezed))
        tokens.append(Token(squeezed, alternatives, was_joined))
    return tokens


def normalize(text: str) -> str:
    """The canonical form of `text`: ASCII lower case, words separated by single spaces."""
    return " ".join(t.text for t in normalized_tokens(text))
