"""Models layer: loading models and tokenizers, injecting the adapter a method asks for, the task head."""
