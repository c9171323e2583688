"""Weight surgery the operators and the engine share: exact numerics, block detection, permutations,
optimal transport, vocabulary alignment. Tensors in, tensors out: no files, no recipes."""
