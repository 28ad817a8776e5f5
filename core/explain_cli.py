"""`gplr explain USER`: each persona of a customer with its score and the evidence behind it.

Sources: `--from FILE`, a `gplr label` JSON-lines output (items and, for the graph channel, the
prototype customers whose LLM labels reached the user; with the zero-shot channel, its term in
the persona's logit and the items whose names vote most for the persona) or persona-updates
records saved by `gplr watch --json` (items); without `--from`, the stream's persona-updates topic when the
stream package is installed (it sets `stream_source`, see `streams.cli`). The evidence itself
is computed by `core.evidence`; this module only finds and prints it.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["register", "cmd_explain", "find_user", "normalise", "render"]


def find_user(path: Path, user: str) -> Mapping[str, Any] | None:
    """The last record of `user` in a JSON-lines file (`user_id`: batch row, `user`: a
    persona-updates record); a line that is not a JSON object is an error naming the line."""
    if path.suffix.lower() == ".csv":
        raise ValueError(f"{path}: CSV output carries no evidence; write `gplr label --out FILE.jsonl`")
    found = None
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{path} line {n} is not JSON") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {n} is not a JSON object")
            if str(record.get("user_id", record.get("user"))) == user:
                found = record
    return found


def normalise(record: Mapping[str, Any], source: str) -> dict[str, Any]:
    """One shape for both sources: {user, source, labelled_by, personas: [{name, score,
    evidence, prototypes, zero_shot}]} (`zero_shot`: `core.evidence.zero_shot_evidence`'s entry,
    None without the channel)."""
    if "user_id" in record:  # a `gplr label` row: parallel lists
        names, scores = record.get("personas", []), record.get("scores", [])
        evidence, protos = record.get("evidence") or [], record.get("prototypes") or []
        zero_shot = record.get("zero_shot") or []
        personas = [{"name": n, "score": s, "evidence": evidence[j] if j < len(evidence) else [],
                     "prototypes": protos[j] if j < len(protos) else [],
                     "zero_shot": zero_shot[j] if j < len(zero_shot) else None}
                    for j, (n, s) in enumerate(zip(names, scores))]
        by = "LLM (prototype)" if record.get("llm_labelled") else "propagation"
        return {"user": str(record["user_id"]), "source": source, "labelled_by": by, "personas": personas}
    personas = [{"name": p.get("name"), "score": p.get("score"), "evidence": p.get("evidence", []),
                 "prototypes": [], "zero_shot": p.get("zero_shot")} for p in record.get("personas", [])]
    return {"user": str(record.get("user")), "source": source, "labelled_by": record.get("labelled_by", ""),
            "reason": record.get("reason", ""), "personas": personas}


def render(view: Mapping[str, Any]) -> str:
    """Plain text, one persona per block (what the README example shows)."""
    lines = [f"customer {view['user']} ({view['source']}; {view['labelled_by']})"]
    if not view["personas"]:
        lines.append("  no personas")
    for p in view["personas"]:
        lines.append(f"  {p['name']}  score {float(p['score']):.3f}")
        for j, e in enumerate(p["evidence"]):
            head = "items:" if j == 0 else ""
            item = e["name"] if e["name"] == e["item_id"] else f"{e['name']} [{e['item_id']}]"
            lines.append(f"    {head:<11} {e['share']:6.1%}  {item} ({e['channel']})")
        if not p["evidence"]:
            lines.append("    items:      none (no prototype or item name points to it: the prior)")
        lines += _zero_shot_lines(p.get("zero_shot"))
        for j, w in enumerate(p["prototypes"]):
            head = "prototypes:" if j == 0 else ""
            lines.append(f"    {head:<11} {w['share']:6.1%}  customer {w['user_id']}, labeled "
                         f"{', '.join(w['labels'])}")
    return "\n".join(lines)


def _zero_shot_lines(z: Mapping[str, Any] | None) -> list[str]:
    """The zero-shot channel's part of a persona's decision: its term in the persona's logit and
    the names' mean lift, then the items whose names vote most for the persona (their lift s(v))."""
    if not z:
        return []
    lines = [f"    {'zero-shot:':<11} {float(z['contribution']):+.3f} to the logit: the names' mean lift "
             f"{float(z['mean_lift']):.2f} (an average item: 1)"]
    for e in z.get("items", []):
        item = e["name"] if e["name"] == e["item_id"] else f"{e['name']} [{e['item_id']}]"
        lines.append(f"    {'':<11} lift {float(e['lift']):5.2f}  {item}")
    return lines


def cmd_explain(args: argparse.Namespace) -> int:
    user = str(args.user)
    if args.source:
        path = Path(args.source)
        try:
            record = find_user(path, user)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"gplr explain: {exc}") from None
        where, source = str(path), "batch" if path.suffix.lower() == ".jsonl" else "file"
    elif args.stream_source is not None:
        record, where, source = args.stream_source(user, args.timeout), "the persona-updates topic", "stream"
    else:
        raise SystemExit("gplr explain: give --from FILE (a `gplr label` .jsonl output); the stream "
                         "variant needs the stream package")
    if record is None:
        raise SystemExit(f"gplr explain: no customer {user!r} in {where}")
    if source == "batch" and "user" in record and "user_id" not in record:
        source = "stream"
    view = normalise(record, source)
    print(json.dumps(view, ensure_ascii=False) if args.json else render(view))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("explain", help="why a customer holds each persona: evidence items and prototypes")
    p.add_argument("user", help="customer id")
    p.add_argument("--from", dest="source", metavar="FILE",
                   help="a `gplr label` .jsonl output, or persona updates saved by `gplr watch --json` "
                        "(default: the stream's persona-updates topic)")
    p.add_argument("--timeout", type=float, default=60.0, help="stream: most seconds to read the topic")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=cmd_explain, stream_source=None)
