"""forklift's HTTP API: accepts jobs and arrays, answers at once, never computes."""
