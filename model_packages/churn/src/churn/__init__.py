"""Customer churn classifier: a scikit-learn pipeline trained at run time on the client's customers."""
