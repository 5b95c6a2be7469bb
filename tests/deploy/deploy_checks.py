"""Parsers the deployment tests share: Dockerfile instructions, secrets in ENV/ARG, the metric
names a PromQL expression reads, and the queries of a Grafana dashboard."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined, comments dropped
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile (backslash continuations joined, comment lines skipped)."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        joined = " ".join(s.strip() for s in buf)
        buf = []
        kw, _, rest = joined.partition(" ")
        out.append(Instruction(kw.upper(), rest.strip(), start))
    if buf:
        raise ValueError("Dockerfile ends inside a continued instruction")
    return out


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form ENTRYPOINT/CMD/SHELL, or None for shell form."""
    try:
        v = json.loads(args)
    except json.JSONDecodeError:
        return None
    return v if isinstance(v, list) and all(isinstance(s, str) for s in v) else None


def env_pairs(args: str) -> dict[str, str]:
    """KEY=VALUE pairs of an ENV instruction (also the legacy ``ENV KEY VALUE`` form)."""
    if "=" not in args.split(" ", 1)[0]:
        k, _, v = args.partition(" ")
        return {k: v.strip()}
    pairs = {}
    for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|\S*)', args):
        pairs[m.group(1)] = m.group(2).strip('"')
    return pairs


SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.I)


def secrets_in(instructions: list[Instruction]) -> list[str]:
    """ENV / ARG entries whose name looks secret and that carry a value (a baked-in secret)."""
    bad = []
    for ins in instructions:
        if ins.keyword == "ENV":
            items = env_pairs(ins.args).items()
        elif ins.keyword == "ARG":
            k, _, v = ins.args.partition("=")
            items = [(k.strip(), v.strip())]
        else:
            continue
        for k, v in items:
            if SECRET_NAME.search(k) and v not in ("", '""', "''"):
                bad.append(f"line {ins.line}: {ins.keyword} {k}")
    return bad


_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (its vector selectors), without a full parser:
    drops string literals, label matchers ``{...}``, ranges ``[...]``, the label lists of
    by/without/on/ignoring/group_*, function names (identifier before ``(``), keywords, numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        if word.lower() in _PROMQL_WORDS:
            continue
        if re.match(r"\s*\(", s[m.end():]):
            continue  # function call
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # part of a number such as 1e-3
        names.add(word)
    return names


GRAFANA_VARS = {
    "$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
    "${datasource}": "", "$job": ".*", "$instance": ".*",
}


def substitute_grafana(expr: str) -> str:
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable left in {expr!r}")
    return expr


def dashboard_panels(dash: dict) -> Iterator[dict]:
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])  # collapsed rows keep their panels inside


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target and every query variable."""
    out = []
    for p in dashboard_panels(dash):
        for t in p.get("targets", []):
            out.append((p.get("title", ""), t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*[A-Za-z_]+\)", q)
            out.append((f"variable {v['name']}", m.group(1) if m else q))
    return out


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())
