"""`policy`: a prompt safety filter driven by data files (terms, patterns, exemplars, allow-list).

A prompt is normalised against obfuscation (text_normalization.py), allow-listed look-alikes
("kill the engine", "photo shoot") are masked, and then three kinds of rule look at what is
left; any hit refuses the prompt:

    terms      words and phrases per category, matched on word boundaries in the normalised
               words (leetspeak readings, stretched letters, letters split by spaces, one typo in
               a long word or two swapped letters in a shorter one, German umlauts as "ae"/"oe"/"ue"
               all count); "*" at the start
               or end of a term matches inside words ("enthaupt*", "*mord"); long terms also match
               in the text with its spaces removed ("de capi tation")
    patterns   regular expressions per category over the normalised text
    semantic   MiniLM sentence embeddings of the prompt (and of each sentence and window of a
               long one) against exemplar prompts per category; a category refuses when its best
               similarity reaches its calibrated threshold and beats the best benign exemplar

Sexual content together with a minor marker ("child", "12 year old", ...; in a long prompt,
in the same sentence) is reported as `sexual_minors`, which is always refused; a deployment may
switch other categories off with `disabled_categories`, never that one (nor any category whose
definition says "always_refused": true).

The policy is the JSON files in a directory (`policy_data/` beside this module by default;
`policy_dir=` replaces it, `extra_policy_dirs=` add to it). Each file is a fragment with any of:

    {"description": "...", "language": "en",
     "categories": {"violence": {"description": "...", "always_refused": false}},
     "terms": {"violence": ["decapitat*", "behead*"]},
     "patterns": {"sexual_minors": ["\\\\b(1[0-7]|[1-9]) year old\\\\b.*\\\\bnude\\\\b"]},
     "exemplars": {"violence": ["a man being decapitated, blood everywhere"]},
     "benign_exemplars": ["a chef cutting bread with a knife"],
     "allow_phrases": ["kill the engine"], "allow_patterns": ["\\\\bphoto shoot\\\\b"],
     "minor_terms": ["child", "schoolgirl"], "minor_patterns": ["\\\\b([1-9]|1[0-7]) ?yo\\\\b"],
     "thresholds": {"violence": 0.55, "public_figures": null}, "calibration": {...},
     "settings": {"fuzzy_min_length": 8, "despaced_min_length": 8, "window_words": 12}}

Lists add up across files and directories; thresholds and settings from later files win.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from skyloom.hookspecs import hookimpl
from skyloom.minilm import embed_sentences
from skyloom.kinds import SafetyDecision, SafetyFilter

from .text_normalization import Token, normalize, normalized_tokens, squeeze_all

DEFAULT_POLICY_DIR = Path(__file__).with_name("policy_data")
ALWAYS_REFUSED = "sexual_minors"

_FRAGMENT_KEYS = {
    "description": str,
    "language": str,
    "categories": dict,
    "terms": dict,
    "patterns": dict,
    "exemplars": dict,
    "benign_exemplars": list,
    "allow_phrases": list,
    "allow_patterns": list,
    "minor_terms": list,
    "minor_patterns": list,
    "thresholds": dict,
    "calibration": dict,
    "settings": dict,
}
_SETTINGS = {
    "fuzzy_min_length": 8,  # terms this long also match with one typo (edit or swap) ...
    "swap_min_length": 5,  # ... terms this long with two neighbouring letters swapped
    "despaced_min_length": 8,  # terms this long also match in the text with spaces removed
    "window_words": 12,  # long sentences are also embedded in windows of this many words ...
    "window_stride": 6,  # ... starting every this many words
    "long_prompt_words": 16,  # prompts longer than this are also embedded sentence by sentence
    "benign_margin": 0.0,  # a semantic hit needs harm similarity > benign similarity + this
}


class PolicyError(ValueError):
    """A policy file is malformed; the message names the file and what is wrong."""


# --- loading ------------------------------------------------------------------------------------


@dataclass
class Policy:
    """Everything the JSON fragments say, merged in load order."""

    categories: dict[str, dict] = field(default_factory=dict)
    terms: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # cat -> [(term, file)]
    patterns: dict[str, list[tuple[re.Pattern, str]]] = field(default_factory=dict)
    exemplars: dict[str, list[str]] = field(default_factory=dict)
    benign_exemplars: list[str] = field(default_factory=list)
    allow_phrases: list[tuple[str, str]] = field(default_factory=list)
    allow_patterns: list[tuple[re.Pattern, str]] = field(default_factory=list)
    minor_terms: list[tuple[str, str]] = field(default_factory=list)
    minor_patterns: list[tuple[re.Pattern, str]] = field(default_factory=list)
    thresholds: dict[str, float | None] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    settings: dict = field(default_factory=lambda: dict(_SETTINGS))
    files: list[str] = field(default_factory=list)


def _fail(path: Path, what: str) -> PolicyError:
    return PolicyError(f"policy file {path}: {what}")


def _string_list(path: Path, where: str, value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(path, f"{where} must be a list of non-empty strings")
    return value


def _compile(path: Path, where: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise _fail(path, f"{where}: invalid regular expression {pattern!r}: {error}") from None


def load_policy(policy_dir: str | os.PathLike | None = None, extra_policy_dirs: Iterable = ()) -> Policy:
    """Merge the fragments of `policy_dir` (default: the built-in policy) and then each extra
    directory, files in name order. Raises PolicyError for a malformed file or a category that
    no fragment defines."""
    dirs = [Path(policy_dir) if policy_dir is not None else DEFAULT_POLICY_DIR]
    dirs += [Path(d) for d in extra_policy_dirs]
    policy = Policy()
    pending: list[tuple[Path, str, str]] = []  # (file, section, category) to check at the end
    for directory in dirs:
        if not directory.is_dir():
            raise PolicyError(f"policy directory {directory} does not exist or is not a directory")
        files = sorted(directory.glob("*.json"))
        if not files:
            raise PolicyError(f"policy directory {directory} has no *.json policy files")
        for path in files:
            _merge(policy, path, pending)
    for path, section, category in pending:
        if category not in policy.categories:
            raise _fail(
                path,
                f"{section} names category {category!r}, which no policy file defines "
                f"(defined: {', '.join(sorted(policy.categories)) or 'none'})",
            )
    if ALWAYS_REFUSED not in policy.categories:
        raise PolicyError(f"the policy must define the category {ALWAYS_REFUSED!r} (it is always refused)")
    return policy


def _merge(policy: Policy, path: Path, pending: list) -> None:
    try:
        fragment = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise _fail(path, f"not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise _fail(path, f"not UTF-8 text: {error}") from None
    if not isinstance(fragment, dict):
        raise _fail(path, f"the top level must be an object, not {type(fragment).__name__}")
    for key, value in fragment.items():
        expected = _FRAGMENT_KEYS.get(key)
        if expected is None:
            raise _fail(path, f"unknown key {key!r}; valid keys: {', '.join(sorted(_FRAGMENT_KEYS))}")
        if not isinstance(value, expected):
            raise _fail(path, f"{key!r} must be a JSON {'object' if expected is dict else expected.__name__}")
    policy.files.append(str(path))

    for name, spec in fragment.get("categories", {}).items():
        if not isinstance(spec, dict):
            raise _fail(path, f"categories[{name!r}] must be an object")
        policy.categories.setdefault(name, {}).update(spec)
    for section in ("terms", "patterns", "exemplars"):
        for category, items in fragment.get(section, {}).items():
            where = f"{section}[{category!r}]"
            _string_list(path, where, items)
            pending.append((path, section, category))
            if section == "terms":
                policy.terms.setdefault(category, []).extend((t, path.name) for t in items)
            elif section == "patterns":
                policy.patterns.setdefault(category, []).extend(
                    (_compile(path, where, p), path.name) for p in items
                )
            else:
                policy.exemplars.setdefault(category, []).extend(items)
    policy.benign_exemplars += _string_list(path, "benign_exemplars", fragment.get("benign_exemplars", []))
    policy.allow_phrases += [(p, path.name) for p in _string_list(path, "allow_phrases", fragment.get("allow_phrases", []))]
    policy.minor_terms += [(p, path.name) for p in _string_list(path, "minor_terms", fragment.get("minor_terms", []))]
    for key, target in (("allow_patterns", policy.allow_patterns), ("minor_patterns", policy.minor_patterns)):
        target += [(_compile(path, key, p), path.name) for p in _string_list(path, key, fragment.get(key, []))]
    for category, value in fragment.get("thresholds", {}).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1):
            raise _fail(path, f"thresholds[{category!r}] must be a number in [-1, 1] or null, not {value!r}")
        pending.append((path, "thresholds", category))
        policy.thresholds[category] = value
    for key, value in fragment.get("settings", {}).items():
        if key not in _SETTINGS:
            raise _fail(path, f"unknown setting {key!r}; valid settings: {', '.join(sorted(_SETTINGS))}")
        if isinstance(value, bool) or not isinstance(value, type(_SETTINGS[key])):
            raise _fail(path, f"setting {key!r} must be a {type(_SETTINGS[key]).__name__}, not {value!r}")
        policy.settings[key] = value
    if "calibration" in fragment:
        policy.calibration = fragment["calibration"]


# --- term matching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    words: tuple[str, ...]  # normalised words
    regexes: tuple[re.Pattern, ...]  # one per word: letters may be stretched, globs applied
    category: str
    label: str  # what a reason line shows: the term as written and its file
    lead: bool  # written "*word": the first word may end another word
    trail: bool  # written "word*": the last word may begin another word
    fuzzy: bool  # one typo allowed (a single word, no "*")


def _stretchable(word: str) -> str:
    """A regex for `word` whose letters may each be repeated: "kill" -> "k+i+l{2,}"."""
    out = []
    for run in re.finditer(r"(.)\1*", word):
        ch, n = run.group(1), len(run.group())
        out.append(re.escape(ch) + ("+" if n == 1 else "{%d,}" % n))
    return "".join(out)


def _umlaut_variants(term: str) -> list[str]:
    variants = [term]
    if re.search("[äöüÄÖÜ]", term):
        spelled = term
        for a, b in (("ä", "ae"), ("ö", "oe"), ("ü", "ue"), ("Ä", "Ae"), ("Ö", "Oe"), ("Ü", "Ue")):
            spelled = spelled.replace(a, b)
        variants.append(spelled)
    return variants


def _compile_term(raw: str, category: str, source: str) -> list[Term]:
    terms = []
    for variant in _umlaut_variants(raw.strip()):
        lead, trail = variant.startswith("*"), variant.endswith("*")
        words = tuple(t.text for t in normalized_tokens(variant.strip("*")))
        if not words:
            continue
        regexes = []
        for i, word in enumerate(words):
            body = _stretchable(word)
            if i == 0 and lead:
                body = r".*" + body
            if i == len(words) - 1 and trail:
                body = body + r".*"
            regexes.append(re.compile(body))
        fuzzy = len(words) == 1 and not (lead or trail)
        terms.append(Term(words, tuple(regexes), category, f"{raw!r} ({source})", lead, trail, fuzzy))
    return terms


def _deletions(word: str) -> set[str]:
    return {word[:i] + word[i + 1:] for i in range(len(word))}


def _within_one_edit(a: str, b: str) -> bool:
    """Damerau-Levenshtein distance <= 1 (one insertion, deletion, substitution or swap)."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    if len(a) > len(b):
        a, b = b, a
    return a in _deletions(b)


class TermIndex:
    """Terms indexed by the squeezed form of their first word, for word-boundary matching."""

    def __init__(self, terms: Sequence[Term], settings: dict):
        self.terms = list(terms)
        self.fuzzy_min = settings["fuzzy_min_length"]
        self.despaced_min = settings["despaced_min_length"]
        self.swap_min = settings["swap_min_length"]
        self.exact: dict[str, list[Term]] = {}
        self.prefix: dict[str, list[Term]] = {}  # first word ends with "*": keyed by its stem
        self.suffix: dict[str, list[Term]] = {}  # first word starts with "*"
        self.infix: dict[str, list[Term]] = {}
        self.fuzzy: dict[str, list[Term]] = {}
        for term in self.terms:
            key = squeeze_all(term.words[0])
            lead, trail = term.lead, term.trail and len(term.words) == 1  # globs of the first word
            table = self.infix if lead and trail else self.suffix if lead else self.prefix if trail else self.exact
            table.setdefault(key, []).append(term)
            if term.fuzzy and len(term.words[0]) >= self.swap_min:
                for k in _deletions(term.words[0]) | {term.words[0]}:
                    self.fuzzy.setdefault(k, []).append(term)
        glued = [(t, "".join(t.words)) for t in self.terms]
        self.despaced = [(t, re.compile(_stretchable(g))) for t, g in glued if len(g) >= self.despaced_min]
        self.joinable = [(t, re.compile(_stretchable(g))) for t, g in glued if len(g) >= 3]
        self.phrase_heads = [(t, re.compile(_stretchable(t.words[0]) + "$")) for t in self.terms if len(t.words) > 1]

    def _candidates(self, token: Token) -> dict[int, Term]:
        found: dict[int, Term] = {}
        for form in token.forms:
            s = squeeze_all(form)
            for term in self.exact.get(s, ()):
                found[id(term)] = term
            for i in range(1, len(s) + 1):
                for term in self.prefix.get(s[:i], ()):
                    found[id(term)] = term
                for term in self.suffix.get(s[-i:], ()):
                    found[id(term)] = term
            if self.infix:
                for i in range(len(s)):
                    for j in range(i + 1, len(s) + 1):
                        for term in self.infix.get(s[i:j], ()):
                            found[id(term)] = term
            if self.fuzzy and len(form) >= self.swap_min - 1:
                for k in _deletions(form) | {form}:
                    for term in self.fuzzy.get(k, ()):
                        found[id(term)] = term
        return found

    def _typo(self, form: str, word: str) -> bool:
        """One typo of a long word (not in its first letter, where "flaying" becomes "playing"),
        or two letters swapped in a shorter one ("merkle")."""
        if form[:1] != word[:1] or form == word:
            return False
        if len(word) >= self.fuzzy_min:
            return _within_one_edit(form, word)
        return len(word) >= self.swap_min and len(form) == len(word) and _within_one_edit(form, word) and sorted(form) == sorted(word)

    @staticmethod
    def _word_matches(regex: re.Pattern, token: Token) -> bool:
        return any(regex.fullmatch(form) for form in token.forms)

    def spans(self, tokens: Sequence[Token], masked: set[int] = frozenset(), *, typos: bool = True):
        """(term, first token, how) for each word-boundary match in the unmasked tokens."""
        for i, token in enumerate(tokens):
            if i in masked:
                continue
            for term in self._candidates(token).values():
                n = len(term.words)
                span = range(i, i + n)
                if i + n > len(tokens) or any(k in masked for k in span):
                    continue
                if all(self._word_matches(rx, tokens[k]) for rx, k in zip(term.regexes, span)):
                    yield term, i, "letters split apart" if token.joined else "word"
                elif typos and term.fuzzy and any(self._typo(form, term.words[0]) for form in token.forms):
                    yield term, i, "one-letter typo"

    def find(self, tokens: Sequence[Token], masked: set[int] = frozenset(), *, typos: bool = True) -> list[tuple[Term, str]]:
        """Every term found in the unmasked tokens, with how it was found."""
        hits: dict[int, tuple[Term, str]] = {}
        for term, _, how in self.spans(tokens, masked, typos=typos):
            hits.setdefault(id(term), (term, how))
        for i, token in enumerate(tokens):
            if token.joined and i not in masked:  # a run of split letters has lost its word boundaries
                for term, regex in self.joinable:
                    if id(term) not in hits and regex.search(token.text):
                        hits[id(term)] = (term, "letters split apart")
                # ... so a phrase may also begin inside it: "a n o o s e around his neck"
                for term, first in self.phrase_heads:
                    n = len(term.words)
                    if id(term) in hits or i + n > len(tokens) or any(k in masked for k in range(i + 1, i + n)):
                        continue
                    if first.search(token.text) and all(
                        self._word_matches(rx, tokens[k]) for rx, k in zip(term.regexes[1:], range(i + 1, i + n))
                    ):
                        hits[id(term)] = (term, "letters split apart")
        if self.despaced:
            # A word broken up by spaces ("de capi tation"): the match must begin and end on
            # word boundaries, so "kinder schiessen" never reads as "erschiessen".
            visible = [t.text for i, t in enumerate(tokens) if i not in masked]
            glued_text = "".join(visible)
            starts, ends, pos = set(), set(), 0
            for word in visible:
                starts.add(pos)
                pos += len(word)
                ends.add(pos)
            for term, regex in self.despaced:  # a "*" end of a term may fall inside a word
                if id(term) not in hits and any(
                    (term.lead or m.start() in starts) and (term.trail or m.end() in ends)
                    for m in regex.finditer(glued_text)
                ):
                    hits[id(term)] = (term, "spaces removed")
        return list(hits.values())


# --- the embedding model (once per process) ----------------------------------------------------

_EMBED_CACHE: dict[tuple[str, str], "object"] = {}


def embed(texts: Sequence[str], *, batch_size: int = 64, model_path=None):
    """(N, 384) float32 unit vectors, one per text, from the default text encoder's model
    (loaded once per process and shared with the `minilm` text encoder)."""
    return embed_sentences(list(texts), path=model_path, batch_size=batch_size).numpy()


def _embed_cached(texts: Sequence[str], model_path=None):
    """Embeddings of policy exemplars, kept for the life of the process."""
    import numpy as np

    key = (str(model_path), "\x00".join(texts))
    if key not in _EMBED_CACHE:
        _EMBED_CACHE[key] = embed(texts, model_path=model_path)
    return np.asarray(_EMBED_CACHE[key])


# --- the filter -----------------------------------------------------------------------------


@dataclass
class _Analysis:
    """What the rules found in one prompt (before the semantic stage)."""

    tokens: list[Token]
    masked: set[int]
    visible: str  # normalised text without the allow-listed spans
    rule_hits: list[tuple[str, str]]  # (category, reason)
    minor: str | None  # reason a minor is involved, if one is
    segments: list[str]  # what the semantic stage embeds: the prompt, its sentences, windows


class PolicyFilter(SafetyFilter):
    """Refuses prompts in the policy's categories; see the module docstring for the rules.

    policy_dir: a directory of policy JSON files replacing the built-in policy.
    extra_policy_dirs: directories whose files extend the policy (loaded after policy_dir).
    semantic: also compare MiniLM embeddings with the exemplars (False: rules only).
    disabled_categories: categories not to refuse (never `sexual_minors`).
    model_path: a sentence-transformers model directory (default: the bundled MiniLM).
    """

    def __init__(
        self,
        policy_dir: str | os.PathLike | None = None,
        extra_policy_dirs: Iterable[str | os.PathLike] = (),
        *,
        semantic: bool = True,
        disabled_categories: Iterable[str] = (),
        model_path: str | os.PathLike | None = None,
        batch_size: int = 64,
    ):
        self.policy = load_policy(policy_dir, extra_policy_dirs)
        self.disabled = set(disabled_categories)
        always = {ALWAYS_REFUSED} | {c for c, spec in self.policy.categories.items() if spec.get("always_refused")}
        if self.disabled & always:
            raise ValueError(
                f"the categories {sorted(self.disabled & always)} are always refused and cannot be disabled"
            )
        unknown = self.disabled - set(self.policy.categories)
        if unknown:
            raise ValueError(
                f"disabled_categories names unknown categories {sorted(unknown)}; "
                f"valid: {', '.join(sorted(self.policy.categories))}"
            )
        self.semantic = semantic
        self.model_path = model_path
        self.batch_size = batch_size
        settings = self.policy.settings
        terms = [t for cat, items in self.policy.terms.items() for raw, src in items for t in _compile_term(raw, cat, src)]
        self.terms = TermIndex(terms, settings)
        self.allow = TermIndex(
            [t for raw, src in self.policy.allow_phrases for t in _compile_term(raw, "allow", src)],
            {**settings, "despaced_min_length": 10**6},
        )
        self.minor_terms = TermIndex(
            [t for raw, src in self.policy.minor_terms for t in _compile_term(raw, "minor", src)],
            {**settings, "despaced_min_length": 10**6},
        )
        self.semantic_categories = [
            c for c, items in self.policy.exemplars.items() if items and self.policy.thresholds.get(c) is not None
        ]
        self._exemplars = None  # (matrix, [(category, index)], benign matrix), built on first use

    # -- rules -----------------------------------------------------------------------------

    def _mask(self, tokens: list[Token]) -> set[int]:
        masked: set[int] = set()
        for term, start, _ in self.allow.spans(tokens, typos=False):
            masked.update(range(start, start + len(term.words)))
        if self.policy.allow_patterns:
            text, starts = _join_with_offsets(tokens)
            for pattern, _ in self.policy.allow_patterns:
                for m in pattern.finditer(text):
                    masked.update(k for k, (a, b) in enumerate(starts) if a < m.end() and b > m.start())
        return masked

    def _scan(self, tokens: list[Token], masked: set[int]) -> tuple[list[tuple[str, str]], str | None]:
        """Terms, patterns and the minor marker in these tokens: (hits, minor marker or None)."""
        visible = " ".join(t.text for i, t in enumerate(tokens) if i not in masked)
        hits: list[tuple[str, str]] = []
        for term, how in self.terms.find(tokens, masked):
            hits.append((term.category, f"term {term.label}" + ("" if how == "word" else f", {how}")))
        for category, patterns in self.policy.patterns.items():
            for number, (pattern, source) in enumerate(patterns):
                if pattern.search(visible):
                    hits.append((category, f"{category} pattern #{number} ({source})"))
        found = self.minor_terms.find(tokens, masked, typos=False)
        if found:
            return hits, f"minor marker {found[0][0].label}"
        for pattern, source in self.policy.minor_patterns:
            if pattern.search(visible):
                return hits, f"minor marker pattern ({source})"
        return hits, None

    def analyse(self, text: str) -> _Analysis:
        """Normalise, mask the allow-list and apply terms and patterns (no embeddings)."""
        tokens = normalized_tokens(text)
        masked = self._mask(tokens)
        visible = " ".join(t.text for i, t in enumerate(tokens) if i not in masked)
        hits, minor = self._scan(tokens, masked)
        sentences = self._sentences(text, tokens, masked)
        if minor and len(sentences) > 1:
            # In a long prompt a minor only counts in the same sentence as the sexual content
            # ("children's bicycles" three sentences before an adult scene does not).
            minor = None
            for first, last in sentences:
                part = tokens[first:last]
                part_hits, part_minor = self._scan(part, {k - first for k in masked if first <= k < last})
                if part_minor and any(c == "sexual" for c, _ in part_hits):
                    minor = part_minor
                    break
        return _Analysis(tokens, masked, visible, hits, minor, self._segments(tokens, masked, sentences))

    def _sentences(self, text: str, tokens: list[Token], masked: set[int]) -> list[tuple[int, int]]:
        """Token ranges of the sentences of a long prompt; one range for a short one."""
        if len(tokens) - len(masked) <= self.policy.settings["long_prompt_words"]:
            return [(0, len(tokens))]
        # Sentence boundaries come from the raw text; normalising each sentence on its own
        # gives its token count. If the counts disagree (a split word spanning a full stop),
        # the whole prompt is treated as one long sentence.
        counts = [len(normalized_tokens(s)) for s in _SENTENCE_END.split(text)]
        if sum(counts) != len(tokens):
            return [(0, len(tokens))]
        ranges, start = [], 0
        for count in counts:
            if count:
                ranges.append((start, start + count))
            start += count
        return ranges

    def _segments(self, tokens: list[Token], masked: set[int], sentences: list[tuple[int, int]]) -> list[str]:
        """What the semantic stage embeds: the whole prompt and, for a long one, each sentence
        and windows of long sentences, so a harmful request buried in benign text stands alone."""
        settings = self.policy.settings
        visible = [t.text for i, t in enumerate(tokens) if i not in masked]
        segments = [" ".join(visible)] if visible else []
        if len(visible) <= settings["long_prompt_words"]:
            return segments
        w, stride = settings["window_words"], settings["window_stride"]
        for first, last in sentences:
            words = [tokens[k].text for k in range(first, last) if k not in masked]
            if not words:
                continue
            if len(sentences) > 1:
                segments.append(" ".join(words))
            if len(words) > 2 * w:  # a run-on sentence: windows (at most about 64 of them)
                step = max(stride, -(-len(words) // 64))
                width = max(w, 2 * step)
                segments += [" ".join(words[i:i + width]) for i in range(0, len(words) - width + step, step)]
        return list(dict.fromkeys(segments))

    # -- semantic stage --------------------------------------------------------------------

    def _exemplar_matrix(self):
        if self._exemplars is None:
            labels = [(c, i) for c in self.semantic_categories for i in range(len(self.policy.exemplars[c]))]
            texts = [normalize(self.policy.exemplars[c][i]) for c, i in labels]
            benign = [normalize(t) for t in self.policy.benign_exemplars]
            self._exemplars = (
                _embed_cached(texts, self.model_path),
                labels,
                _embed_cached(benign, self.model_path) if benign else None,
            )
        return self._exemplars

    def semantic_scores(self, analyses: Sequence[_Analysis]) -> list[dict[str, tuple[float, float, str]]]:
        """Per prompt and category: (best similarity, benign similarity of that segment, exemplar)."""
        import numpy as np

        if not self.semantic or not self.semantic_categories:
            return [{} for _ in analyses]
        matrix, labels, benign = self._exemplar_matrix()
        segments = [s for a in analyses for s in a.segments]
        owners = [k for k, a in enumerate(analyses) for _ in a.segments]
        if not segments:
            return [{} for _ in analyses]
        vectors = embed(segments, batch_size=self.batch_size, model_path=self.model_path)
        sims = vectors @ matrix.T  # (S, E)
        benign_sims = (vectors @ benign.T).max(axis=1) if benign is not None else np.full(len(segments), -1.0)
        margin = self.policy.settings["benign_margin"]
        out: list[dict[str, tuple[float, float, str]]] = [{} for _ in analyses]
        category_of = np.array([self.semantic_categories.index(c) for c, _ in labels])
        columns = [np.nonzero(category_of == ci)[0] for ci in range(len(self.semantic_categories))]
        for s, owner in enumerate(owners):
            for category, cols in zip(self.semantic_categories, columns):
                j = cols[np.argmax(sims[s, cols])]
                score, benign_score = float(sims[s, j]), float(benign_sims[s])
                # Per category the prompt's best segment: one that beats its benign exemplar
                # if any does, and among those the most similar.
                rank = (score > benign_score + margin, score)
                best = out[owner].get(category)
                if best is None or rank > (best[0] > best[1] + margin, best[0]):
                    out[owner][category] = (score, benign_score, f"exemplar #{labels[j][1]}")
        return out

    # -- decisions -------------------------------------------------------------------------

    def _decide(self, analysis: _Analysis, scores: dict[str, tuple[float, float, str]]) -> SafetyDecision:
        margin = self.policy.settings["benign_margin"]
        semantic_hits = []
        for category, (score, benign, exemplar) in scores.items():
            threshold = self.policy.thresholds.get(category)
            if threshold is not None and score >= threshold and score > benign + margin:
                semantic_hits.append((category, score, f"semantic: {category} {exemplar}, similarity {score:.2f} >= {threshold:.2f}"))
        best_semantic = max((s for s, _, _ in scores.values()), default=None)
        sexual_rule = next((r for c, r in analysis.rule_hits if c == "sexual"), None)
        sexual_sem = next((r for c, _, r in semantic_hits if c == "sexual"), None)
        direct = next((r for c, r in analysis.rule_hits if c == ALWAYS_REFUSED), None)
        direct_sem = next(((s, r) for c, s, r in semantic_hits if c == ALWAYS_REFUSED), None)
        if direct:
            return SafetyDecision(False, ALWAYS_REFUSED, direct, 1.0)
        if sexual_sem and len(analysis.segments) > 1:
            sexual_sem = None  # in a long prompt, which sentence it came from is unknown to _scan
        if analysis.minor and (sexual_rule or sexual_sem):
            return SafetyDecision(False, ALWAYS_REFUSED, f"sexual content ({sexual_rule or sexual_sem}) with a {analysis.minor}", 1.0)
        for category, reason in analysis.rule_hits:
            if category not in self.disabled:
                return SafetyDecision(False, category, reason, 1.0)
        if direct_sem:  # ahead of the other semantic hits: this category is never switched off
            return SafetyDecision(False, ALWAYS_REFUSED, direct_sem[1], direct_sem[0])
        for category, score, reason in sorted(semantic_hits, key=lambda h: -h[1]):
            if category not in self.disabled:
                return SafetyDecision(False, category, reason, score)
        return SafetyDecision(True, None, "no policy rule matched", best_semantic)

    def check_texts(self, texts: Sequence[str]) -> list[SafetyDecision]:
        """check_text for many prompts, embedding them in batches."""
        analyses = [self.analyse(t) for t in texts]
        scores = self.semantic_scores(analyses)
        return [self._decide(a, s) for a, s in zip(analyses, scores)]

    def check_text(self, text: str) -> SafetyDecision:
        return self.check_texts([text])[0]


_SENTENCE_END = re.compile(r"(?<=[.!?;:\n])\s+|\n+")


def _join_with_offsets(tokens: Sequence[Token]) -> tuple[str, list[tuple[int, int]]]:
    spans, pos = [], 0
    for t in tokens:
        spans.append((pos, pos + len(t.text)))
        pos += len(t.text) + 1
    return " ".join(t.text for t in tokens), spans


@hookimpl
def register_safety_filters(register):
    register("policy", PolicyFilter)
