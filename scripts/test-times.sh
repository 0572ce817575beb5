#!/usr/bin/env bash
# Where a test run's time went: reads nextest's JUnit report (`.config/nextest.toml`
# writes it) and prints the run's count and summed test time, the slowest tests, and
# every test that needed a retry with how long each try took.
#
# CI's whole run must stay inside 90 minutes on a machine whose speed under TCG varies
# 2.5x from one day to the next; the nested L1 tests are most of it. This makes each
# CI log say which tests to split, schedule or trim, without a second run to find out.
#
# Usage: scripts/test-times.sh [JUNIT.xml] [HOW_MANY]
set -euo pipefail
cd "$(dirname "$0")/.."
report=${1:-target/nextest/default/junit.xml}
most=${2:-15}
if [ ! -f "$report" ]; then
    echo "test-times: no JUnit report at $report (did nextest run with the default profile?)" >&2
    exit 1
fi
python3 - "$report" "$most" <<'PY'
import sys
import xml.etree.ElementTree as ET

report, most = sys.argv[1], int(sys.argv[2])
RETRIES = ("flakyFailure", "flakyError", "rerunFailure", "rerunError")
cases = []
for case in ET.parse(report).getroot().iter("testcase"):
    name = f"{case.get('classname', '')} {case.get('name', '')}".strip()
    # A retried test keeps its other tries as child elements, each with its own start
    # and time (which try the case itself holds differs between a flaky and a failed
    # test): put them back in the order they ran.
    tries = sorted(
        (e.get("timestamp", ""), float(e.get("time", "0") or 0))
        for e in [case] + [c for c in case if c.tag in RETRIES]
    )
    times = [t for _, t in tries]
    failed = any(c.tag in ("failure", "error") for c in case)
    cases.append((sum(times), name, times, failed))

total = sum(c[0] for c in cases)
print(f"test-times: {len(cases)} tests, {total:.0f} s of test time in all")
print(f"  the {min(most, len(cases))} slowest (all tries together):")
for t, name, times, failed in sorted(cases, reverse=True)[:most]:
    mark = " FAILED" if failed else ""
    print(f"  {t:8.1f} s  {name}{mark}")
retried = [c for c in cases if len(c[2]) > 1]
if retried:
    print("  retried (each try in the order they ran):")
    for t, name, times, failed in retried:
        tries = ", then ".join(f"{x:.1f} s" for x in times)
        print(f"    {name}: {tries}{' (failed)' if failed else ' (passed)'}")
PY
