"""Rule specs, stateful evaluators and the alert lifecycle."""
