"""Library warnings every run prints that mislead: annotated where they are logged, before the library
loads, so a user reads what they mean (and the fix they invite is not taken).

bitsandbytes >= 0.49 on a CPU with AVX512-BF16 tries to fetch a faster 4-bit kernel from the Hugging Face
hub (kernels-community/quantization-bitsandbytes) and, failing, logs "Failed to load CPU gemm_4bit_forward
... Set trust_remote_code=True ...". Its own CPU kernel then runs: nothing is wrong, and allowing remote
code for it would run code from the hub (`qlora-doctor explain` has the rule bnb-cpu-gemm-hub-kernel-warning).
"""

from __future__ import annotations

import logging

BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_CPU_KERNEL_TEXT = "Failed to load CPU gemm_4bit_forward from kernels-community"
ANNOTATION = ("bitsandbytes: the optional hub kernel for CPU 4-bit matmuls was not fetched; its built-in CPU "
              "kernel runs instead (harmless, and slower only on AVX512-BF16 CPUs). Do not set "
              "trust_remote_code for it: that would run code from the hub (see `qlora-doctor explain`).")


class _Annotate(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if BNB_CPU_KERNEL_TEXT in str(record.msg):
            record.msg, record.args = ANNOTATION, ()
        return True


def annotate_known_warnings() -> None:
    """Install the annotations (idempotent); call before bitsandbytes is imported."""
    logger = logging.getLogger(BNB_CPU_KERNEL_LOGGER)
    if not any(isinstance(f, _Annotate) for f in logger.filters):
        logger.addFilter(_Annotate())
