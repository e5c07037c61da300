"""The throughput harness behind `fastft bench`: part of the package, so it runs from an install.

suites.py    the registry of suites (built-in: smoke, cpu, gpu) and what each measures
measure.py   timed calls, epoch summaries, the forward-only limit, host memcpy bandwidth, same-run ratios
cases.py     one mode: data, config, one timed fastft run; the seed loop's figure for a block
headline.py  the side-by-side run: first epochs vs the limit, cached N-epoch probe vs the seed loop
worker.py    world size > 1: the same fastft call under torchrun
baseline.py  the naive seed loop every mode is compared with
analysis.py  ratios and targets from one results document
report.py    the schema and its check; markdown and JSON output
harness.py   one run of a suite, start to end
cli.py       `fastft bench` arguments and entry point
"""
