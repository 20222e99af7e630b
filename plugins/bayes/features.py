"""Message -> feature tokens -> hashed feature indices.

Every token carries a short prefix saying where it came from (``s:`` subject word,
``u:`` URL domain, ``att:`` attachment type, ...), so the same word in the subject
and in the body are different features. Tokens are *presence* features: each
counts once per message, which keeps long messages from drowning short ones.

Deliberately left out, because they identify the training corpus rather than
spam (and would not generalise to other sites or years): dates and times, message
IDs, the relay path (Received headers), list headers, plain numbers, and
mailing-list subject tags such as ``[ILUG]``.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
from sklearn.utils import murmurhash3_32

from mailflow.api import mime

# 2**20 hashed features: few collisions for a mail vocabulary, 4 MB as float32 weights.
N_FEATURES = 2**20
HASH_SEED = 0
HUGE_BYTES = 512 * 1024  # a message larger than this gets the "m:=huge" token
MAX_SCAN_CHARS = 512 * 1024  # decoded text tokenised per message, all parts together
MAX_TEXT_CHARS = 100_000  # text per part that is tokenised
MAX_MARKUP_CHARS = 256 * 1024  # HTML of one part converted to text (its text is cut above)
MAX_TOKEN_LEN = 25
MAILBOXES_READ = 8  # From/Reply-To mailboxes looked at for the first one with a domain

_WORD = re.compile(r"[^\W\d_][^\W_]{1,24}")  # letters first: no bare numbers or dates
# The same pattern for lower-cased ASCII text, where [^\W\d_] is [a-z] and [^\W_] is
# [a-z0-9]: literal ranges make the regex engine about twice as fast as Unicode
# categories, and most mail is ASCII.
_WORD_ASCII_LOWER = re.compile(r"[a-z][a-z0-9]{1,24}")


def _latin1_class(category: str) -> str:
    """The Latin-1 characters matched by a Unicode character class, as an explicit class."""
    chars = (chr(c) for c in range(256) if re.fullmatch(category, chr(c)))
    return "[" + "".join(map(re.escape, chars)) + "]"


# Also for Latin-1 text (most of the rest): explicit classes derived from _WORD itself,
# which the regex engine checks with a bitmap instead of Unicode category lookups.
_WORD_LATIN1 = re.compile(_latin1_class(r"[^\W\d_]") + _latin1_class(r"[^\W_]") + "{1,24}")
# bytes.translate table for Latin-1 text: word characters ([^\W_]) stay, the rest -> space.
_RUN_TABLE = bytes(c if re.fullmatch(r"[^\W_]", chr(c)) else 0x20 for c in range(256))
# Distinct body words known to be a whole run by themselves (see _add_words): at most
# this many (about 3 MB), then the set starts empty again.
_KNOWN_WORDS: set[str] = set()
_KNOWN_WORDS_MAX = 32_768
_MONEY = re.compile(r"[$€£]\s?\d")
_ASCII_UPPER = string.ascii_uppercase.encode()
_ASCII_LETTERS = string.ascii_letters.encode()
_LIST_TAG = re.compile(r"\[[^\]]{1,40}\]")  # "[ILUG]", "[SAtalk]": list names, not content
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
# Reverse names of consumer lines ("dsl-1-2-3.isp.net", "pool-...") rather than servers.
# Placeholders the SpamAssassin corpus put in place of its owners' addresses (see the
# corpus README): as features they would only teach the model that corpus.
ARTEFACTS = frozenset({"zzzz", "taint", "s:zzzz", "s:taint", "u:taint.org", "f:taint.org"})
# Headers whose first word (the product) says something about the sending software.
_MAILER_HEADERS = ("x-mailer", "user-agent")
_HASH_CACHE_MAX = 50_000  # ~8 MB of cached token -> column entries
_FOOTER_MAX = 1200
_FOOTER_MARKERS = ("listinfo", "mailing list", "groups.yahoo.com", "list-request")


_BUCKET_LABELS = tuple(str(i.bit_length()) for i in range(1025))


def bucket(n: int, cap: int = 6) -> str:
    """Small integer -> coarse log2 bucket label, so counts generalise."""
    n = min(n, 1 << cap)
    return _BUCKET_LABELS[n] if 0 <= n <= 1024 else str(n.bit_length())


def _domain_tokens(host: str, prefix: str) -> tuple[str, ...]:
    """Tokens of a host name (at most mime.MAX_HOST_CHARS of it: a DNS name is no longer)."""
    return _domain_tokens_cached(host[: mime.MAX_HOST_CHARS], prefix)


@functools.lru_cache(maxsize=4096)
def _domain_tokens_cached(host: str, prefix: str) -> tuple[str, ...]:
    """Cached: the same hosts come back in message after message."""
    return tuple(_domain_tokens_uncached(host, prefix))


def _domain_tokens_uncached(host: str, prefix: str) -> Iterable[str]:
    host = host.lower().rstrip(".").rsplit("@", 1)[-1].split(":", 1)[0]
    if not host:
        return
    if _IPV4.match(host):
        yield f"{prefix}ip"
        return
    labels = host.split(".")
    yield f"{prefix}tld:{labels[-1][:MAX_TOKEN_LEN]}"
    if len(labels) >= 2:
        # The last two labels approximate the registered domain (good enough for
        # hashing: a few public suffixes such as co.uk merge, which costs little).
        yield f"{prefix}{'.'.join(labels[-2:])[:60]}"


def _url_tokens(lowered: str, out: set[str]) -> None:
    """Domains of the URLs in (lower-cased) text, with and without a scheme."""
    for host in mime.url_hosts(lowered):
        out.update(_domain_tokens(host, "u:"))


def strip_list_footer(text: str) -> str:
    """Cut a mailing-list footer (Mailman's underscore rule + "listinfo" link, ...).

    A list adds the same footer to the spam and the ham it carries, so its words say
    which list a message came through, not whether it is spam.
    """
    cut = max(text.rfind("\n____________"), text.rfind("\n------------"))
    if cut >= 0 and len(text) - cut < _FOOTER_MAX:
        tail = text[cut:].lower()
        if any(marker in tail for marker in _FOOTER_MARKERS):
            return text[:cut]
    return text


def _words(lowered: str) -> list[str]:
    """``_WORD.findall`` of lower-cased text (the same matches, faster for ASCII)."""
    if lowered.isascii():  # O(1): CPython strings know whether they are ASCII
        return _WORD_ASCII_LOWER.findall(lowered)
    try:
        lowered.encode("latin-1")
    except UnicodeEncodeError:
        return _WORD.findall(lowered)
    return _WORD_LATIN1.findall(lowered)


def _add_words(lowered: str, out: set[str]) -> None:
    """Add the words of lower-cased text to ``out``: ``out.update(_words(lowered))``, faster.

    The pattern matches inside maximal runs of word characters only, so the words of a
    text are the words of its distinct runs, which ``str.split`` finds about four times
    as fast as the regex finds words (after one ``bytes.translate`` turns every other
    character into a space). Most runs are a word by themselves ("hello", not "2002",
    "x" or a run longer than 25 characters): those seen before are kept in a bounded
    set and taken as they are; the regex runs only over the other distinct runs,
    joined by spaces, and the runs it returns whole join the set. Text outside Latin-1
    takes the plain regex.
    """
    global _KNOWN_WORDS
    try:
        data = lowered.encode("latin-1")
    except UnicodeEncodeError:
        out.update(_WORD.findall(lowered))
        return
    runs = set(data.translate(_RUN_TABLE).decode("latin-1").split())
    known = _KNOWN_WORDS
    rest = runs.difference(known)
    if rest:
        runs -= rest
        pattern = _WORD_ASCII_LOWER if lowered.isascii() else _WORD_LATIN1
        found = pattern.findall(" ".join(rest))
        out.update(found)
        if len(known) >= _KNOWN_WORDS_MAX:
            known = _KNOWN_WORDS = set()  # a new set: see Hasher.columns
        known.update(rest.intersection(found))  # runs that are one word as a whole
    out.update(runs)


def _text_tokens(text: str, out: set[str], urls: set[str]) -> None:
    """Body words (no prefix) and a money flag into ``out``, URL domains into ``urls``."""
    lowered = strip_list_footer(text[:MAX_TEXT_CHARS]).lower()
    _add_words(lowered, out)
    # Substring tests first: a scan with a leading character class is much slower.
    if ("$" in lowered or "€" in lowered or "£" in lowered) and _MONEY.search(lowered):
        out.add("$money")
    _url_tokens(lowered, urls)


def _header_tokens(view: mime.MessageView, out: set[str]) -> None:
    # About 15 names are read: one pass over the unfolded block (an index of raw
    # values) costs less than one scan a name; only the values used become text.
    h = view.fields.unfolded_index()

    def first(name: str) -> str:
        values = h.get(name)
        if not values:
            return ""
        value = values[0]
        return (value if value.isascii() else mime.header_text(value)).strip()

    out.update(_cached(_subject_tokens, first("subject")))
    sender, sender_domain = _cached(_sender_tokens, first("from"))
    out.update(sender)

    to = first("to")
    if not to:
        out.add("to:=missing")
    elif "undisclosed" in to.lower():
        out.add("to:=undisclosed")
    out.add("to:n" + bucket(to.count("@") + first("cc").count("@")))
    reply_to = first("reply-to")
    if reply_to:
        mailbox = _first_with_domain(reply_to)
        if mailbox is not None and mailbox.domain != sender_domain:
            out.add("rt:=otherdomain")
    for name in ("message-id", "date", "mime-version"):
        if name not in h:
            out.add("h:=no-" + name)
    for name in _MAILER_HEADERS:
        mailer = first(name)
        if mailer:
            out.update(_cached(_mailer_tokens, mailer))
    if "x-priority" in h or "x-msmail-priority" in h:
        out.add("h:=priority")
    # No Received tokens: the relay path says where a corpus was collected and how
    # the sender's site is built (every relay, mailflow too, adds a hop; people send
    # from home addresses that look dynamic), not whether the mail is spam.


_T = TypeVar("_T")
# Tokens of Subject, From and X-Mailer/User-Agent values are cached by value (senders,
# mailers and subjects of lists and notifications repeat): at most _VALUE_CACHE_MAX
# values of at most _VALUE_CACHE_CHARS characters per function (<= ~1 MB each).
_VALUE_CACHE_MAX = 1024
_VALUE_CACHE_CHARS = 256


def _cached(fn: Callable[[str], _T], value: str) -> _T:
    """``fn(value)``, from ``fn``'s bounded cache when the value is short enough."""
    if len(value) > _VALUE_CACHE_CHARS:
        return fn.__wrapped__(value)  # type: ignore[attr-defined]
    return fn(value)


@functools.lru_cache(maxsize=_VALUE_CACHE_MAX)
def _subject_tokens(raw: str) -> tuple[str, ...]:
    """Tokens of a raw Subject value: words (``s:``) and shape flags."""
    out: set[str] = set()
    subject = _LIST_TAG.sub(" ", mime.decode_words(raw))
    out.update(map("s:".__add__, _words(subject.lower())))
    if "=?" in raw:
        out.add("s:=encoded")
    if subject.isascii():  # count in C: delete the letters / capitals and compare lengths
        b = subject.encode("ascii")
        n_letters = len(b) - len(b.translate(None, _ASCII_LETTERS))
        n_upper = len(b) - len(b.translate(None, _ASCII_UPPER))
    else:
        letters = [c for c in subject if c.isalpha()]
        n_letters, n_upper = len(letters), sum(c.isupper() for c in letters)
    if n_letters >= 8 and n_upper > 0.7 * n_letters:
        out.add("s:=allcaps")
    if "!" in subject:
        out.add("s:=bang")
    if _MONEY.search(subject):
        out.add("s:$money")
    if not subject.strip():
        out.add("s:=empty")
    return tuple(out)


@functools.lru_cache(maxsize=_VALUE_CACHE_MAX)
def _sender_tokens(raw: str) -> tuple[tuple[str, ...], str | None]:
    """Tokens of a From value, and its first address' domain (lower case) if it has one.

    Display-name words are the words before the first "<"; the address is the first
    of the first few mailboxes that has a domain (spam often puts a name without an
    address first: "Support team ,_<x@example.com>"); no more are read, so a From of
    20,000 addresses costs a few.
    """
    sender = mime.decode_words(raw)
    name, _, _ = sender.partition("<")
    out = set(map("fn:".__add__, _words(name.lower())))
    mailbox = _first_with_domain(raw)
    if mailbox is None:
        out.add("f:=noaddr")
        return tuple(out), None
    out.update(_domain_tokens(mailbox.domain, "f:"))
    if sum(c.isdigit() for c in mailbox.local_part) >= 3:
        out.add("f:=digits")
    return tuple(out), mailbox.domain


def _first_with_domain(value: str) -> mime.Address | None:
    """The first of the first MAILBOXES_READ mailboxes of ``value`` with a domain."""
    for mailbox in mime.parse_addresses(value, MAILBOXES_READ):
        if mailbox.domain:
            return mailbox
    return None


@functools.lru_cache(maxsize=_VALUE_CACHE_MAX)
def _mailer_tokens(raw: str) -> tuple[str, ...]:
    """``xm:`` + the first word (the product) of an X-Mailer or User-Agent value."""
    product = _words(raw.lower())
    return (f"xm:{product[0]}",) if product else ()


def extract_tokens(message: bytes | mime.MessageView) -> list[str]:
    """All feature tokens of one message (unique, in no particular order).

    ``message`` is the shared view of a message in the pipeline
    (``mailflow.mime.view(ctx)``: the walk and decoded text are shared with the other
    plugins) or raw bytes (training, evaluation): both give the same tokens.
    """
    view = mime.MessageView(message) if isinstance(message, bytes) else message
    out: set[str] = set()
    urls: set[str] = set()  # the u: tokens, kept apart until the summary counts them
    if view.size > HUGE_BYTES:
        out.add("m:=huge")
    _header_tokens(view, out)
    structure = view.structure
    if structure.truncated:
        out.add("m:=truncated")
    out.add("m:parts" + bucket(len(structure.parts)))
    has_plain = has_html = False
    body_chars = 0
    budget = MAX_SCAN_CHARS
    for part in structure.parts:
        ctype = part.content_type
        filename = part.filename
        if ctype.startswith("text/") and not filename:
            charset = part.charset
            if charset:
                out.add("cs:" + charset[:MAX_TOKEN_LEN])
            if ctype == "text/html":
                has_html = True
            else:
                has_plain = True
            if budget <= 0:
                continue  # MAX_SCAN_CHARS tokenised: the rest of the text is not read
            text = part.text()
            if ctype == "text/html":
                markup = text[:MAX_TEXT_CHARS]
                lowered = markup.lower()
                out.update(map("tag:".__add__, mime.element_names(markup)))
                # URLs hide in attributes, so take them from the markup, words from the text.
                _url_tokens(lowered, urls)
                # The part's plain text is shared with the rules plugin (converted once);
                # of a larger part only the first MAX_MARKUP_CHARS are converted.
                # The length counted is that of the text before blank runs are collapsed.
                if len(text) <= MAX_MARKUP_CHARS:
                    text = part.plain_text()
                    body_chars += part.visible_chars
                else:
                    text = mime.visible_text(text[:MAX_MARKUP_CHARS])
                    body_chars += len(text)
                    text = mime.collapse_blanks(text)
            else:
                body_chars += len(text)
            text = text[: min(MAX_TEXT_CHARS, budget)]
            budget -= len(text)
            _text_tokens(text, out, urls)
        else:
            out.add("att:" + ctype[:40])
            if "." in filename:
                out.add("att:." + filename.rsplit(".", 1)[1].lower()[:10])
    if has_html and not has_plain:
        out.add("m:=html-only")
    out.add("m:len" + bucket(body_chars // 256, 10))
    urls -= ARTEFACTS
    out -= ARTEFACTS
    _summary_tokens(out, urls)
    out |= urls
    return list(out)


def _summary_tokens(out: set[str], urls: set[str]) -> None:
    """Tokens about the message as a whole: how many link domains and top-level
    domains it has (``urls``: its ``u:`` tokens), and images in HTML with little or
    no text (image spam)."""
    tlds = sum(1 for token in urls if token.startswith("u:tld:"))
    hosts = len(urls) - tlds
    out.add(f"u:n{min(hosts, 6)}")
    out.add(f"u:ntld{min(tlds, 4)}")
    if "tag:img" in out:
        if "m:=html-only" in out:
            out.add("m:=html-img")
        if "m:len0" in out or "m:len1" in out:
            out.add("m:=img-short")


class _Columns(dict[str, int]):
    """token -> column, hashing a token the first time it is looked up.

    ``__missing__`` makes a miss part of the lookup itself, so a message with a few
    new tokens (nine in ten corpus messages have some) still takes one pass of
    ``map(cache.__getitem__, tokens)`` in C, with Python code only for the new ones,
    instead of a failed pass, a set difference and a second pass.
    """

    __slots__ = ("half", "mask", "seed")

    def __init__(self, seed: int, mask: int) -> None:
        super().__init__()
        self.seed = seed
        self.half = (mask + 1) // 2
        self.mask = self.half - 1

    def __missing__(self, token: str) -> int:
        column: int = murmurhash3_32(token, self.seed, positive=True) & self.mask
        if ":" in token:  # a prefixed (structure, header, URL) token: the upper half
            column += self.half
        self[token] = column
        return column


class Hasher:
    """Token -> column index by MurmurHash3 (the hashing trick), with a bounded cache.

    The same function is used for training and scoring, so a model is valid for
    any vocabulary with no stored dictionary; ``n_features`` fixes the model size.
    Body words (tokens without a prefix) take the lower half of the columns and
    prefixed tokens (subject, sender, URLs, structure, ...) the upper half, so the
    model tells the two blocks apart by column alone (it weighs each block by its
    own size: see ``model.design_matrix``).
    """

    def __init__(self, n_features: int = N_FEATURES, seed: int = HASH_SEED) -> None:
        if n_features < 2 or n_features & (n_features - 1):
            raise ValueError("n_features must be a power of two, at least 2")
        self.n_features = n_features
        self.seed = seed
        self._mask = n_features - 1
        self._cache = _Columns(seed, self._mask)

    def _lookup(self) -> _Columns:
        """The cache, replaced by an empty one first when it has grown past its bound.

        A cheap bound on memory (hot tokens come back at once). A new dict rather than
        clear(): a thread still using the old one (large messages are scored in worker
        threads) keeps a consistent dict; every lookup in it hashes what is missing.
        """
        cache = self._cache
        if len(cache) > _HASH_CACHE_MAX:
            cache = self._cache = _Columns(self.seed, self._mask)
        return cache

    def columns(self, tokens: Iterable[str]) -> list[int]:
        """The column of each token, in order (duplicates kept)."""
        return list(map(self._lookup().__getitem__, tokens))

    def column_array(self, tokens: list[str]) -> np.ndarray:
        """``columns`` as an int64 array, filled straight from the cache."""
        return np.fromiter(map(self._lookup().__getitem__, tokens), np.int64, len(tokens))

    def index(self, tokens: Iterable[str]) -> np.ndarray:
        """Sorted unique columns: a binary feature vector in sparse form."""
        return np.unique(np.asarray(self.columns(tokens), dtype=np.int64))
