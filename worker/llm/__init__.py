"""The LiteLLM boundary: the provider call, its estimates and prices, content transforms."""
