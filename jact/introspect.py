"""`jact.residuals`: which residuals a differentiated function stores, at which width."""
