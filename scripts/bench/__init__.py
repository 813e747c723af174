"""The benchmark (`make bench`, `python -m scripts.bench`): services, workload, measurement, peers, scenarios, report.

Each scenario in scenarios.py starts what it needs from services.py, generates its data with workload.py, times the
real `etl.py` (and the peers of peers.py) with measure.py, and returns a Result; report.py renders the Results.
"""
