"""torchrun target for test_checks: screen one sample list on every rank; write what each rank checked and kept."""

import json
import sys
from pathlib import Path

from fastft.data import checks
from fastft.parallel.env import init_distributed, shutdown

env = init_distributed("cpu")
seen: list[str] = []
real = checks.check_image


def spy(path: str):
    seen.append(path)
    return real(path)


checks.check_image = spy
samples = [tuple(s) for s in json.loads(Path(sys.argv[1]).read_text())]
kept, skipped = checks.screen(samples, on_bad_file="skip", threads=2, env=env)
Path(sys.argv[2], f"rank{env.rank}.json").write_text(json.dumps({"seen": seen, "kept": kept, "skipped": skipped}))
shutdown(env)
