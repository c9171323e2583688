"""The engine: plan a validated recipe into a graph, stream every key through the operators, hand the
results to writers; locally (threads) or on Ray."""
