"""The ledger: one row per input record, so "why was my document dropped?" has an answer.

Columns: doc_id, source (file), domain, outcome (kept | filtered | duplicate | quarantined),
reason (the rule or the error), duplicate_of (the surviving doc_id, for duplicates),
duplicate_of_source (its file, since doc_ids need not be unique across files), stage (where the
outcome was decided), uid (unique record key: `FILE#INDEX`), copies (times the mix used it).

`check()` proves the accounting before the job reports success: every record read has exactly
one row, outcomes are valid, every duplicate points at a kept survivor, and the per-domain counts
add up.
"""

from __future__ import annotations

import pyarrow as pa

OUTCOMES = ("kept", "filtered", "duplicate", "quarantined")
COLUMNS = ["doc_id", "source", "domain", "outcome", "reason", "duplicate_of", "duplicate_of_source", "stage",
           "uid", "copies"]  # fmt: skip


class AccountingError(RuntimeError):
    pass


def build(table: pa.Table) -> pa.Table:
    """Rows with uid, doc_id, source, domain, outcome, reason, stage, dup_of (a uid), copies -> ledger.

    Duplicate chains (A dup of B, B later a semantic dup of C) resolve to the final survivor."""
    cols = table.select(
        ["uid", "doc_id", "source", "domain", "outcome", "reason", "stage", "dup_of", "copies"]
    )
    d = cols.to_pydict()
    by_uid = {u: i for i, u in enumerate(d["uid"])}
    dup_doc, dup_src = [], []
    for i, target in enumerate(d["dup_of"]):
        seen = set()
        while target and d["dup_of"][by_uid[target]] and target not in seen:
            seen.add(target)
            target = d["dup_of"][by_uid[target]]
        d["dup_of"][i] = target
        dup_doc.append(d["doc_id"][by_uid[target]] if target else "")
        dup_src.append(d["source"][by_uid[target]] if target else "")
    return pa.table({
        "doc_id": d["doc_id"], "source": d["source"], "domain": d["domain"], "outcome": d["outcome"],
        "reason": d["reason"], "duplicate_of": dup_doc, "duplicate_of_source": dup_src, "stage": d["stage"],
        "uid": d["uid"], "copies": pa.array(d["copies"], type=pa.int32()),
    })  # fmt: skip


def counts(ledger: pa.Table) -> dict[str, dict[str, int]]:
    """{domain: {input, kept, filtered, duplicate, quarantined}} plus an "all" row (always there)."""
    out: dict[str, dict[str, int]] = {}
    for domain, outcome in zip(ledger.column("domain").to_pylist(), ledger.column("outcome").to_pylist()):
        for key in (domain, "all"):
            c = out.setdefault(key, {"input": 0, **{o: 0 for o in OUTCOMES}})
            c["input"] += 1
            c[outcome] = c.get(outcome, 0) + 1
    out["all"] = out.pop("all", {"input": 0, **{o: 0 for o in OUTCOMES}})  # last, and there when empty
    return out


def funnel(ledger: pa.Table, stages: list[str]) -> list[dict]:
    """Documents remaining after each stage (the report's funnel), per domain and overall."""
    d = ledger.select(["domain", "outcome", "stage"]).to_pydict()
    total: dict[str, int] = {}
    removed: dict[tuple[str, str], int] = {}
    for dom, outcome, stage in zip(d["domain"], d["outcome"], d["stage"]):
        total[dom] = total.get(dom, 0) + 1
        if outcome != "kept":
            removed[(stage, dom)] = removed.get((stage, dom), 0) + 1
    rows, left = [], dict(total)
    rows.append({"stage": "input", **left, "all": sum(left.values())})
    for s in stages:
        for dom in left:
            left[dom] -= removed.get((s, dom), 0)
        rows.append({"stage": s, **left, "all": sum(left.values())})
    return rows


def check(ledger: pa.Table, records_read: int) -> dict:
    """Raise AccountingError unless the ledger accounts for every record; return the counts."""
    n = ledger.num_rows
    if n != records_read:
        raise AccountingError(f"ledger has {n} rows but {records_read} records were read")
    uids = ledger.column("uid").to_pylist()
    if len(set(uids)) != n:
        raise AccountingError("ledger has repeated uids")
    d = ledger.select(["outcome", "reason", "duplicate_of", "duplicate_of_source", "uid"]).to_pydict()
    bad = sorted({o for o in d["outcome"]} - set(OUTCOMES))
    if bad:
        raise AccountingError(f"unknown outcome(s) {bad}")
    kept = {(doc, src) for doc, src, o in zip(ledger.column("doc_id").to_pylist(),
                                               ledger.column("source").to_pylist(), d["outcome"]) if o == "kept"}  # fmt: skip
    for o, reason, dup, src, uid in zip(d["outcome"], d["reason"], d["duplicate_of"], d["duplicate_of_source"],
                                        d["uid"]):  # fmt: skip
        if o != "kept" and not reason:
            raise AccountingError(f"{uid}: outcome {o} without a reason")
        if o == "duplicate" and (dup, src) not in kept:
            raise AccountingError(f"{uid}: duplicate of {dup!r} ({src}), which is not kept")
    c = counts(ledger)
    for domain, row in c.items():
        if row["input"] != sum(row[o] for o in OUTCOMES):
            raise AccountingError(f"domain {domain}: counts do not add up: {row}")
    return c
