import pytest

from kubetune.data.pii import Scrubber, iban_ok, luhn_ok
from kubetune.spec import PII_TYPES


@pytest.mark.parametrize("text, kind", [
    ("mail jane.doe+work@example.co.uk now", "email"),
    ("call +1 (415) 555-2671 today", "phone"),
    ("call 020 7946 0958 today", "phone"),
    ("card 4111 1111 1111 1111 ok", "card"),
    ("card 5500-0000-0000-0004 ok", "card"),
    ("iban GB82 WEST 1234 5698 7654 32 ok", "iban"),
    ("iban DE89370400440532013000 ok", "iban"),
    ("from 192.168.1.20 ok", "ip"),
    ("from 2001:db8::8a2e:370:7334 ok", "ip"),
    ("ssn 123-45-6789 ok", "ssn"),
    ("key AKIAIOSFODNN7EXAMPLE ok", "secret"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc ok", "secret"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY ok", "secret"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nabc\n-----END RSA PRIVATE KEY----- ok", "secret"),
])
def test_each_type_is_replaced_and_counted(text, kind):
    s = Scrubber(list(PII_TYPES))
    out = s.scrub(text)
    assert out.endswith(" ok") or out.endswith(" now") or out.endswith(" today")
    assert dict(s.counts) == {kind: 1}, (out, dict(s.counts))
    assert "<" in out
    if kind == "secret" and "aws_secret" in text:
        assert out.startswith("aws_secret_access_key = <SECRET>")


@pytest.mark.parametrize("text", [
    "order 4111 1111 1111 1112 (fails Luhn)",
    "released on 2024-05-17 and 17.05.2024",
    "version 1.2.3 and 999.1.1.1 is not an IP",
    "time 10:30:00",
    "room 12, floor 3",
    "the ticket ORD-2024-55678 is open",
])
def test_lookalikes_are_kept(text):
    s = Scrubber(list(PII_TYPES))
    assert s.scrub(text) == text, dict(s.counts)


def test_only_selected_types_and_allow_list():
    s = Scrubber(["email"], allow=["help@acme.example"])
    assert s.scrub("help@acme.example or me@x.example, 4111 1111 1111 1111") == \
        "help@acme.example or <EMAIL>, 4111 1111 1111 1111"


def test_check_digits():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")
