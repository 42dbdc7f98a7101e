"""What this machine's CPU runs fast, detected rather than assumed.

bf16 autocast on the CPU is a speed-up only where the CPU multiplies bf16 natively: AVX512_BF16
(AMD Zen 4 and later, Intel Cooper Lake and later), AMX (Intel Sapphire Rapids and later) or
Arm's BF16 extension. Elsewhere oneDNN emulates it in fp32, with conversions on top: slower than
fp32. `seglight bench --precision 32,bf16-mixed` measures both on the machine at hand.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: /proc/cpuinfo flags that mean native bf16 matrix products, and how they are named
_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512_BF16", "bf16": "Arm BF16"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux: the `flags` line, on Arm `Features`); empty elsewhere."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU feature that runs bf16 natively ("AVX512_BF16", "AMX-BF16", "Arm BF16"), or None.
    Asks torch's own CPU probe first where it has one, then the kernel's flags."""
    for probe, name in (
        ("_is_avx512_bf16_supported", "AVX512_BF16"),
        ("_is_amx_tile_supported", "AMX-BF16"),
    ):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return name
        except RuntimeError:
            pass
    flags = cpu_flags(cpuinfo)
    return next((name for flag, name in _BF16_FLAGS.items() if flag in flags), None)
