"""Megatron-LM's offline torch_dist -> fsdp_dtensor converter, run as users run it.

``tools/checkpoint/checkpoint_inspector.py convert-torch-dist-to-fsdp-dtensor`` lives only in a
Megatron-LM source tree (not in the pip wheels). ``convert`` runs that tree's own script under
``torchrun``, with the tree ahead of the installed packages; on the CPU lane the script runs
inside ``harness.runtimes.cpu.CpuRuntime`` (its ``cuda`` DeviceMesh, ``.cuda()`` calls,
``set_device`` and ``backend="nccl"`` are redirected there like Megatron-FSDP's; nothing in the
script changes). ``python -m harness.conversion.checkpoint_inspector LANE TREE ARGS...`` is that
wrapper's entry point.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.matrix import lanes


@dataclass(frozen=True)
class Conversion:
    """What one run of the converter did: its exit code and the tail of what it printed."""

    returncode: int
    log_tail: str

    @property
    def headline(self) -> str:
        """The converter's own exception line: torchrun prefixes the rank's output with
        ``[rank0]: ``, then adds its own ChildFailedError traceback, which is not the cause."""
        from harness.results import error_headline

        rank0 = [line.split("]: ", 1)[1] for line in self.log_tail.splitlines() if line.startswith("[rank0]: ")]
        return error_headline("\n".join(rank0) or self.log_tail) or f"exit code {self.returncode}"


def command(lane: str, tree: Path, source: Path, target: Path, *, world_size: int, swiglu: bool) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            "-m", __name__, lane, str(tree), "convert-torch-dist-to-fsdp-dtensor", str(source), str(target),
            *(["--swiglu"] if swiglu else [])]


def convert(lane: str, source: Path, target: Path, *, world_size: int, swiglu: bool, timeout_s: float = 600) -> Conversion:
    """Run the tree's converter on a torch_dist ``source`` iter folder, writing ``target``."""
    tool = lanes.megatron_lm_tool(lanes.CHECKPOINT_INSPECTOR)
    if tool is None:
        raise RuntimeError(lanes.INSPECTOR_NEEDS_TREE)
    tree = tool.parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_", "LOCAL_", "GROUP_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(tree), env.get("PYTHONPATH", ""))))
    proc = subprocess.run(command(lane, tree, source, target, world_size=world_size, swiglu=swiglu), env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    return Conversion(proc.returncode, (proc.stdout + proc.stderr)[-6000:])


def main(argv: list[str]) -> None:
    lane, tree, *args = argv
    script = Path(tree) / lanes.CHECKPOINT_INSPECTOR
    sys.argv = [str(script), *args]
    if lane == lanes.CPU:
        from harness.runtimes.cpu import CpuRuntime

        with CpuRuntime():
            runpy.run_path(str(script), run_name="__main__")
    else:
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
