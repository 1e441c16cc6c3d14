"""`gsae inspect`: a static, offline feature browser of an SAE's latents."""

from gsae.browser.site import InspectConfig, InspectRun, inspect, inspect_contexts, run_inspect

__all__ = ["InspectConfig", "InspectRun", "inspect", "inspect_contexts", "run_inspect"]
