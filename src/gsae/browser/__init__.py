"""`gsae inspect`: a static, offline feature browser of an SAE's latents."""

from gsae.browser.site import InspectConfig, inspect, inspect_contexts

__all__ = ["InspectConfig", "inspect", "inspect_contexts"]
