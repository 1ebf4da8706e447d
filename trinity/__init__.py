"""Trinity: reinforcement fine-tuning for LLMs that needs no local GPU."""
