"""The promptq command line and the supervisor of a worker's processes."""
