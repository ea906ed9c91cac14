"""The compatibility matrix: combinations (matrix.yaml), runs, records, reports and the CI workflow."""
