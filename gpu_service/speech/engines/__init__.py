"""The engines of this capability, built by name from the settings."""
