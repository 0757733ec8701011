"""celeriac's benchmarks: ``python -m benches`` (see ``benches/run.py``)."""
