"""Scrub personal data and secrets, replacing each match with a typed placeholder.

Matches are counted by type and never logged. Checks that cut false positives: card numbers must
pass Luhn, IBANs the ISO 13616 mod-97 check, IPs must parse, phone numbers need 7-15 digits and
are not dates. Order matters: secrets first (they contain digits and dots), phones last.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import Callable

PLACEHOLDER = {
    "secret": "<SECRET>", "email": "<EMAIL>", "iban": "<IBAN>", "card": "<CREDIT_CARD>",
    "ssn": "<SSN>", "ip": "<IP_ADDRESS>", "phone": "<PHONE>",
}

_SECRETS = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|(?<=Bearer )[A-Za-z0-9\-._~+/]{16,}=*"
    r"|(?P<prefix>(?i:aws_secret_access_key)\s*[:=]\s*)[A-Za-z0-9/+]{40}\b"
    r"|\b(?:ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{20,}\b"
    r"|\bsk-[A-Za-z0-9_-]{20,}\b"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}\b"
)
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\w)")
_PHONE = re.compile(r"(?<![\w+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,5}){1,4}(?![\w-])")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}[./-]\d{2}[./-]\d{4}")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _card_ok(m: str) -> bool:
    digits = re.sub(r"\D", "", m)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _ipv6_ok(m: str) -> bool:
    try:
        ipaddress.IPv6Address(m)
    except ValueError:
        return False
    return any(c not in ":0" for c in m)  # "::" or "0:0::" are not addresses people write


def _phone_ok(m: str) -> bool:
    return 7 <= sum(c.isdigit() for c in m) <= 15 and not _DATE.fullmatch(m)


_SECRET_HINTS = ("-----BEGIN", "AKIA", "ASIA", "Bearer ", "ghp_", "gho_", "ghs_", "github_pat_", "sk-", "xox")


def _secret_hint(t: str) -> bool:
    return any(h in t for h in _SECRET_HINTS) or "aws_secret_access_key" in t.lower()


_DIGIT = re.compile(r"\d")


def _has_digit(t: str) -> bool:
    return _DIGIT.search(t) is not None

# (type, pattern, extra check on a match, cheap test that a text could match at all), in the
# order they are applied. The cheap tests skip most regexes on most texts.
_RULES: list[tuple[str, re.Pattern, Callable[[str], bool] | None, Callable[[str], bool]]] = [
    ("secret", _SECRETS, None, _secret_hint),
    ("email", _EMAIL, None, lambda t: "@" in t),
    ("iban", _IBAN, iban_ok, _has_digit),
    ("card", _CARD, _card_ok, _has_digit),
    ("ssn", _SSN, None, lambda t: "-" in t),
    ("ip", _IPV6, _ipv6_ok, lambda t: ":" in t),
    ("ip", _IPV4, None, lambda t: "." in t),
    ("phone", _PHONE, _phone_ok, _has_digit),
]


class Scrubber:
    def __init__(self, types: list[str], allow: list[str] = ()):
        self.rules = [r for r in _RULES if r[0] in set(types)]
        self.allow = set(allow)
        self.counts: Counter[str] = Counter()

    def scrub(self, text: str) -> str:
        for kind, pattern, check, could_match in self.rules:
            if could_match(text):
                text = pattern.sub(self._replacer(kind, check), text)
        return text

    def _replacer(self, kind: str, check: Callable[[str], bool] | None) -> Callable[[re.Match], str]:
        def replace(match: re.Match) -> str:
            found = match.group(0)
            if found in self.allow or (check is not None and not check(found)):
                return found
            self.counts[kind] += 1
            keep = match.groupdict().get("prefix") or ""  # e.g. "aws_secret_access_key = "
            return keep + PLACEHOLDER[kind]

        return replace
