"""The sample agent client: a terminal desktop with one tab per chat."""
