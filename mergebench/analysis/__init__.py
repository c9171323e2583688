"""Looking at merges: weight diffs, mask overlap, parameter sweeps, claims over seeds."""
