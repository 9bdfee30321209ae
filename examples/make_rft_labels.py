"""Write examples/rft-labels.jsonl: support tickets to route, in OpenAI's reinforcement format, and
examples/rft-warmup.jsonl: other tickets for a supervised warm-up.

Each line's prompt is a ticket; its keyword (invoice, parcel, password, ...) implies the team, and the item
field ``label`` holds that team's letter: A (billing), B (shipping) or C (account). A grader checks the
model's one-letter answer against ``{{item.label}}`` (examples/rft-job.yaml). The prompt does not say which
letter is which team: the model learns that from the grades alone.

The warm-up stands in for a pretrained chat model, which is where reinforcement fine-tuning starts
(examples/rft-warmup.yaml): half of its lines ask which team handles a ticket and are answered with the
team's name (billing, shipping, account): what a pretrained model knows. The other half are the routing
prompt answered with a letter picked at random: the reply's shape (one letter, then the end of the turn),
but not which letter is which team. Run: python examples/make_rft_labels.py
"""

import json
import random
from pathlib import Path

TEAMS = {"A": ["invoice", "refund", "charge", "payment", "receipt", "subscription fee"],
         "B": ["parcel", "delivery", "courier", "tracking number", "package", "shipment"],
         "C": ["password", "login", "username", "profile", "two-factor code", "account settings"]}
OPENINGS = ["Hi there,", "Hello,", "Good morning.", "Hey team,", "Dear support,", "Quick question:", "Urgent:", ""]
PROBLEMS = ["a problem with my {kw}", "I have a problem with the {kw}", "something is off with my {kw}",
            "can you check the {kw}", "I was confused by the {kw}", "please help with my {kw}",
            "a question about the {kw}", "what happened to the {kw}"]  # the keyword last: a tiny model learns it sooner
SYSTEM = "Route the ticket: reply with the letter of its team."
ASK = "Name the team that handles the ticket."
NAMES = {"A": "billing", "B": "shipping", "C": "account"}


def ticket(rng: random.Random) -> dict:
    label = rng.choice(sorted(TEAMS))
    opening, problem = rng.choice(OPENINGS), rng.choice(PROBLEMS).format(kw=rng.choice(TEAMS[label])) + "."
    if opening.endswith(".") or not opening:
        problem = problem[0].upper() + problem[1:]
    text = f"{opening} {problem}".strip()
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}], "label": label}


def warmup(rng: random.Random, i: int) -> dict:
    """Every other line the team's name for a ticket, else the routing prompt with a random letter."""
    prompt = ticket(rng)
    if i % 2:
        return {"messages": [{"role": "system", "content": ASK}, prompt["messages"][1],
                             {"role": "assistant", "content": NAMES[prompt["label"]]}]}
    return {"messages": prompt["messages"] + [{"role": "assistant", "content": rng.choice(sorted(TEAMS))}]}


if __name__ == "__main__":
    here = Path(__file__).parent  # not in data/: the quickstart trains on all of it
    for name, make, seed, count in (("rft-labels", lambda rng, _: ticket(rng), 7, 700), ("rft-warmup", warmup, 8, 600)):
        rng = random.Random(seed)
        lines = [json.dumps(make(rng, i)) for i in range(count)]
        (here / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} lines to {here / name}.jsonl")
