"""The demo: small models on scikit-learn's bundled digits (no download needed)."""
