"""PII detection quality: recall and false positives per type, kubetune vs Presidio's recognizers.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/bench_pii.py [--show-errors]

The labelled set is generated here, deterministically (``labelled_set()``, also used by
tests/test_pii.py): PII strings of every type kubetune redacts, each embedded in a sentence, and
look-alikes that must stay untouched (dates, versions, prices, order and invoice numbers, ISBNs,
tracking numbers, times, resolutions, ...). Phone numbers come in international format from many
countries and in the national formats of US/CA, GB, DE, FR, IN, JP, AU, IT and NL. The secrets are
the formats kubetune has rules for (AWS, GitHub, OpenAI, Slack, Hugging Face, Google, Stripe, GitLab
and npm keys, Slack webhook URLs, Azure storage keys, passwords in URLs, private keys, bearer
tokens, JWTs); Presidio has no recognizer for secrets.

Both detectors are scored the same way: detected spans are replaced with kubetune's placeholders.
A PII string counts as found when the sentence comes out exactly as the sentence with that string
replaced by its type's placeholder (the whole value, the right type, nothing else touched). A
look-alike is a false positive of type T when a placeholder of type T appears in it; FP rate =
look-alikes flagged / all look-alikes. Presidio: its pattern recognizers (EmailRecognizer,
PhoneRecognizer with its default regions and leniency, CreditCardRecognizer, IbanRecognizer,
IpRecognizer, UsSsnRecognizer) called directly, every result with a score above 0 counted; where
results overlap, the higher score wins, then the longer span.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import string
import time
from typing import Callable

from kubetune.data.pii import PLACEHOLDER, Scrubber
from kubetune.spec import PII_TYPES

TYPES = list(PII_TYPES)

PHONES = [
    # the numbers that leaked
    "+49 30 901820", "+91 98765 43210", "+81 3-1234-5678", "0151 23456789",
    # US / Canada
    "+1 (415) 555-2671", "(415) 555-2671", "415-555-2671", "415.555.2671", "415 555 2671", "4155552671",
    "+14155552671", "1-800-555-0199", "+1 212 555 0143", "+1-646-555-0172", "(312) 555-0198", "1 (206) 555-0110",
    "+1 416 555 0123", "(604) 555-0187", "+1.305.555.0134", "+1 (212) 555-0143 ext. 12",
    # GB
    "020 7946 0958", "+44 20 7946 0958", "+44 (0)20 7946 0958", "07911 123456", "+44 7911 123456",
    "0161 496 0123", "0131 496 0456", "+44 113 496 0789", "0044 20 7946 0958",
    # DE
    "+49 151 2345 6789", "0151 2345 6789", "030 901820", "(030) 901820", "030/901820", "+49 (0)30 901820",
    "0049 30 901820", "089 12345678", "+49 89 12345678", "0221 1234567", "0176-12345678", "+4915123456789", "015123456789",
    # FR
    "01 23 45 67 89", "+33 1 23 45 67 89", "06 12 34 56 78", "+33 6 12 34 56 78", "+33612345678",
    "04 91 12 34 56", "+33 (0)4 91 12 34 56", "0033 1 23 45 67 89",
    # IN
    "+91-98765-43210", "+91 9876543210", "098765 43210", "022 2345 6789", "+91 22 2345 6789",
    "011 2345 6789", "+91 80 4123 4567",
    # JP
    "03-1234-5678", "090-1234-5678", "+81 90-1234-5678", "06-6123-4567", "(03) 1234-5678", "+81 6 6123 4567",
    # AU, IT, NL in national format
    "(02) 9876 5432", "0412 345 678", "06 1234 5678", "020 123 4567", "06 12345678",
    # international format, elsewhere
    "+61 2 9876 5432", "+61 412 345 678", "+55 11 91234-5678", "+86 138 0013 8000", "+86 10 6552 9988",
    "+7 495 123-45-67", "+34 912 34 56 78", "+34 612 34 56 78", "+39 06 1234 5678", "+39 347 123 4567",
    "+31 20 123 4567", "+31 6 12345678", "+41 44 668 18 00", "+43 1 5134567", "+46 70 123 45 67",
    "+45 32 12 34 56", "+358 40 1234567", "+48 512 345 678", "+420 601 123 456", "+36 1 234 5678",
    "+30 21 0123 4567", "+351 912 345 678", "+353 87 123 4567", "+90 212 123 45 67", "+82 10-1234-5678",
    "+82 2-312-3456", "+65 9123 4567", "+852 2123 4567", "+886 2 2345 6789", "+66 2 123 4567",
    "+84 912 345 678", "+62 812-3456-7890", "+63 917 123 4567", "+60 12-345 6789", "+27 82 123 4567",
    "+234 803 123 4567", "+254 712 345678", "+971 50 123 4567", "+966 50 123 4567", "+972 3-123-4567",
    "+92 300 1234567", "+880 1712-345678", "+52 55 1234 5678", "+54 9 11 1234-5678", "+57 301 2345678",
    "+56 9 6123 4567", "+51 912 345 678", "+64 21 123 4567",
]
PHONE_SENTENCES = [
    "Call me at {} after 6pm.", "My number is {} if anything changes.", "You can reach the front desk on {}.",
    "Tel.: {}", "WhatsApp {}, texts only please.", "Contact: Maria Lopez, {}", "Ruf mich unter {} an.",
    "Appelez-moi au {} demain.", "His cell is {} and he answers on weekends.", "Phone {} / fax none",
]

EMAILS = [
    "jane.doe@example.com", "j.smith+newsletter@mail.example.co.uk", "first.last@company.de", "user_name@sub.domain.org",
    "x@y.io", "support-team@acme-corp.com", "12345@numbers.net", "MARIA.GARCIA@EMPRESA.ES",
    "test.user@university.ac.jp", "o.mueller@xn--mller-kva.de", "li.wei@qq.com", "a.b.c.d@e-f.g.museum",
    "priya.sharma92@gmail.com", "noreply@notifications.github.com", "billing@stripe-example.com",
    "kenji_tanaka@docomo.ne.jp", "anna.k@web.de", "ceo@startup.ai", "dev+test-1@localhost-mail.dev",
    "john.o.connor@hospital.nhs.uk", "sales@shop.example.fr", "m.rossi@libero.it", "hr@company.com.au",
    "pedro.silva@uol.com.br", "ahmed.hassan@outlook.sa",
]
EMAIL_SENTENCES = [
    "Write to {} for a refund.", "Email: {}", "Please cc {} on the thread.", "From: Jane <{}>",
    "mailto:{}", "Send the invoice to {}, thanks!",
]

CARDS = [
    "4111 1111 1111 1111", "4012-8888-8888-1881", "4222222222222", "5555 5555 5555 4444", "5105105105105100",
    "2223 0031 2200 3222", "3782 822463 10005", "371449635398431", "6011 1111 1111 1117", "6011-0009-9013-9424",
    "3056 930902 5904", "38520000023237", "3530 1113 3330 0000", "3566002020360505", "6200 0000 0000 0005",
    "4000 0566 5566 5556", "5200 8282 8282 8210", "4242424242424242", "4000 0025 0000 3155", "5425 2334 3010 9903",
    "2222 4000 7000 0005", "3400 000000 00009", "6011 0000 0000 0004", "4917 6100 0000 0000", "4988 4388 4388 4305",
]
CARD_SENTENCES = [
    "Card number: {}, exp 09/27.", "I paid with {} yesterday.", "Please charge {} for the renewal.",
    "The last order used {} (Visa?).",
]


def _iban(country: str, bban: str) -> str:
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


_BBANS = [
    ("DE", "370400440532013000"), ("GB", "WEST12345698765432"), ("FR", "20041010050500013M02606"),
    ("ES", "21000418450200051332"), ("IT", "X0542811101000000123456"), ("NL", "ABNA0417164300"),
    ("BE", "539007547034"), ("CH", "00762011623852957"), ("AT", "1904300234573201"),
    ("PL", "109010140000071219812874"), ("SE", "50000000058398257466"), ("NO", "86011117947"),
    ("DK", "00400440116243"), ("FI", "12345600000785"), ("IE", "AIBK93115212345678"),
    ("PT", "000201231234567890154"), ("LU", "0019400644750000"), ("CZ", "08000000192000145399"),
    ("HU", "117730161111101800000000"), ("RO", "AAAA1B31007593840000"), ("HR", "10010051863000160"),
    ("GR", "01101250000000012300695"), ("AE", "0331234567890123456"), ("TR", "0006100519786457841326"),
    ("DE", "500105175407324931"), ("GB", "NWBK60161331926819"),
]
IBAN_SENTENCES = ["IBAN: {}", "Please transfer the deposit to {} by Friday.", "Konto {}, BIC COBADEFFXXX."]

IPS = [
    "203.0.113.42", "198.51.100.7", "192.168.1.20", "10.0.0.5", "172.16.254.1", "8.8.8.8", "81.2.69.160",
    "185.199.108.153", "54.239.28.85", "100.64.0.17", "212.58.244.22", "91.198.174.192", "45.33.32.156",
    "2001:db8::8a2e:370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "fe80::1ff:fe23:4567:890a",
    "2a03:2880:f12f:83:face:b00c:0:25de", "2606:4700:4700::1111", "2001:4860:4860::8888", "fd12:3456:789a:1::1",
    "2a00:1450:4001:82b::200e", "64.233.160.0", "151.101.1.69", "13.107.42.14", "77.88.55.242",
]
IP_SENTENCES = ["The login came from {} and was blocked.", "Server IP: {}", "ping {} returns nothing.",
                "Whitelist {} in the firewall, please."]

SSNS = ["536-22-8145", "412-73-9021", "219-09-9998", "321-54-9876", "601-28-4473", "045-67-1290",
        "778-12-3345", "150-90-2281", "287-65-4321", "508-33-7712", "634-02-5519", "099-44-1287"]
SSN_SENTENCES = ["SSN: {}", "My social security number is {}.", "Employee SSN {} on file."]


def _secrets() -> list[tuple[str, str]]:
    """(sentence template, secret) pairs; random but fixed by the seed."""
    rng = random.Random(7)

    def chars(alphabet: str, n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    def b64url(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    alnum, upper = string.ascii_letters + string.digits, string.ascii_uppercase + string.digits
    jwts = [f"{b64url({'alg': alg, 'typ': 'JWT'})}.{b64url({'sub': str(rng.randrange(10**9)), 'name': name, 'iat': 1716000000 + i})}."
            f"{chars(alnum + '-_', 43)}" for i, (alg, name) in enumerate(
                [("HS256", "Jane Doe"), ("RS256", "Ravi"), ("ES256", "Kenji"), ("HS512", "Anna"), ("RS256", "Li"),
                 ("HS256", "Omar"), ("PS256", "Sofia"), ("HS384", "Tom")])]
    key_body = "\n".join(chars(alnum + "+/", 64) for _ in range(5))
    return [
        ("Authorization: Bearer {}", jwts[0]),
        ("Authorization: {}", jwts[1]),
        ("authorization: bearer {}", jwts[2]),
        ('{{"access_token": "{}", "expires_in": 3600}}', jwts[3]),
        ("curl -H 'Authorization: Bearer {}' https://api.example.com/v1/me", jwts[4]),
        ("Set-Cookie: session={}; HttpOnly", jwts[5]),
        ("https://app.example.com/callback?token={}", jwts[6]),
        ("AUTHORIZATION: BEARER {}", jwts[7]),
        ("Authorization: Bearer {}", chars(string.hexdigits.lower()[:16], 40)),
        ("headers = {{'Authorization': 'Bearer {}'}}", chars(alnum + "-._~", 32)),
        ("aws_access_key_id = {}", "AKIA" + chars(upper, 16)),
        ("export AWS_ACCESS_KEY_ID={}", "AKIA" + chars(upper, 16)),
        ("temporary key {} expires soon", "ASIA" + chars(upper, 16)),
        ("the key {} was committed to the repo", "AKIA" + chars(upper, 16)),
        ("git clone https://{}@github.com/acme/app.git", "ghp_" + chars(alnum, 36)),
        ("GITHUB_TOKEN={}", "ghp_" + chars(alnum, 36)),
        ("oauth token {} revoked", "gho_" + chars(alnum, 36)),
        ("token: {}", "github_pat_" + chars(alnum, 22) + "_" + chars(alnum, 59)),
        ("OPENAI_API_KEY={}", "sk-" + chars(alnum, 48)),
        ("openai.api_key = '{}'", "sk-proj-" + chars(alnum + "_-", 64)),
        ("use the key {} for the batch job", "sk-" + chars(alnum, 48)),
        ("SLACK_BOT_TOKEN={}", f"xoxb-{rng.randrange(10**11, 10**12)}-{rng.randrange(10**12, 10**13)}-{chars(alnum, 24)}"),
        ("slack user token {} leaked", f"xoxp-{rng.randrange(10**11, 10**12)}-{rng.randrange(10**11, 10**12)}-{chars(alnum, 32)}"),
        ("Here is my key:\n{}\nplease keep it safe",
         f"-----BEGIN RSA PRIVATE KEY-----\n{key_body}\n-----END RSA PRIVATE KEY-----"),
        ("{}", f"-----BEGIN OPENSSH PRIVATE KEY-----\n{key_body[:200]}\n-----END OPENSSH PRIVATE KEY-----"),
        ("key.pem:\n{}", f"-----BEGIN PRIVATE KEY-----\n{key_body[100:300]}\n-----END PRIVATE KEY-----"),
    ]


def _aws_secret() -> list[tuple[str, str, str]]:
    # The rule keeps the "aws_secret_access_key = " prefix, so the value is the 40 characters after it.
    rng = random.Random(11)
    alphabet = string.ascii_letters + string.digits + "/+"
    return [(f"{name}{sep}{{}}", "".join(rng.choice(alphabet) for _ in range(40)), "secret")
            for name, sep in (("aws_secret_access_key", " = "), ("AWS_SECRET_ACCESS_KEY", "="),
                              ("aws_secret_access_key", ": "))]


def _gitleaks_secrets() -> list[tuple[str, str, str]]:
    """The formats of gitleaks' rules (see kubetune/data/pii.py): (sentence template, value, type). Where
    the rule keeps context (AccountKey=, the URL around a password), the value is what is redacted."""
    rng = random.Random(13)

    def chars(alphabet: str, n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    alnum, upper = string.ascii_letters + string.digits, string.ascii_uppercase + string.digits
    b64, password, lower_digits = alnum + "+/", alnum + "!-_.~+=%", string.ascii_lowercase + string.digits
    slack_path = f"T{chars(upper, 8)}/B{chars(upper, 10)}/{chars(alnum, 24)}"
    secret = [
        ("HF_TOKEN={}", "hf_" + chars(string.ascii_letters, 34)),
        ("huggingface-cli login --token {}", "hf_" + chars(string.ascii_letters, 34)),
        ("login(token='{}') then push the model", "hf_" + chars(alnum, 34)),
        ("GOOGLE_API_KEY={}", "AIza" + chars(alnum + "_-", 35)),
        ("https://maps.googleapis.com/maps/api/geocode/json?address=Berlin&key={}", "AIza" + chars(alnum + "_-", 35)),
        ("stripe.api_key = '{}'", "sk_live_" + chars(alnum, 24)),
        ("STRIPE_SECRET_KEY={}", "sk_test_" + chars(alnum, 99)),
        ("the restricted key {} can only read charges", "rk_live_" + chars(alnum, 24)),
        ("GITLAB_TOKEN={}", "glpat-" + chars(alnum + "_-", 20)),
        ("git clone https://oauth2:{}@gitlab.com/acme/app.git", "glpat-" + chars(alnum, 20)),
        ("token {} (routable)", "glpat-" + chars(alnum + "_-", 27) + "." + chars(lower_digits, 9)),
        ("//registry.npmjs.org/:_authToken={}", "npm_" + chars(alnum, 36)),
        ("NPM_TOKEN={} npm publish", "npm_" + chars(alnum, 36)),
        ("curl -X POST -d '{{\"text\": \"deployed\"}}' {}", "https://hooks.slack.com/services/" + slack_path),
        ("SLACK_WEBHOOK_URL={}", "https://hooks.slack.com/services/" + slack_path.replace("/B", "/B0")),
        ("the workflow posts to {} on every release",
         f"https://hooks.slack.com/workflows/T{chars(upper, 10)}/A{chars(upper, 10)}/{rng.randrange(10**17, 10**18)}/"
         f"{chars(alnum, 24)}"),
        ("trigger: {}", f"https://hooks.slack.com/triggers/T{chars(upper, 8)}/{rng.randrange(10**12, 10**13)}/"
                        f"{chars('0123456789abcdef', 32)}"),
    ]
    keep_context = [
        ("AZURE_STORAGE_CONNECTION_STRING=DefaultEndpointsProtocol=https;AccountName=acmestore;AccountKey={};"
         "EndpointSuffix=core.windows.net", chars(b64, 86) + "=="),
        ("conn = 'DefaultEndpointsProtocol=https;AccountName=logs01;AccountKey={}'", chars(b64, 86) + "=="),
        ("DATABASE_URL=postgres://app:{}@db.internal:5432/app", chars(password, 16)),
        ("mysql://root:{}@mysql.shop.svc:3306/shop", chars(password, 12)),
        ("REDIS_URL=redis://:{}@cache:6379/0", chars(password, 20)),
        ("broker_url = 'amqp://guest:{}@rabbit.example.com:5672//'", chars(password, 14)),
        ("git clone https://alice:{}@git.example.com/acme/app.git", "ghp_" + chars(alnum, 36)),
        ("mongodb+srv://admin:{}@cluster0.abcde.mongodb.net/?retryWrites=true", chars(password, 18)),
    ]
    return [(t, v, "secret") for t, v in secret + keep_context]


LOOKALIKES = [
    # dates and times
    "The meeting is on 2024-05-17.", "Released 17.05.2024 in Berlin.", "Due date: 05/17/2024.",
    "Invoice date 17/05/2024, payable in 30 days.", "Deadline 2024/05/17 at noon.", "Shipped 20240517 from warehouse 3.",
    "On May 17, 2024 we launched v2.", "Logged at 2024-05-17T14:30:00Z by the scheduler.",
    "Last seen 2024-05-17 14:30:00 UTC.", "Date: Mon, 17 May 2024 14:30:00 +0200", "Valid 17-05-2024 to 16-05-2025.",
    "We met on 5/17/24 for lunch.", "Effective 17.5.2024.", "Period 2019-2024 saw growth.", "Fiscal year FY2023/24 closed.",
    "ISO week 2024-W20 starts Monday.", "Open 09:00-17:30 daily.", "The train leaves at 14:45:00.",
    "Lap time 1:23.456 was a record.", "Duration 00:03:25.120 in total.", "Uptime 12:34:56 since reboot.",
    "Between 10:30 and 11:45 on 2024-05-17.", "Timestamps 1715950200 and 1715953800 differ by an hour.",
    "Epoch millis 1715950200123.",
    # versions and builds
    "Upgrade to 1.2.3 first.", "Python 3.11.7 is installed.", "Pinned pydantic==2.14.3.", "Windows 10.0.19045.3803 needs a patch.",
    "Chrome 124.0.6367.207 fixed it.", "Kernel 6.8.0-31-generic boots fine.", "Requires numpy>=2.1,<3.",
    "Tag 1.0.0-rc.1+build.5 is out.", "Android 14 (build UP1A.231005.007).", "macOS 14.4.1 (23E224) is current.",
    "Node 20.11.1 LTS.", "Firmware 4.19.2-20240517 is signed.", "Build 2024.05.17.1 passed CI.",
    "OID 1.3.6.1.4.1.311.21.7 is Microsoft's.", "version 999.1.1.1 is not an IP", "See section 4.2.1.3 of the spec.",
    # prices and amounts
    "It costs $1,299.99 plus tax.", "Only €49.90 this week.", "Preis: 1.299,00 € inkl. MwSt.", "Tickets are ¥12,800 each.",
    "The flat sold for £1,250,000.", "Budget USD 2,450,000.00 approved.", "Revenue ₹1,23,456.78 in May.",
    "Az ár 1 299 999 Ft.", "Total: 12 345 678,90 kr.", "Payouts of $ 1,000,000 and $ 2,500,000.",
    # order, invoice, reference numbers
    "Order #100234 has shipped.", "Your order ORD-2024-55678 is on its way.", "Amazon order 114-3941689-8772232.",
    "Invoice INV-2023-000123 is overdue.", "Invoice no. 2024/00042 attached.", "PO-884123 approved.",
    "Support case 00123456 closed.", "Ticket #48213 reopened.", "Ref: 7XK-22-0193.", "Reservation code QX7P2L.",
    "Customer ID 88-1234567 updated.", "RMA 2024-05-001234 received.", "Quote Q-2024-0042 accepted.",
    "Booking reference 1234-5678-9012-34.", "Purchase order 4503927781 was released.", "Invoice 2024051734 is due.",
    "Case number 2024-CV-001234 filed.", "Claim 12-345678-90 is being processed.", "Batch LOT 230517-A12 recalled.",
    "Serial number SN 7H2K-9QX4-LM3P.",
    # ISBNs
    "ISBN 978-3-16-148410-0", "ISBN-10: 0-306-40615-2", "ISBN 9780306406157 is in stock.", "ISBN 0-19-852663-6.",
    "ISBN 1-56619-909-3", "ISBN 978-1-4028-9462-6", "ISBN: 3-598-21500-2", "ISBN 978-0-262-03384-8 (3rd ed.)",
    # tracking numbers
    "UPS 1Z999AA10123456784 delivered.", "USPS 9400 1000 0000 0000 0000 00.", "FedEx 7489 2342 1234 in transit.",
    "DHL JJD000390007211870 delayed.", "Royal Mail AB123456789GB arrived.", "Tracking 420902109400111899560868.",
    "PostNL 3SABCD123456789 picked up.", "DHL Paket 00340434161094042557.",
    # screen, measurements, numbers
    "Resolution 1920x1080 at 60 Hz.", "Set it to 2560 x 1440.", "A 3840×2160 panel.", "Aspect ratio 16:9.",
    "The marathon is 42.195 km.", "Population 8,336,817 in 2022.", "1,234,567 users signed up.",
    "pi is 3.14159265358979.", "Avogadro 6.022e23.", "Tolerance 0.000123456 m.", "Body temperature 98.6°F.",
    "Growth of 12.5% year on year.", "load average: 5.38, 4.53, 2.17", "lat 48.858370, lon 2.294481",
    "40.7128° N, 74.0060° W is New York.", "The file is 1 048 576 bytes.", "2^32 = 4294967296.", "Scores 3-1, 2-2 and 0-4.",
    "Pages 123-145 and 201-219.", "Items 1, 2, 3, 4, 5, 6, 7 and 8.", "Ports 10000-20000 are open.",
    "Lottery numbers 4 8 15 16 23 42.", "Invoice total 1.234.567,00 EUR.", "IDs 1023, 1024, 1025 and 1026.",
    "Scale 1:100000.", "Routing number 021000021.", "Patent US 10,123,456 B2.", "PMID 31452104.",
    "DOI 10.1038/s41586-020-2649-2.", "arXiv:2106.09685", "Flight LH 400 departs 13:05 from gate B42.",
    "Temperatures 21.5, 22.0, 22.4 and 23.1 °C.",
    # identifiers and codes
    "UUID 123e4567-e89b-12d3-a456-426614174000.", "Commit 9fceb02d0ae598e95dc970b74767f19372d61af8 fixed it.",
    "Short sha 3f2a9c1.", "MAC 00:1A:2B:3C:4D:5E on eth0.", "Color #1a2b3c.", "Listening on port 8080.",
    "Open localhost:3000 in the browser.", "Error 0x80070005 means access denied.", "HTTP 404 Not Found.",
    "CVE-2024-3094 affects xz.", "RFC 6750 defines bearer tokens.", "AS13335 is Cloudflare.",
    "SKU 4006381333931 out of stock.", "EAN 5901234123457.", "GTIN 00012345678905.", "ZIP 90210.",
    "Postcode SW1A 1AA.", "PLZ 10115 Berlin.", "Room 1204, floor 12.", "Dial extension 4321.",
    "Bible verse John 3:16.", "Ratio 1:2:3.",
    # look like e-mail, card, IBAN, SSN, secrets
    "Follow @jane_doe for updates.", "Run npm i lodash@4.17.21.", "Use the @dataclass decorator.",
    "Install @types/node@20.11.1.", "Order 4111 1111 1111 1112 failed (fails Luhn).",
    "Gift card 6035 7102 3456 7891.", "Serial 1234 5678 9012 3456.", "BIC COBADEFFXXX.", "SWIFT DEUTDEDBFRA.",
    "VAT ID DE123456789.", "VAT GB123456789.", "Part no. GB12 ABCD 1234.", "Part 123-45-678.", "ZIP+4 90210-1234.",
    "Model 123-456-78901.", "The AKIA prefix marks AWS access keys.", "Use 'Authorization: Bearer <token>' here.",
    "Authorization: Bearer $TOKEN", "The ghp_ prefix marks GitHub tokens.", "A JWT starts with eyJ.",
    "Bearer tokens are defined in RFC 6750.", "Set OPENAI_API_KEY=sk-... in .env.",
    "-----BEGIN PUBLIC KEY----- is safe to share.", "Install scikit-learn with pip.",
    # look like the secrets of gitleaks' rules
    "Install hf_transfer to speed up downloads.", "Set HF_HUB_ENABLE_HF_TRANSFER=1 before hf_hub_download().",
    "Google API keys start with AIza and are 39 characters long.",
    "The sk_live prefix marks live Stripe keys; use sk_test_ keys in CI.", "Restricted keys (rk_live_...) limit a key.",
    "GitLab personal access tokens start with glpat-.", "npm_config_cache and npm_package_version are set by npm run.",
    "Create an incoming webhook at https://api.slack.com/messaging/webhooks.",
    "Post to hooks.slack.com/services/ with your webhook path.",
    "AccountKey= is left empty for SAS connection strings.",
    "Replace AccountKey=<key> with your storage key.", "Clone https://github.com/acme/app.git over HTTPS.",
    "Open https://example.com:8443/login?next=/home in a browser.",
    "DATABASE_URL=postgres://app:${DB_PASSWORD}@db:5432/app", "Logged as postgres://app:****@db/app.",
]


def labelled_set() -> tuple[list[tuple[str, str, str]], list[str]]:
    """(sentence, PII value, type) for each PII string, and the look-alike sentences."""
    pii: list[tuple[str, str, str]] = []

    def add(values: list[str], sentences: list[str], kind: str) -> None:
        pii.extend((sentences[i % len(sentences)], v, kind) for i, v in enumerate(values))

    add(EMAILS, EMAIL_SENTENCES, "email")
    add(PHONES, PHONE_SENTENCES, "phone")
    add(CARDS, CARD_SENTENCES, "card")
    ibans = [_iban(country, bban) for country, bban in _BBANS]
    # every other one printed in groups of four, as on paper
    add([iban if i % 2 else " ".join(iban[k : k + 4] for k in range(0, len(iban), 4)) for i, iban in enumerate(ibans)],
        IBAN_SENTENCES, "iban")
    add(IPS, IP_SENTENCES, "ip")
    add(SSNS, SSN_SENTENCES, "ssn")
    pii.extend((sentence, value, "secret") for sentence, value in _secrets())
    pii.extend(_aws_secret())
    pii.extend(_gitleaks_secrets())
    return [(sentence.format(value), value, kind) for sentence, value, kind in pii], LOOKALIKES


def kubetune_redact(text: str) -> str:
    return Scrubber(TYPES).scrub(text)


def presidio_redactor() -> Callable[[str], str]:
    from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, EmailRecognizer, IbanRecognizer,
                                                          IpRecognizer, PhoneRecognizer, UsSsnRecognizer)

    kinds = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "CREDIT_CARD": "card", "IBAN_CODE": "iban",
             "IP_ADDRESS": "ip", "US_SSN": "ssn"}
    recognizers = [EmailRecognizer(), PhoneRecognizer(), CreditCardRecognizer(), IbanRecognizer(), IpRecognizer(),
                   UsSsnRecognizer()]

    def redact(text: str) -> str:
        results = [r for rec in recognizers for r in rec.analyze(text, rec.supported_entities, None) if r.score > 0]
        kept = []
        for r in sorted(results, key=lambda r: (-r.score, r.start - r.end)):
            if all(r.end <= k.start or k.end <= r.start for k in kept):
                kept.append(r)
        for r in sorted(kept, key=lambda r: -r.start):
            text = text[: r.start] + PLACEHOLDER[kinds[r.entity_type]] + text[r.end :]
        return text

    return redact


def evaluate(redact: Callable[[str], str], pii, lookalikes) -> dict:
    """found[type] = [found, total]; flagged[type] = look-alikes with that placeholder; plus errors."""
    found = {t: [0, 0] for t in TYPES}
    flagged = {t: 0 for t in TYPES}
    misses, false_positives = [], []
    for text, value, kind in pii:
        out = redact(text)
        ok = out == text.replace(value, PLACEHOLDER[kind])
        found[kind][0] += ok
        found[kind][1] += 1
        if not ok:
            misses.append((kind, text, out))
    for text in lookalikes:
        out = redact(text)
        if out != text:
            false_positives.append((text, out))
            for t in TYPES:
                flagged[t] += PLACEHOLDER[t] in out
    return {"found": found, "flagged": flagged, "misses": misses, "false_positives": false_positives,
            "changed": len(false_positives)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--show-errors", action="store_true", help="print each miss and false positive")
    args = parser.parse_args()
    pii, lookalikes = labelled_set()
    detectors = {"kubetune": kubetune_redact}
    try:
        detectors["presidio"] = presidio_redactor()
    except ImportError:
        print("presidio-analyzer not installed (pip install -e '.[bench]'): kubetune only")
    results, seconds = {}, {}
    for name, redact in detectors.items():
        start = time.perf_counter()
        results[name] = evaluate(redact, pii, lookalikes)
        seconds[name] = time.perf_counter() - start

    n_look = len(lookalikes)
    print(f"{len(pii)} PII strings in {len(TYPES)} types, {n_look} look-alikes; "
          + ", ".join(f"{name} {s:.2f} s" for name, s in seconds.items()))
    head = f"{'type':8s} {'n':>4s}" + "".join(f"  {name + ' recall':>22s}  {name + ' FP':>16s}" for name in results)
    print(head)
    print("-" * len(head))
    for t in TYPES:
        row = f"{t:8s} {results['kubetune']['found'][t][1]:4d}"
        for name, r in results.items():
            got, total = r["found"][t]
            if name == "presidio" and t == "secret":
                row += f"  {'no recognizer':>22s}  {'-':>16s}"
                continue
            row += f"  {got / total:9.3f} ({got:3d}/{total:3d})  {r['flagged'][t] / n_look:7.1%} ({r['flagged'][t]:3d})"
        print(row)
    print("-" * len(head))
    for label, types in (("all", TYPES), ("no secret", [t for t in TYPES if t != "secret"])):
        row = f"{label:9s}{sum(results['kubetune']['found'][t][1] for t in types):4d}"
        for name, r in results.items():
            got, total = (sum(r["found"][t][i] for t in types) for i in (0, 1))
            flagged_any = r["changed"] if label == "all" else sum(
                any(PLACEHOLDER[t] in out for t in types) for _, out in r["false_positives"])
            row += f"  {got / total:9.3f} ({got:3d}/{total:3d})  {flagged_any / n_look:7.1%} ({flagged_any:3d})"
        print(row)
    print(f"FP = share of the {n_look} look-alikes given a placeholder of that type (rows 'all' and "
          f"'no secret': of any of those types); recall = PII strings replaced whole, with the right placeholder.")
    if args.show_errors:
        for name, r in results.items():
            for kind, text, out in r["misses"]:
                print(f"[{name}] miss {kind}: {text!r} -> {out!r}")
            for text, out in r["false_positives"]:
                print(f"[{name}] false positive: {text!r} -> {out!r}")


if __name__ == "__main__":
    main()
