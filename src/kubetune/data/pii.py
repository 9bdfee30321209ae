"""Scrub personal data and secrets, replacing each match with a typed placeholder.

Matches are counted by type and never logged. Checks that cut false positives: card numbers must
pass Luhn, IBANs the ISO 13616 mod-97 check, IPs must parse, phone numbers must be valid numbers of
their country's numbering plan (Google's libphonenumber). Order matters: secrets first (they
contain digits and dots, and the e-mail rule would take "password@host" in a URL), phones last.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import Callable

from phonenumbers import Leniency, PhoneNumberMatch, PhoneNumberMatcher

PLACEHOLDER = {
    "secret": "<SECRET>", "email": "<EMAIL>", "iban": "<IBAN>", "card": "<CREDIT_CARD>",
    "ssn": "<SSN>", "ip": "<IP_ADDRESS>", "phone": "<PHONE>",
}

_SECRETS = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # JWT: base64url of '{"' twice, then a signature
    r"|(?P<prefix>(?i:aws_secret_access_key)\s*[:=]\s*)[A-Za-z0-9/+]{40}\b"
    r"|\b(?:ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{20,}\b"
    r"|\bsk-[A-Za-z0-9_-]{20,}\b"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}\b"
    # The rest follow gitleaks' rules of the name given (github.com/gitleaks/gitleaks, config/gitleaks.toml,
    # MIT), written to take the whole value, with no entropy check.
    r"|\bhf_[A-Za-z0-9]{34}\b"  # huggingface-access-token (exactly 34: hf_ + a longer identifier is code)
    r"|\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"  # gcp-api-key
    r"|\b[sr]k_(?:live|test|prod)_[A-Za-z0-9]{24,}\b"  # stripe-access-token (gitleaks: 10+)
    r"|\bglpat-[0-9A-Za-z_-]{20,}(?:\.[0-9a-z]{9})?(?![0-9A-Za-z_-])"  # gitlab-pat, gitlab-pat-routable
    r"|\bnpm_[A-Za-z0-9]{36}\b"  # npm-access-token
    # slack-webhook-url (its {43,56} would cut a workflows/ URL short)
    r"|(?:\bhttps?://)?\bhooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9+/]{43,}"
    # Azure storage account key, 64 bytes in base64, after AccountKey= in a connection string: gitleaks'
    # proposed azure-storage-connection-string / azure-storage-account-key rules (pull requests 2106, 2072).
    r"|(?P<prefix_azure>\b(?i:AccountKey)\s*=\s*)[A-Za-z0-9+/]{86}=="
    # Credentials in a URL, scheme://user:password@host: only the password goes, so the URL still reads
    # as one (the shape of gitleaks' sidekiq-sensitive-url and of its own redaction of git remote URLs;
    # gitleaks has no general rule). Not a ${VAR} or *** placeholder.
    r"|(?P<prefix_url>\b[A-Za-z][A-Za-z0-9+.-]{0,30}://[^\s:@/?#<>\"'`]*:)"
    r"(?!\$\{?[A-Za-z_]\w*\}?@|\*+@)[^\s@/?#<>\"'`]+(?=@[A-Za-z0-9\[])"
)
_BEARER = re.compile(r"(?P<prefix>\b(?i:bearer)\s+)[A-Za-z0-9\-._~+/]{16,}=*")  # RFC 6750 token
_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\w)")
# Phone numbers: libphonenumber's matcher finds them and checks them against the numbering plan of
# a region, in passes: international format (+49 30 901820, any country), then US national format,
# then national formats of common regions, which start with the trunk prefix 0 (0151 23456789 in DE,
# 020 7946 0958 in GB). US numbers have no trunk prefix, so many 10-digit numbers are valid ones: in
# the US pass digits must be grouped as the US writes them (STRICT_GROUPING keeps "INV-2023-000123")
# and a bare run of digits is taken for an order or invoice number. Elsewhere the 0 must lead into
# the area code ("0-306-40615-2" is an ISBN).
_PHONE_PASSES = [(None, Leniency.VALID), ("US", Leniency.STRICT_GROUPING)] + [
    (region, Leniency.VALID) for region in ("GB", "DE", "FR", "IN", "JP", "AU", "IT", "NL")]
_NATIONAL = re.compile(r"(?<!\d)\(?0\d")
_COUNTRY_CODE = re.compile(r"\+\s*(\d+)")
# Every phone number has 7+ digits with only punctuation or spaces between them, and no Latin letter
# or digit right before (the lookbehind also makes the search fast). The matcher is slow (~0.1 ms per
# region on a short text), so it only sees a small window around each such run.
_PHONE_HINT = re.compile(r"(?<![A-Za-z\d])\+?\(?\d(?:[^\w\n]{0,3}\d){6,}")
_PHONE_MARGIN = 8  # characters either side: the matcher looks at neighbours (letters, "+", ":30")


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
    # Payment cards start with 2-6 (ISO/IEC 7812 major industry identifier); 13 digits is old Visa only.
    # Keeps timestamps, ISBNs and EANs that happen to pass Luhn.
    return (13 <= len(digits) <= 19 and digits[0] in "23456" and (len(digits) > 13 or digits[0] == "4")
            and luhn_ok(digits))


def _ipv6_ok(m: str) -> bool:
    try:
        ipaddress.IPv6Address(m)
    except ValueError:
        return False
    return any(c not in ":0" for c in m)  # "::" or "0:0::" are not addresses people write


def _phone_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each phone number in the text, in order."""
    spans: list[tuple[int, int]] = []
    for hint in _PHONE_HINT.finditer(text):
        lo = max(hint.start() - _PHONE_MARGIN, 0)
        window = text[lo : hint.end() + _PHONE_MARGIN]
        for region, leniency in _PHONE_PASSES:
            if any(s <= hint.start() and hint.end() <= e for s, e in spans):
                break  # the whole run is one number, found
            if region not in (None, "US") and not _NATIONAL.search(window):
                break  # no national number outside the US without a leading 0
            for m in PhoneNumberMatcher(window, region, leniency=leniency):
                start, end = lo + m.start, lo + m.end
                if _phone_ok(m, region) and not any(s < end and start < e for s, e in spans):  # not found before
                    spans.append((start, end))
    return sorted(spans)


def _phone_ok(m: PhoneNumberMatch, region: str | None) -> bool:
    raw = m.raw_string
    if raw.startswith("+"):  # the country code is written whole: "ZIP+4 90210-1234" is no +49 number
        code = _COUNTRY_CODE.match(raw)
        return code is not None and code.group(1).startswith(str(m.number.country_code))
    if region == "US":
        return not raw.isdigit()  # bare digits: an order or invoice number more often than a phone
    return region is None or _NATIONAL.match(raw) is not None


_SECRET_HINTS = ("-----BEGIN", "AKIA", "ASIA", "eyJ", "ghp_", "gho_", "ghs_", "github_pat_", "sk-", "xox", "hf_",
                 "AIza", "k_live_", "k_test_", "k_prod_", "glpat-", "npm_", "hooks.slack.com")


def _secret_hint(t: str) -> bool:
    if any(h in t for h in _SECRET_HINTS) or ("://" in t and "@" in t):  # the last: a password in a URL
        return True
    lower = t.lower()
    return "aws_secret_access_key" in lower or "accountkey" in lower


_DIGIT = re.compile(r"\d")


def _has_digit(t: str) -> bool:
    return _DIGIT.search(t) is not None

# (type, pattern, extra check on a match, cheap test that a text could match at all), in the
# order they are applied. The cheap tests skip most regexes on most texts.
_RULES: list[tuple[str, re.Pattern, Callable[[str], bool] | None, Callable[[str], bool]]] = [
    ("secret", _SECRETS, None, _secret_hint),
    ("secret", _BEARER, None, lambda t: "earer" in t or "EARER" in t),
    ("email", _EMAIL, None, lambda t: "@" in t),
    ("iban", _IBAN, iban_ok, _has_digit),
    ("card", _CARD, _card_ok, _has_digit),
    ("ssn", _SSN, None, lambda t: "-" in t),
    ("ip", _IPV6, _ipv6_ok, lambda t: ":" in t),
    ("ip", _IPV4, None, lambda t: "." in t),
]


class Scrubber:
    def __init__(self, types: list[str], allow: list[str] = ()):
        self.rules = [r for r in _RULES if r[0] in set(types)]
        self.phones = "phone" in types
        self.allow = set(allow)
        self.counts: Counter[str] = Counter()

    def scrub(self, text: str) -> str:
        for kind, pattern, check, could_match in self.rules:
            if could_match(text):
                text = pattern.sub(self._replacer(kind, check), text)
        if self.phones and _PHONE_HINT.search(text):
            text = self._scrub_phones(text)
        return text

    def _scrub_phones(self, text: str) -> str:
        out, last = [], 0
        for start, end in _phone_spans(text):
            if text[start:end] not in self.allow:
                out += [text[last:start], PLACEHOLDER["phone"]]
                last = end
                self.counts["phone"] += 1
        return "".join(out) + text[last:]

    def _replacer(self, kind: str, check: Callable[[str], bool] | None) -> Callable[[re.Match], str]:
        def replace(match: re.Match) -> str:
            found = match.group(0)
            if found in self.allow or (check is not None and not check(found)):
                return found
            self.counts[kind] += 1
            # the part kept: "aws_secret_access_key = ", "AccountKey=", "postgres://app:"
            keep = next((v for k, v in match.groupdict().items() if k.startswith("prefix") and v), "")
            return keep + PLACEHOLDER[kind]

        return replace
