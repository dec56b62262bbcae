"""The run layer: one loop for a single run and a sweep, and the run folder."""
