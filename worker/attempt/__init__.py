"""One attempt of one job: its rate-limit slot, its call, its classification and retry."""
