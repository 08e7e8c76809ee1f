"""Dependency audit (issue 11, section 5): pip-audit over the installed environment (`make audit`, run by
.ci/run). Fails on a known vulnerability that has a fixed version; one with no fix yet is reported, not
failed (there is nothing to upgrade to). An advisory may be ignored only with a written reason (IGNORED).

pip-audit asks PyPI's JSON API for each installed release (its default vulnerability service). A package it
cannot look up (a local wheel, a private or mirrored index without the per-release JSON) is listed as not
audited; with --strict that fails the audit too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Advisory id (or an alias such as a CVE id) -> why it is ignored. Never without a reason.
IGNORED: dict[str, str] = {}


def check_ignores(ignored: dict[str, str]) -> None:
    for vid, reason in ignored.items():
        if not reason or not reason.strip():
            raise ValueError(f"ignored advisory {vid} has no written reason")


def run_pip_audit(python: str) -> dict:
    """pip-audit's JSON report of the environment ``python`` runs in (the project's own editable install is
    skipped: it is not on PyPI)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        cmd = [python, "-m", "pip_audit", "--format", "json", "--output", str(out), "--progress-spinner", "off",
               "--skip-editable"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if not out.is_file():  # pip-audit itself failed (no network, bad environment): say why
            sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
            raise SystemExit(f"pip-audit did not run (exit {res.returncode})")
        return json.loads(out.read_text())


def judge(report: dict, ignored: dict[str, str]) -> dict:
    """Sort the report's advisories into fixable / unfixable / ignored; list what could not be audited."""
    verdict = {"fixable": [], "unfixable": [], "ignored": [], "skipped": [], "audited": 0}
    for dep in report.get("dependencies", []):
        if "skip_reason" in dep:
            verdict["skipped"].append(dep["name"])
            continue
        verdict["audited"] += 1
        for v in dep.get("vulns", []):
            item = {"package": dep["name"], "version": dep.get("version"), "id": v["id"],
                    "aliases": v.get("aliases", []), "fix_versions": v.get("fix_versions", [])}
            reason = next((ignored[i] for i in [v["id"], *item["aliases"]] if i in ignored), None)
            if reason is not None:
                verdict["ignored"].append({**item, "reason": reason})
            elif item["fix_versions"]:
                verdict["fixable"].append(item)
            else:
                verdict["unfixable"].append(item)
    return verdict


def exit_code(verdict: dict, strict: bool = False) -> int:
    return 1 if verdict["fixable"] or (strict and verdict["skipped"]) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="the environment to audit (default: this one)")
    ap.add_argument("--strict", action="store_true", help="also fail when a package could not be audited")
    ap.add_argument("--report", type=Path, help="write the verdict as JSON here")
    args = ap.parse_args(argv)
    check_ignores(IGNORED)
    verdict = judge(run_pip_audit(args.python), IGNORED)
    for v in verdict["fixable"]:
        print(f"VULNERABLE {v['package']} {v['version']}: {v['id']} ({', '.join(v['aliases'])}); "
              f"fixed in {', '.join(v['fix_versions'])}: upgrade the pin")
    for v in verdict["unfixable"]:
        print(f"known, no fix yet: {v['package']} {v['version']}: {v['id']}")
    for v in verdict["ignored"]:
        print(f"ignored {v['package']} {v['version']}: {v['id']}: {v['reason']}")
    n_skip = len(verdict["skipped"])
    print(f"pip-audit: {verdict['audited']} packages audited, {len(verdict['fixable'])} with a fixable "
          f"vulnerability, {len(verdict['unfixable'])} without a fix, {len(verdict['ignored'])} ignored; "
          f"{n_skip} not audited")
    if n_skip:
        print(f"WARNING: {n_skip} packages could not be looked up by the vulnerability service (not on PyPI, or "
              f"the index in use serves no per-release JSON): {', '.join(verdict['skipped'][:20])}"
              + (" ..." if n_skip > 20 else ""))
    if args.report:
        args.report.write_text(json.dumps(verdict, indent=1))
    return exit_code(verdict, args.strict)


if __name__ == "__main__":
    raise SystemExit(main())
