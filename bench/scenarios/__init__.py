"""What the benchmarks measure, one module per path. Each imports ``bench.common`` and nothing
else of the package but another scenario (capacity reuses consume and publish); none renders
a report, which ``bench.report`` does."""
