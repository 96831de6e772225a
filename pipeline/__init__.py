"""Stage one of knowsep: models, corpora and the harvest of one layer's residual stream."""
