"""State the whole fleet shares in Redis: jobs, rate limits, spend, parked jobs, custody."""
