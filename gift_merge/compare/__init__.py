"""Compare merge baselines: build arms, evaluate them, rank and plot."""
