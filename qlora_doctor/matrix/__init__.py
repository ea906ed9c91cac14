"""The compatibility matrix: combinations (matrix.yaml), runs, records, reports and the CI workflow.

Only `tested_status` is imported here: `check` calls it on its fast path.
"""

from qlora_doctor.matrix.tested import tested_status

__all__ = ["tested_status"]
