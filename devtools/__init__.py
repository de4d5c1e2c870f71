"""Tools for developing and measuring the federation, not part of it: local_cluster.py (Ray heads and
raylets on 127.0.0.1 for tests, the main job and benchmarks) · job_profile.py (where a client job's
time goes, from the marks it prints).
"""
