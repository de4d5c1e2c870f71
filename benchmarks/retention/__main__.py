"""`python -m benchmarks.retention`: the study's command line (see benchmarks/retention/study.py)."""

from benchmarks.retention.study import main

main()
