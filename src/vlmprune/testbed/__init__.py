"""An offline grounding testbed: procedural scenes and a tiny LLaVA trained on them (issue 5)."""
