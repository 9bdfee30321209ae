"""Write examples/rft-labels.jsonl: support tickets to route, in OpenAI's reinforcement format.

Each line's prompt is a ticket; its keyword (invoice, parcel, password, ...) implies the team, and the item
field ``label`` holds that team's letter: A (billing), B (shipping) or C (account). A grader checks the
model's one-letter answer against ``{{item.label}}`` (examples/rft-job.yaml). Run: python examples/make_rft_labels.py
"""

import json
import random
from pathlib import Path

TEAMS = {"A": ["invoice", "refund", "charge", "payment", "receipt", "subscription fee"],
         "B": ["parcel", "delivery", "courier", "tracking number", "package", "shipment"],
         "C": ["password", "login", "username", "profile", "two-factor code", "account settings"]}
OPENINGS = ["Hi there,", "Hello,", "Good morning.", "Hey team,", "Dear support,", "Quick question:", "Urgent:", ""]
PROBLEMS = ["my {kw} is wrong", "I have a problem with the {kw}", "the {kw} never arrived", "something is off with "
            "my {kw}", "can you check the {kw}", "the {kw} does not work", "I was confused by the {kw}",
            "please help with my {kw}", "the {kw} looks strange", "what happened to the {kw}"]
CLOSINGS = ["Thanks!", "Regards, {name}", "Cheers, {name}", "Order {num}.", "Ticket {num}.", "Best, {name}", ""]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kira", "Luis", "Mona", "Nils"]


def ticket(rng: random.Random) -> dict:
    label = rng.choice(sorted(TEAMS))
    kw = rng.choice(TEAMS[label])
    text = " ".join(p for p in (rng.choice(OPENINGS), rng.choice(PROBLEMS).format(kw=kw) + ".",
                                rng.choice(CLOSINGS).format(name=rng.choice(NAMES), num=rng.randint(1000, 99999))) if p)
    return {"messages": [{"role": "system", "content": "Route the ticket: reply A (billing), B (shipping) or C (account)."},
                         {"role": "user", "content": text}], "label": label}


if __name__ == "__main__":
    rng = random.Random(7)
    lines = [json.dumps(ticket(rng)) for _ in range(700)]
    path = Path(__file__).parent / "rft-labels.jsonl"  # not in data/: the quickstart trains on all of it
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} prompts to {path}")
