"""Turn the model-zoo matrix's JUnit XML (`make test-zoo`) into a markdown record: names x policies, pass/fail, time.

python -m benchmarks.zoo_table zoo.xml benchmarks/results/zoo-<host>-<date>.md
"""

from __future__ import annotations

import platform
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from datetime import date
from pathlib import Path


def main(xml_path: str, out_path: str) -> None:
    import torch
    import torchvision

    root = ET.parse(xml_path).getroot()
    rows: dict[str, dict[str, tuple[str, float]]] = defaultdict(dict)
    total = 0.0
    for case in root.iter("testcase"):
        m = re.fullmatch(r"test_family_under_policy\[(.+?)-(\d+)-(.+)\]", case.get("name", ""))
        if not m:
            continue
        name, size, policy = m.group(1), m.group(2), m.group(3)
        policy = "until" if policy.startswith("until:") else policy
        outcome = "pass"
        for tag, word in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "skip")):
            if case.find(tag) is not None:
                outcome = word
        seconds = float(case.get("time", 0))
        total += seconds
        rows[f"{name} ({size} px)"][policy] = (outcome, seconds)
    policies = ("backbone", "until", "none")
    lines = [
        f"# Model-zoo matrix: every torchvision classifier x freeze policy ({date.today().isoformat()})",
        "",
        f"`make test-zoo` (tests/test_model_zoo.py with FASTFT_TEST_ZOO=all). torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, Python {platform.python_version()}, {platform.machine()}, CPU. Each cell: outcome "
        f"and seconds. Checks per cell: split == model.eval() output, two eval passes identical, one step changes "
        f"exactly what trains, cached features == prefix output, state dict loads into plain torchvision.",
        "",
        "| model | " + " | ".join(policies) + " |",
        "|---|" + "---|" * len(policies),
    ]
    failed = 0
    for name in sorted(rows):
        cells = []
        for p in policies:
            outcome, seconds = rows[name].get(p, ("-", 0.0))
            failed += outcome in ("FAIL", "ERROR")
            cells.append(f"{outcome} {seconds:.1f}s")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"{len(rows)} models, {sum(len(r) for r in rows.values())} cases, {failed} failed, {total:.0f} s."]
    Path(out_path).write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} models, {failed} failed cases -> {out_path}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
