"""`promptq batch`: JSONL files of prompts through the workers and back."""
