"""Scrub identifiers out of a free-text note (``fedmed data deidentify --notes scrub``).

Best effort, and said so: it removes what it can recognise — the patient's own names and ids
(from the record's row and the DICOM headers), phone numbers, dates, e-mail and web addresses,
titled names ("Dr. Smith") and long digit runs (record numbers) — and replaces each with a tag
such as ``[NAME]``. A name that appears nowhere in the patient's data and has no title survives;
``--notes drop`` is the safe choice.

Phone numbers go through ``phonenumbers`` (Google's libphonenumber, offline, no downloads).
The rest is a few regular expressions, hand-rolled because the libraries were not usable here:
Presidio needs a spaCy model fetched from outside PyPI at install time, and ``scrubadub`` (last
release 2023) pins ``textblob==0.15.3``, pulls in seven packages, and finds names only with
NLTK corpora that are downloaded at run time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import phonenumbers

__all__ = ["scrub_text", "identifying_columns"]

_MONTHS = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
           r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_ADDRESSES: list[tuple[str, re.Pattern[str]]] = [  # first: names inside them go with them
    ("[EMAIL]", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    ("[URL]", re.compile(r"(?:https?://|www\.)\S+", re.I)),
]
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("[DATE]", re.compile(r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b|\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b")),
    ("[DATE]", re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTHS}(?:\s+\d{{2,4}})?\b"
                          rf"|\b{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{2,4}})?\b"
                          rf"|\b{_MONTHS}\s+\d{{4}}\b", re.I)),
    ("[NAME]", re.compile(r"\b(?i:mr|mrs|ms|miss|dr|prof|sr|nurse)\.?\s+[A-Z][\w'-]+(?:\s+[A-Z][\w'-]+)?")),
    ("[NUMBER]", re.compile(r"(?<![\w.])\+?\d(?:[\s().-]?\d){5,}(?![\w])")),  # MRNs, SSNs, phones
]
_ID_WORDS = re.compile(r"name|phone|tel|address|e-?mail|birth|dob|ssn|mrn|insurance|passport|"
                       r"national_?id|contact", re.I)


def identifying_columns(columns: Iterable[str], *, exclude: Iterable[str] = ()) -> list[str]:
    """Columns whose names say they hold identifiers (their values are scrubbed from notes)."""
    skip = set(exclude)
    return [c for c in columns if c not in skip and _ID_WORDS.search(str(c))]


def scrub_text(text: str, *, known: Iterable[str] = (), region: str = "US") -> str:
    """``text`` with the patient's ``known`` values and recognisable identifiers replaced.

    ``known`` values (names, ids) are matched case-insensitively on word boundaries; longer
    ones first, so a full name goes before its parts. ``region`` is the default country for
    phone numbers written without ``+country`` code.
    """
    out = str(text)
    for tag, pattern in _ADDRESSES:
        out = pattern.sub(tag, out)
    for value in sorted({str(k).strip() for k in known if str(k).strip()}, key=len, reverse=True):
        tag = "[ID]" if any(ch.isdigit() for ch in value) else "[NAME]"
        out = re.sub(rf"(?<!\w){re.escape(value)}(?!\w)", tag, out, flags=re.I)
    matches = list(phonenumbers.PhoneNumberMatcher(out, region))
    for m in reversed(matches):
        out = out[: m.start] + "[PHONE]" + out[m.end:]
    for tag, pattern in _PATTERNS:
        out = pattern.sub(tag, out)
    return out
