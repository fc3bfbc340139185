"""The decoder model, its presets, and the bridge to Hugging Face checkpoint directories."""
