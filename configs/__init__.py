"""The training presets (YAML), shipped as package data so the flow finds them in an installed package."""
