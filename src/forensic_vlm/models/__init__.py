"""Base models: the supported architectures, their processors, and tiny random ones for the demo."""
