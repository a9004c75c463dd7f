"""Shipping a trained adapter: standalone export and generation (merging is ``riemix.core.merge``).

Modules:
    loading: ``load_adapted``: a base model plus the adapter of a run directory or an adapter directory.
    export: ``export_model``: a directory that ``transformers.AutoModelForCausalLM`` serves on its own.
    modeling_riemix: the inference model written into every export (torch + transformers, no riemix).
    generation: ``generate`` / ``generate_text``: chat-templated, streamed generation.

``modeling_riemix`` is not imported here: it builds its class from ``transformers`` when imported.
"""

from riemix.ship.export import EXPORT_ROUTING_MODES, check_export_dir, check_exportable, export_model, export_spec
from riemix.ship.generation import build_prompt, generate, generate_text
from riemix.ship.loading import DTYPES, AdapterSource, load_adapted, resolve_adapter_source

__all__ = [
    "DTYPES",
    "EXPORT_ROUTING_MODES",
    "AdapterSource",
    "build_prompt",
    "check_export_dir",
    "check_exportable",
    "export_model",
    "export_spec",
    "generate",
    "generate_text",
    "load_adapted",
    "resolve_adapter_source",
]
