"""The fast unit layer: our own logic against doubles of our own seams (DESIGN.md)."""
