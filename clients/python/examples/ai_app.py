#!/usr/bin/env python3
"""A tiny "AI app" metered by quotad.

For each prompt it reserves a token budget before the (simulated) LLM call,
switches to a cheaper model when quotad says "degrade", commits the tokens the
call really used, and tells the user when they are out of quota.

Run a daemon on the shipped quotad.toml (`cargo run --release` in the repo),
then:

    python examples/ai_app.py --url http://127.0.0.1:7878
    python examples/ai_app.py --socket ./quotad.sock
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import uuid
from datetime import datetime, timedelta, timezone

import quotad

PROMPTS = [
    ("Summarise this contract", 6000),
    ("Write a haiku about rate limits", 2000),
    ("Translate the user manual to French", 9000),
    ("Explain token buckets to a five-year-old", 4000),
    ("Draft the quarterly report", 8000),
    ("Rewrite the whole codebase in Rust", 150000),  # more than a day's quota
]


class ModelError(Exception):
    pass


def fake_llm(prompt: str, model: str, max_tokens: int, rng: random.Random) -> tuple[str, int]:
    """Stands in for a provider call: returns text and the tokens it used."""
    if rng.random() < 0.1:
        raise ModelError(f"{model} timed out")
    used = rng.randint(max_tokens // 2, max_tokens)
    if model.endswith("-mini"):
        used //= 2
    return f"[{model}] answer to {prompt!r}", used


def answer(q: quotad.Client, user: str, prompt: str, budget: int, rng: random.Random) -> None:
    model = "gpt-4o"
    try:
        hold = q.reserve(user, event="llm.chat", attributes={"model": model}, amounts={"tokens": budget}, ttl_ms=60000)
        if hold.degraded:
            # Over the gpt-4o budget: give the hold back and use the cheaper model.
            hold.release()
            model, budget = "gpt-4o-mini", budget // 2
            hold = q.reserve(user, event="llm.chat", attributes={"model": model}, amounts={"tokens": budget})
            print(f"  degrade -> switching to {model} with {budget} tokens")
    except quotad.Denied as e:
        d = e.decision
        why = ", ".join(f"{r.limit} {r.code}" for r in d.reasons)
        wait = f", retry in {d.retry_after}s" if d.retry_after else ", no retry will help"
        print(f"  DENIED  {prompt!r}: {why}{wait}")
        return

    try:
        with hold:  # commits hold.actual on success, releases if the call raises
            text, used = fake_llm(prompt, model, budget, rng)
            hold.actual = {"tokens": used}
        if hold.fallback:
            print(f"  OK      {text} (quotad unavailable: not metered)")
        else:
            cost = hold.result.charged.get("cost_micros")
            spent = f", ${cost / 1e6:.4f}" if cost is not None else ""
            print(f"  OK      {text}: held {budget}, used {used} tokens{spent} ({hold.result.status})")
    except ModelError as e:
        what = "nothing was held" if hold.fallback else f"the {budget}-token hold was released"
        print(f"  FAILED  {prompt!r}: {e}; {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--url", help="quotad over TCP (default http://127.0.0.1:7878)")
    where.add_argument("--socket", help="quotad over its Unix socket, e.g. ./quotad.sock")
    ap.add_argument("--token", default=os.environ.get("QUOTAD_TOKEN"), help="bearer token (env QUOTAD_TOKEN)")
    ap.add_argument("--user", default=f"user:demo-{uuid.uuid4().hex[:6]}", help="the subject to meter")
    ap.add_argument("--fail-open", action="store_true", help="serve users when quotad is unreachable")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    mode = "allow" if args.fail_open else "raise"
    with quotad.Client(args.url, socket=args.socket, token=args.token, on_unavailable=mode) as q:
        print(f"quotad at {args.socket or args.url or 'http://127.0.0.1:7878'}, user {args.user}")
        try:
            for prompt, budget in PROMPTS:
                answer(q, args.user, prompt, budget, rng)
            try:
                s = q.subject(args.user)
            except quotad.Unavailable:
                if not args.fail_open:
                    raise
                print("usage: quotad unavailable")
                return 0
        except quotad.Unavailable as e:
            print(f"quotad is unavailable ({e}); rerun with --fail-open to serve users anyway", file=sys.stderr)
            return 2
        except quotad.QuotadError as e:
            print(f"quotad refused the request: {e}", file=sys.stderr)
            return 1
        print(f"usage of {s.subject} (plan {s.plan}):")
        for c in s.counters:
            if c.metric == "tokens" and c.scope == s.subject:
                print(f"  {c.limit:<24} {c.used:>7} / {c.max}")
        print_usage_by_model(q, args.user)
    return 0


def print_usage_by_model(q: quotad.Client, user: str) -> None:
    """Today's tokens per model, from the usage history (the daemon keeps usage
    per model with `[history] dimensions = ["model"]`, as the shipped config does)."""
    today = datetime.now(timezone.utc).date()
    try:
        u = q.usage(user, from_=today, to=today + timedelta(days=1), group_by="model")
    except quotad.InvalidRequest:
        return  # this daemon does not keep usage per model
    except quotad.QuotadError as e:
        print(f"usage by model: {e}")
        return
    print("tokens today by model:")
    for model, sums in sorted(u.totals_by_group().items(), key=lambda kv: -kv[1].get("tokens", 0)):
        print(f"  {model or '(none)':<24} {sums.get('tokens', 0):>7}")


if __name__ == "__main__":
    sys.exit(main())
