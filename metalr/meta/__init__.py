"""Meta-training: differentiable inner unrolls, gradient estimators, the outer loop."""
