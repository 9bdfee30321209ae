"""Write the bundled example data: customer support for "Nimbus Notes", a fictional note-taking app.

    python examples/generate_support_data.py      # rewrites examples/data/*.jsonl

Deterministic (seeded). It plants what a real support export contains, so the data report has
something to show: exact duplicates (the same ticket exported twice), near duplicates (a macro
reply with a changed word), and personal data (emails, phone numbers, card numbers, IP addresses,
an AWS key pasted by a user). All personal data here is made up; the card numbers are test numbers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "data"
SYSTEM = "You are Nimbus, the support assistant for Nimbus Notes. Answer briefly and precisely."

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emre", "Fatima", "Goran", "Hana", "Ivan", "Jules", "Kofi", "Lena", "Mateo",
         "Nora", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tomas", "Uma", "Viktor", "Wen", "Yara", "Zoe"]
DEVICES = ["iPhone", "Android phone", "iPad", "Windows laptop", "MacBook", "Chromebook", "Linux desktop"]
PLANS = ["Free", "Plus", "Pro", "Teams"]
OPENERS = ["Hi,", "Hello,", "Hey there,", "Good morning,", "Hi team,", "", "Quick question:", "Help please,"]
CLOSERS = ["", " Thanks!", " Thank you.", " Any idea?", " This is urgent.", " Cheers."]

# topic: (user problem phrasings, reply facts [alternatives per slot], follow-up question, follow-up answers)
TOPICS = {
    "sync": (
        ["my notes are not syncing between my {device} and the web app",
         "changes I make on my {device} don't show up on my other devices",
         "sync seems stuck on my {device}, the spinner never stops"],
        [["Sync problems are usually fixed by signing out and back in.",
          "Most sync issues clear up after a fresh sign-in.",
          "Let's get your sync going again."],
         ["Open Settings > Account > Sign out, then sign in with the same account.",
          "Go to Settings > Account, tap Sign out, and sign back in.",
          "Sign out from Settings > Account and sign in again."],
         ["Your notes are stored in the cloud, so nothing is lost.",
          "Nothing is deleted when you sign out; notes come back from the cloud.",
          "Your notes stay safe on our servers while you do this."],
         ["If it still fails, check that the app is on version 8.2 or newer.",
          "If the problem stays, update Nimbus Notes to 8.2 or later.",
          "Still stuck? Version 8.2 fixed a sync bug, so please update."]],
        "How long does a full sync take?",
        ["A full sync usually finishes within two minutes for up to 5,000 notes.",
         "For most accounts a full sync takes under two minutes."],
    ),
    "export": (
        ["how do I export all my notes?", "I want to download a backup of everything I wrote",
         "can I export my notebooks to PDF or Markdown?"],
        [["You can export everything from the web app.", "Exports are done from the web app.",
          "Sure, exporting takes a few clicks."],
         ["Go to Settings > Data > Export and pick Markdown, PDF or HTML.",
          "Open Settings > Data > Export, then choose Markdown, PDF or HTML.",
          "In Settings > Data > Export you can choose Markdown, PDF or HTML."],
         ["We email you a download link when the archive is ready.",
          "A download link arrives by email once the export is done.",
          "You'll get an email with the link when the ZIP is ready."],
         ["Links stay valid for 7 days.", "The link expires after 7 days.", "Please download it within 7 days."]],
        "Are attachments included?",
        ["Yes, images and PDFs attached to notes are included in the ZIP.",
         "Yes, attachments are exported in an attachments folder inside the ZIP."],
    ),
    "billing": (
        ["I was charged twice for my {plan} subscription this month",
         "there is a double charge for Nimbus {plan} on my statement",
         "why did you bill me two times for the {plan} plan?"],
        [["Sorry about the double charge.", "I'm sorry you were billed twice.", "Apologies for the duplicate charge."],
         ["The second charge is a pending authorization from your bank and drops off within 5 business days.",
          "One of the two is a temporary bank authorization that disappears within 5 business days.",
          "Usually the second one is only a pending hold, released by your bank in up to 5 business days."],
         ["If it is still there after that, reply here and we refund it the same day.",
          "If it hasn't gone by then, let us know and we'll refund it right away.",
          "Should it remain, we will refund it the same day you tell us."]],
        "Can I get an invoice?",
        ["Invoices are under Settings > Billing > Invoices, as PDF.",
         "You can download every invoice as a PDF from Settings > Billing."],
    ),
    "password": (
        ["I forgot my password and can't log in on my {device}",
         "the password reset email never arrives",
         "how do I reset my Nimbus password?"],
        [["You can reset it from the sign-in screen.", "Password resets start on the sign-in page.",
          "No problem, resetting takes a minute."],
         ["Tap 'Forgot password?' and enter your account email.",
          "Choose 'Forgot password?' and type the email of your account.",
          "Use the 'Forgot password?' link and enter your email address."],
         ["The reset email comes from no-reply@nimbusnotes.example and can take 10 minutes.",
          "Look for a message from no-reply@nimbusnotes.example; it may take up to 10 minutes.",
          "The email is sent by no-reply@nimbusnotes.example within about 10 minutes."],
         ["Check your spam folder too.", "If it's not in your inbox, check spam.", "It sometimes lands in spam."]],
        "The link says it expired.",
        ["Reset links are valid for one hour; request a new one and use it right away.",
         "Links expire after 60 minutes, so please request a fresh link."],
    ),
    "sharing": (
        ["how can I share a notebook with my team?", "can I let a colleague edit one of my notebooks?",
         "what is the difference between view and edit sharing?"],
        [["Sharing works per notebook.", "You share whole notebooks, not single notes.",
          "Notebooks can be shared with anyone who has a Nimbus account."],
         ["Open the notebook, click Share, and enter their email.",
          "Click Share at the top of the notebook and add their email address.",
          "Use the Share button on the notebook and type the person's email."],
         ["Choose 'Can view' for read-only access or 'Can edit' to let them change notes.",
          "'Can view' is read-only; 'Can edit' lets them add and change notes.",
          "Pick 'Can edit' for collaborators or 'Can view' for readers."],
         ["Sharing with edit rights needs the Plus plan or higher.",
          "Edit sharing is available on Plus, Pro and Teams.",
          "The Free plan can share view-only; editing needs Plus or above."]],
        "Can I remove someone later?",
        ["Yes, open Share again and click Remove next to their name.",
         "Yes, in the Share dialog use Remove next to the person."],
    ),
    "offline": (
        ["does Nimbus work offline on my {device}?", "I'm flying tomorrow, can I read my notes without internet?",
         "how do I make notebooks available offline?"],
        [["Yes, Nimbus works offline.", "Offline mode is supported on every app.", "You can use Nimbus without a connection."],
         ["Right-click a notebook and choose 'Make available offline'.",
          "Turn on 'Make available offline' in the notebook menu.",
          "Open the notebook menu and enable 'Make available offline'."],
         ["Edits made offline sync automatically when you are back online.",
          "Changes you make offline are synced when the connection returns.",
          "Everything you edit offline uploads once you reconnect."],
         ["Offline notebooks are a Plus feature.", "This needs Plus or a higher plan.", "Offline access is included from Plus up."]],
        "Is there a size limit?",
        ["Offline notebooks can hold up to 2 GB on mobile and no limit on desktop.",
         "Mobile apps keep up to 2 GB offline; desktop apps have no limit."],
    ),
    "delete": (
        ["I want to delete my account and all my data", "please close my Nimbus account",
         "how do I permanently remove my data from Nimbus?"],
        [["We can help with that.", "Sorry to see you go.", "Understood."],
         ["Go to Settings > Account > Delete account and confirm with your password.",
          "Use Settings > Account > Delete account and confirm with your password.",
          "In Settings > Account choose Delete account, then confirm with your password."],
         ["Your notes are kept in the trash for 30 days, then erased for good.",
          "Data is erased permanently after a 30-day grace period.",
          "After 30 days everything is deleted permanently."],
         ["Export first if you want a copy.", "Consider exporting your notes first.", "Remember to export anything you want to keep."]],
        "Can I undo it?",
        ["Yes, signing in within 30 days restores the account.",
         "Within the 30 days you can sign in again to cancel the deletion."],
    ),
    "twofactor": (
        ["how do I turn on two-factor authentication?", "I lost the phone with my authenticator app",
         "is 2FA available for Nimbus accounts?"],
        [["Two-factor authentication protects your account with a second step.",
          "2FA is available on all plans.", "Good idea to turn it on."],
         ["Enable it in Settings > Security > Two-factor and scan the QR code with an authenticator app.",
          "Go to Settings > Security > Two-factor and scan the QR code.",
          "Open Settings > Security, choose Two-factor, and scan the QR code with your app."],
         ["Save the 10 recovery codes shown at the end.", "Keep the 10 recovery codes somewhere safe.",
          "Store your recovery codes; each works once."],
         ["A recovery code lets you sign in if you lose your phone.",
          "If the phone is lost, sign in with a recovery code.",
          "Lost phones are handled with a recovery code."]],
        "I don't have the recovery codes either.",
        ["Then contact us from your account email and we verify your identity before removing 2FA.",
         "Write to us from the account email; after an identity check we disable 2FA."],
    ),
}

PII_LINES = [
    "My account email is {name_l}.{n}@mailbox.example if you need it.",
    "You can call me at +1 415 555 {n4}.",
    "My card is 4111 1111 1111 1111, the charge was on that one.",
    "The card ending in 4242 is 4242-4242-4242-4242.",
    "I'm connecting from 203.0.113.{ip} if that helps.",
    "My IBAN for the refund is DE89 3704 0044 0532 0130 00.",
    "I pasted my config: aws_access_key_id = AKIAIOSFODNN7EXAMPLE.",
    "Reach me on 020 7946 {n4} during office hours.",
]


def _conversation(rng: random.Random, topic: str) -> dict:
    asks, slots, follow_q, follow_a = TOPICS[topic]
    name = rng.choice(NAMES)
    ask = rng.choice(asks).format(device=rng.choice(DEVICES), plan=rng.choice(PLANS))
    end = "" if ask.endswith("?") else "."
    user = f"{rng.choice(OPENERS)} {ask}{end}{rng.choice(CLOSERS)}".strip()
    user = user[0].upper() + user[1:]
    if rng.random() < 0.25:
        user += " " + rng.choice(PII_LINES).format(name_l=name.lower(), n=rng.randint(1, 99),
                                                   n4=rng.randint(1000, 9999), ip=rng.randint(1, 254))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                {"role": "assistant", "content": f"Hi {name}! {_reply(rng, slots)}"}]
    if rng.random() < 0.4:
        messages += [{"role": "user", "content": follow_q}, {"role": "assistant", "content": rng.choice(follow_a)}]
        if rng.random() < 0.3:  # an agent reply the team marked as not worth learning
            messages[2]["weight"] = 0
    # Real support threads have a long tail: most end quickly, a few go on through several topics.
    for _ in range(rng.choice([0, 0, 0, 0, 1, 1, 2, 3, 5])):
        other_asks, other_slots, _, _ = TOPICS[rng.choice(list(TOPICS))]
        ask = rng.choice(other_asks).format(device=rng.choice(DEVICES), plan=rng.choice(PLANS))
        messages += [{"role": "user", "content": f"{rng.choice(['One more thing:', 'Also,', 'Another question:'])} {ask}"},
                     {"role": "assistant", "content": _reply(rng, other_slots)}]
    return {"messages": messages}


def _reply(rng: random.Random, slots: list[list[str]]) -> str:
    return " ".join(rng.choice(options) for options in slots if rng.random() < 0.9 or options is slots[1])


def _near_duplicate(rng: random.Random, conv: dict) -> dict:
    messages = json.loads(json.dumps(conv["messages"]))
    reply = messages[2]["content"]
    for old, new in (("please", "kindly"), ("Please", "Kindly"), ("usually", "normally"), ("your", "the"), ("Hi", "Hello")):
        if old in reply:
            messages[2]["content"] = reply.replace(old, new, 1)
            break
    messages[1]["content"] = messages[1]["content"].rstrip(".!?") + "?"
    return {"messages": messages}


FAQ = [
    ("Explain how to export notes from Nimbus Notes.", "", "Open Settings > Data > Export in the web app, choose Markdown, PDF or HTML, and download the ZIP from the link we email you. Links stay valid for 7 days."),
    ("Which plans include offline notebooks?", "", "Offline notebooks are included in Plus, Pro and Teams. On mobile they can hold up to 2 GB."),
    ("Summarize the refund policy for duplicate charges.", "", "A second charge is usually a pending bank authorization that drops off within 5 business days; if it stays, we refund it the same day."),
    ("What does 'Can edit' mean when sharing?", "", "'Can edit' lets the person add and change notes in the shared notebook; 'Can view' is read-only."),
    ("Answer the customer.", "I lost my phone and my authenticator app.", "Sign in with one of your 10 recovery codes. If you don't have them, write to us from your account email and we will verify your identity before removing 2FA."),
    ("Answer the customer.", "How long does deleted data stay on your servers?", "Deleted accounts stay in the trash for 30 days and are then erased permanently."),
    ("Rewrite this reply in a friendlier tone.", "Reset your password via the sign-in page.", "No worries! Just tap 'Forgot password?' on the sign-in page and we'll email you a reset link within about 10 minutes."),
    ("List the export formats Nimbus supports.", "", "Markdown, PDF and HTML."),
    ("Which version fixed the sync bug?", "", "Version 8.2 fixed the sync bug, so update to 8.2 or newer."),
    ("How long is a password reset link valid?", "", "One hour. After that, request a new link."),
]


def main() -> None:
    rng = random.Random(7)
    OUT.mkdir(exist_ok=True)
    chats = [_conversation(rng, rng.choice(list(TOPICS))) for _ in range(320)]
    chats += [rng.choice(chats) for _ in range(16)]  # the same tickets exported twice
    chats += [_near_duplicate(rng, rng.choice(chats[:320])) for _ in range(16)]
    rng.shuffle(chats)
    with open(OUT / "support-chat.jsonl", "w") as f:
        for c in chats:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")

    faq = []
    for _ in range(6):  # each FAQ answer written by several agents with small differences
        for instruction, inp, output in FAQ:
            lead = rng.choice(["", "Sure. ", "Here you go: ", "Short answer: "])
            faq.append({"instruction": instruction, "input": inp, "output": lead + output})
    rng.shuffle(faq)
    with open(OUT / "support-faq.jsonl", "w") as f:
        for r in faq:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(chats)} conversations and {len(faq)} FAQ records to {OUT}")


if __name__ == "__main__":
    main()
