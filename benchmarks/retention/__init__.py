"""The retention study (`python -m benchmarks.retention`) and the benchmarks built on it
(benchmarks/concept_capacity.py, benchmarks/merge_rules.py).

study.py (arms, training cache, strength matching, the command line) · eval.py (the scores) ·
report.py (tables, intervals and the paper's criteria) · world.py (the toy concepts and judges it scores with).
"""
