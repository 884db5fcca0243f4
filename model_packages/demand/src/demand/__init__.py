"""Daily demand forecaster: a linear trend and a weekday profile per store, refitted at every run."""
