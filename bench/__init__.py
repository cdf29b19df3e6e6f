"""fedmount benchmarks: every figure is reported as a ratio against a ceiling measured in the same run.

``python -m bench [--full] [--check-json]`` starts an emulated federation
(`integration.harness`), creates the benchmark collections in it, mounts fedmount and runs
the workloads of `bench.workloads`; the ceilings of `bench.ceilings` are measured in the
same run on the same machine (a null pyfuse3 filesystem, `bench.nullfs`; raw parallel Keep
GETs; the local page cache). `bench.report` turns the runs into a table and
``bench/results/latest.json`` (min/median/max of several runs, the ratio to the ceiling,
the target and whether it is met, and the machine).
"""
