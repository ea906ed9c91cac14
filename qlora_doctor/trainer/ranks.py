"""Where this process sits in an `accelerate launch` job (read from the variables torchrun sets)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in an `accelerate launch` job (all zeros / one when not launched)."""

    rank: int
    """Global rank (RANK); 0 writes the outputs."""
    local_rank: int
    """The GPU index on this host (LOCAL_RANK)."""
    world_size: int
    """Processes in the job (WORLD_SIZE)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info(environ: Mapping[str, str] | None = None) -> RankInfo:
    """This process's rank, from the variables torchrun/accelerate set (defaults: a single process)."""
    env = os.environ if environ is None else environ
    return RankInfo(rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")),
                    world_size=int(env.get("WORLD_SIZE", "1")))
