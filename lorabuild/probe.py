"""The environment probe: a script run by a backend's own Python to report its torch and CUDA.

A backend lives in its own environment (DESIGN.md), so lorabuild never assumes its own torch is
the one that trains. The script is passed with `python -c`, so it needs nothing but the
standard library and whatever it finds; it prints one JSON object and always exits 0.
Usage: `<python> -c PROBE_SOURCE module [module ...]` — the modules whose versions to report.
"""

from __future__ import annotations

PROBE_SOURCE = r"""
import json, sys, platform
out = {"python": platform.python_version(), "executable": sys.executable, "modules": {}}
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    try:
        out["cuda_available"] = bool(torch.cuda.is_available())
    except Exception as exc:
        out["cuda_available"] = False
        out["cuda_error"] = str(exc)
    try:
        out["arch_list"] = list(torch.cuda.get_arch_list())
    except Exception:
        out["arch_list"] = []
    if out["cuda_available"]:
        out["devices"] = []
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            out["devices"].append({"name": torch.cuda.get_device_name(i), "capability": list(cap)})
except Exception as exc:
    out["torch"] = None
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
for name in sys.argv[1:]:
    try:
        module = __import__(name)
        out["modules"][name] = getattr(module, "__version__", "installed")
    except Exception as exc:
        out["modules"][name] = None
        out.setdefault("module_errors", {})[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""
